"""Safe media decoding (bombs, corrupt, missing, transparency, escaping paths); fast = plain preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m3jepa.data.media import MAX_IMAGE_PIXELS, _on_white, load_image, safe_join
from m3jepa.data.records import BadItemError, DatasetError
from m3jepa.encoders.image import (
    LITE_MEAN,
    LITE_STD,
    ImagePreprocessor,
    center_crop,
    resize_and_crop,
    resize_shortest,
)


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


# ---------------------------------------------------------------- fast preprocessing = plain code, bitwise
# The references below are the straightforward PIL/numpy code the fast path replaced; stored features stay
# byte-identical only while every preprocessed tensor does.


def _reference_on_white(im: Image.Image) -> Image.Image:
    if im.mode == "I;16":  # 16-bit grey is scaled by 257, not clipped at 255 (tests/test_untrusted_input.py)
        im = Image.fromarray(np.round(np.asarray(im) / 257.0).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _reference_pixels(im: Image.Image, pre: ImagePreprocessor) -> torch.Tensor:
    img = _reference_on_white(im)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = pre.resize, max(pre.resize, int(pre.resize * long / short))
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        filt = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[pre.resample]
        img = img.resize((new_w, new_h), filt)
    left, top = int(round((new_w - pre.crop) / 2.0)), int(round((new_h - pre.crop) / 2.0))
    img = img.crop((left, top, left + pre.crop, top + pre.crop))
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.numpy().view(np.uint32),
                                                                         b.numpy().view(np.uint32))


def _assert_fast_equals_reference(im: Image.Image, path: Path, pre: ImagePreprocessor) -> None:
    """The image saved as PNG at `path`: load_image and the preprocessor against the references."""
    im.save(path)
    with Image.open(path) as decoded:
        decoded.load()
        want_rgb = np.asarray(_reference_on_white(decoded))
        want = _reference_pixels(decoded, pre)
    assert np.array_equal(np.asarray(load_image(path)), want_rgb), (im.mode, im.size)
    grey = load_image(path, keep_gray=True)
    assert np.array_equal(np.asarray(grey.convert("RGB")), want_rgb), (im.mode, im.size)
    assert _same_bits(pre(str(path))["pixel_values"], want), (im.mode, im.size)


def test_compositing_on_white_equals_alpha_composite_for_every_value_and_alpha():
    value, alpha = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")  # (256, 256) each: all pairs
    rgba = np.stack([value, 255 - value, (value * 7) % 256, alpha], -1).astype(np.uint8)  # (256, 256, 4)
    la = np.stack([value, alpha], -1).astype(np.uint8)  # (256, 256, 2)
    for im in (Image.fromarray(rgba, "RGBA"), Image.fromarray(la, "LA")):
        want = np.asarray(_reference_on_white(im))
        assert np.array_equal(np.asarray(_on_white(im)), want), im.mode
        assert np.array_equal(np.asarray(_on_white(im, keep_gray=True).convert("RGB")), want), im.mode
    assert _on_white(Image.fromarray(la, "LA"), keep_gray=True).mode == "L"


def _synthetic_images() -> list[Image.Image]:
    rng = np.random.default_rng(7)

    def noise(h: int, w: int, c: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    partial = noise(37, 53, 4)
    partial[..., 3] = np.where(rng.random((37, 53)) < 0.3, 0, partial[..., 3])  # holes, edges, opaque
    opaque = noise(90, 61, 4)
    opaque[..., 3] = 255
    palette = Image.fromarray(noise(40, 30, 3)).quantize(16)
    palette.info["transparency"] = 3
    keyed = Image.fromarray(noise(20, 25, 3))
    keyed.info["transparency"] = (1, 2, 3)  # a colour key: ignored, as before
    deep = Image.fromarray(rng.integers(0, 65536, (31, 45), dtype=np.uint16))  # 16-bit grey
    return [
        Image.fromarray(partial, "RGBA"), Image.fromarray(opaque, "RGBA"), palette,
        Image.fromarray(noise(33, 70, 2), "LA"), Image.fromarray(noise(300, 260, 1)[..., 0], "L"),
        Image.fromarray(noise(1, 1, 3)), Image.fromarray(noise(2, 3, 4), "RGBA"),
        Image.fromarray(noise(7, 1, 3)), Image.fromarray(noise(256, 256, 3)),
        Image.fromarray(noise(256, 700, 3)),
        Image.fromarray(noise(613, 257, 3)),
        Image.fromarray(noise(900, 300, 4), "RGBA"),  # the height shrinks most: Pillow's vertical pass first
        Image.fromarray(noise(12, 999, 3)), Image.fromarray(noise(1000, 11, 2), "LA"), keyed, deep,
        Image.fromarray(noise(50, 50, 3)).convert("P"), Image.fromarray(noise(45, 45, 3)).convert("1"),
    ]


@pytest.mark.parametrize(
    "pre",
    [
        ImagePreprocessor(mean=LITE_MEAN, std=LITE_STD),
        ImagePreprocessor(),
        ImagePreprocessor(resize=224, crop=200, resample="bilinear"),  # not a power of two: no exact box
        ImagePreprocessor(resize=64, crop=48),
    ],
)
def test_fast_preprocessing_equals_the_plain_code_on_edge_cases(tmp_path, pre):
    for k, im in enumerate(_synthetic_images()):
        _assert_fast_equals_reference(im, tmp_path / f"{k}.png", pre)


def test_resize_and_crop_equals_resize_then_crop_on_many_sizes():
    rng = np.random.default_rng(3)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 700, (40, 2))] + [(255, 257), (128, 192), (5, 700)]
    for k, (w, h) in enumerate(sizes):
        mode = ("RGB", "L")[k % 2]
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        for size, crop, resample in ((256, 224, "bicubic"), (128, 100, "bilinear"), (300, 300, "bicubic")):
            want = center_crop(resize_shortest(im, size, resample), crop)
            got = resize_and_crop(im, size, crop, resample)
            assert np.array_equal(np.asarray(got), np.asarray(want)), (w, h, mode, size, crop)


def test_fast_preprocessing_equals_the_plain_code_on_every_stamp(tuxpaint_root):
    pres = [ImagePreprocessor(mean=LITE_MEAN, std=LITE_STD), ImagePreprocessor()]
    paths = sorted(tuxpaint_root.rglob("*.png"))
    assert len(paths) > 500
    for k, path in enumerate(paths):  # the two normalisations alternate: every stamp once
        pre = pres[k % 2]
        with Image.open(path) as im:
            im.load()
            want = _reference_pixels(im, pre)
        assert _same_bits(pre(str(path))["pixel_values"], want), path
