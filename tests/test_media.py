"""Safe media decoding: bombs, truncated, corrupt and missing images, transparency, escaping paths."""

from __future__ import annotations

import pytest
from PIL import Image

from m3jepa.data.media import MAX_IMAGE_PIXELS, load_image, safe_join
from m3jepa.data.records import BadItemError, DatasetError


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    side = int(MAX_IMAGE_PIXELS**0.5) + 100  # just over the pixel budget; 1-bit PNG stays tiny on disk
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(BadItemError, match=r"bomb\.png.*(exceeds|bomb)"):
        load_image(path, "bomb.png")


def test_truncated_and_corrupt_and_missing_images_name_the_item(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = tmp_path / "noise.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    for path, why in (
        (truncated, "corrupt or truncated"),
        (corrupt, "corrupt or truncated"),
        (tmp_path / "none.png", "missing"),
    ):
        with pytest.raises(BadItemError, match=why) as e:
            load_image(path, f"item-{path.stem}")
        assert e.value.item == f"item-{path.stem}"
    assert load_image(good).getpixel((5, 5)) == (10, 200, 30)


def test_transparent_pixels_are_composited_on_white(tmp_path):
    path = tmp_path / "rgba.png"
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.putpixel((1, 1), (255, 0, 0, 255))
    im.save(path)
    out = load_image(path)
    assert (
        out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    )


def test_safe_join_refuses_paths_that_escape_the_root(tmp_path):
    assert safe_join(tmp_path, "a/b.png", "x") == (tmp_path / "a" / "b.png").resolve()
    for bad in ("../outside.png", "a/../../x.png", "/etc/passwd"):
        with pytest.raises(DatasetError, match="escapes the dataset root"):
            safe_join(tmp_path, bad, "item-7")
