"""Stage 1 on untrusted input: images decode as a person sees them, and bad files, captions, disks and
option values are one clear line (or, with --skip-bad, a listed skip) and never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m3jepa.data.media import load_image
from m3jepa.data.records import BadItemError
from m3jepa.store import open_store
from m3jepa.store.manifest import load_manifest, read_rows

# ---------------------------------------------------------------- images as a person sees them

# Six flat 8x8 blocks (JPEG codes a flat block exactly at quality 100), 16 rows x 24 columns.
BLOCKS = np.kron(np.array([[10, 60, 110], [160, 210, 250]], dtype=np.uint8), np.ones((8, 8), dtype=np.uint8))
# What each EXIF orientation asks a viewer to do to the stored pixels (EXIF 2.32, tag 0x0112).
UPRIGHT = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),  # stored lying on its left side: turn 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).T,
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_of_a_jpeg_is_applied(tmp_path, orientation):
    im = Image.fromarray(BLOCKS, "L")
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    im.save(path, quality=100, exif=exif.tobytes())
    with Image.open(path) as stored:
        assert np.array_equal(np.asarray(stored), BLOCKS)  # the file holds the pixels unrotated

    want = UPRIGHT[orientation](BLOCKS)
    grey = load_image(path, keep_gray=True)
    assert grey.mode == "L" and np.array_equal(np.asarray(grey), want)
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (*want.shape, 3) and all(np.array_equal(rgb[..., c], want) for c in range(3))


def test_16_bit_png_is_scaled_by_257(tmp_path):
    gradient = np.arange(0, 65536, 257, dtype=np.uint16)  # 0, 257, ..., 65535: every 8-bit level once
    edges = np.array([0, 128, 129, 385, 386, 25700, 65406, 65407] * 32, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(np.stack([gradient, edges])).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    out = np.asarray(load_image(path, keep_gray=True))
    assert out.dtype == np.uint8
    assert out[0].tolist() == list(range(256))
    assert out[1, :8].tolist() == [0, 0, 1, 1, 2, 100, 254, 255]  # round(v / 257): 257 k + 128 is the edge


@pytest.mark.parametrize(("values", "dtype", "mode", "want"), [
    ([-1000, 0, 1000, 3000], np.int32, "I", [0, 64, 128, 255]),  # beyond 8 bits: its own range, stretched
    ([0, 7, 200, 255], np.int32, "I", [0, 7, 200, 255]),  # 8-bit values in a 32-bit container: kept
    ([0.0, 0.25, 0.5, 1.0], np.float32, "F", [0, 64, 128, 255]),  # floats in [0, 1]: times 255
    ([3.4, 99.5, 100.5, 250.6], np.float32, "F", [3, 100, 100, 251]),  # floats in 0..255: rounded
    ([5000, 5000, 5000, 5000], np.int32, "I", [255, 255, 255, 255]),  # flat beyond 255: clipped
])
def test_32_bit_tiff_is_scaled_by_its_range(tmp_path, values, dtype, mode, want):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([values], dtype=dtype)).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
    assert np.asarray(load_image(path, keep_gray=True)).tolist() == [want]


def test_32_bit_float_tiff_with_nan_is_a_bad_item(tmp_path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)).save(path)
    with pytest.raises(BadItemError, match=r"^item7: F image holds NaN or infinite pixels; save it with"):
        load_image(path, "item7")


# ---------------------------------------------------------------- the real CLI on a tiny jsonl dataset


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _m3jepa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m3jepa", *args], capture_output=True, text=True, env=_env(),
                          timeout=300)


def _dataset(root: Path, copy_png, extra_caption: str | None = None) -> Path:
    """Five train pairs item1..item5, one caption each; `extra_caption` becomes item3's second caption."""
    lines = []
    for k in range(1, 6):
        copy_png(root / f"img/item{k}.png", k)
        captions = [f"A stamp number {k}."] + ([extra_caption] if k == 3 and extra_caption else [])
        lines.append(json.dumps({"id": f"item{k}", "image": f"img/item{k}.png", "caption": captions,
                                 "split": "train"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="ascii")  # \u escapes stay escapes
    return root


def _encode(root: Path, stores: Path, *extra: str, modality: str = "text", shard_size: int = 2) -> list[str]:
    return ["encode", "--dataset", "jsonl", "--root", str(root), "--split", "train", "--modality", modality,
            "--store-root", str(stores), "--shard-size", str(shard_size), "--workers", "0", *extra]


def _text_store(stores: Path) -> Path:
    matches = sorted(p.parent for p in stores.rglob("manifest.json") if "/train/text/" in p.as_posix())
    assert len(matches) == 1, matches
    return matches[0]


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_invalid_utf8_in_pairs_jsonl_names_the_file_and_line(tmp_path, copy_png):
    root = _dataset(tmp_path / "data", copy_png)
    path = root / "pairs.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"A stamp", b"A st\xffamp")  # line 2, byte 0xff at its 78th byte
    path.write_bytes(b"\n".join(lines))
    column = lines[1].index(b"\xff") + 1
    line = _one_line_error(_m3jepa(*_encode(root, tmp_path / "stores")))
    assert line == (f"error: {path}:2: not valid UTF-8 (byte 0xff at byte {column} of the line); "
                    f"save pairs.jsonl as UTF-8")
    assert not list(tmp_path.rglob("manifest.json"))  # refused before any store was started


@pytest.mark.slow
def test_lone_surrogate_caption_is_refused_then_skipped_with_good_rows_intact(tmp_path, copy_png):
    root = _dataset(tmp_path / "data", copy_png, extra_caption="bad \udc80 caption")
    stores = tmp_path / "stores"
    line = _one_line_error(_m3jepa(*_encode(root, stores)))
    assert line.startswith("error: jsonl train/text item3#1: text holds a lone surrogate '\\udc80' at "
                           "character 4, which is not a character"), line
    assert "fix the text in the dataset, or pass --skip-bad" in line
    assert line.endswith("(1 such row(s) in train/text)")
    assert not list(stores.rglob("manifest.json"))  # refused before any store was started

    ok = _m3jepa(*_encode(root, stores, "--skip-bad"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    store = _text_store(stores)
    assert _m3jepa("stores", "verify", str(store)).returncode == 0
    manifest = load_manifest(store)
    assert [(s["row_id"], s["sample_id"]) for s in manifest.skipped] == [(3, "item3#1")]
    assert manifest.skipped[0]["reason"].startswith("text holds a lone surrogate '\\udc80' at character 4")
    rows = read_rows(store)
    assert [(r.sample_id, r.valid) for r in rows] == [
        ("item1#0", True), ("item2#0", True), ("item3#0", True), ("item3#1", False), ("item4#0", True),
        ("item5#0", True)]
    assert rows[3].text == "bad \\udc80 caption"  # written escaped, so rows.jsonl stays valid UTF-8
    feats = open_store(store).read_all()  # (6, 384)
    assert not feats[3].any()

    # The good rows hold exactly what a dataset without the bad caption gives them.
    clean_root = _dataset(tmp_path / "clean", copy_png)
    clean_stores = tmp_path / "clean_stores"
    assert _m3jepa(*_encode(clean_root, clean_stores, shard_size=64)).returncode == 0
    clean = open_store(_text_store(clean_stores)).read_all()  # (5, 384)
    assert _m3jepa(*_encode(root, tmp_path / "one_shard", "--skip-bad", shard_size=64)).returncode == 0
    skipped = open_store(_text_store(tmp_path / "one_shard")).read_all()
    assert np.array_equal(skipped[[0, 1, 2, 4, 5]], clean) and not skipped[3].any()


FAULT = """
import errno, os, sys
import m3jepa.store.writer as w
real, calls = w.write_shard_file, []
def failing(fmt, path, arrays):
    calls.append(path)
    if len(calls) == {at}:
        raise OSError(errno.{code}, os.strerror(errno.{code}), str(path))
    return real(fmt, path, arrays)
w.write_shard_file = failing
from m3jepa.cli import main
sys.argv = ["m3jepa", *{args!r}]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize(("code", "cause", "fix"), [
    ("ENOSPC", "the disk is full (No space left on device)", "free space on it"),
    ("EROFS", "the folder is read-only (Read-only file system)", "make it writable"),
])
def test_full_disk_or_read_only_folder_keeps_finished_shards(tmp_path, copy_png, code, cause, fix):
    root = _dataset(tmp_path / "data", copy_png, extra_caption="A second caption.")  # 6 rows, 3 shards
    stores = tmp_path / "stores"
    args = _encode(root, stores)
    script = FAULT.format(at=2, code=code, args=args)  # the second shard's write fails
    failed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(),
                            timeout=300)
    line = _one_line_error(failed)
    store = _text_store(stores)
    assert line.startswith(f"error: cannot write {store}/shards/00001.zarr.tmp-"), line
    assert line.endswith(f": {cause}; kept: 1 of 3 finished shards of {store} and every store finished "
                         f"before it; {fix}, then rerun the same command: it resumes from the finished "
                         f"shards")
    sidecar = (store / "shards/00000.json").read_bytes()
    assert not (store / "shards/00001.json").exists() and not load_manifest(store).complete

    ok = _m3jepa(*args)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "1 of this rank's 3 shards already written; resuming" in ok.stderr
    assert (store / "shards/00000.json").read_bytes() == sidecar  # the finished shard was kept, not redone
    assert load_manifest(store).complete and _m3jepa("stores", "verify", str(store)).returncode == 0


@pytest.mark.slow
def test_read_only_store_root_for_real(tmp_path, copy_png):
    root = _dataset(tmp_path / "data", copy_png)
    stores = tmp_path / "stores"
    assert _m3jepa(*_encode(root, stores)).returncode == 0  # the text store is finished
    text = _text_store(stores)
    before = {p: p.read_bytes() for p in text.rglob("*") if p.is_file()}
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    mount = subprocess.run(["mount", "--bind", "-o", "ro", str(stores), str(readonly)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here (needs root with CAP_SYS_ADMIN): {mount.stderr!r}")
    try:
        line = _one_line_error(_m3jepa(*_encode(root, readonly, modality="image")))
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    image_dir = readonly / "jsonl"
    assert line.startswith(f"error: cannot write {image_dir}"), line
    assert ": the folder is read-only (Read-only file system); kept: 0 of 3 finished shards of " in line
    assert line.endswith("make it writable, then rerun the same command: it resumes from the finished shards")
    assert {p: p.read_bytes() for p in text.rglob("*") if p.is_file()} == before  # the finished store stays

    ok = _m3jepa(*_encode(root, stores, modality="image,text"))  # writable again: completes, text cached
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"cached: {text}" in ok.stderr
    assert len(list(stores.rglob("manifest.json"))) == 2


# ---------------------------------------------------------------- option values that do not exist


@pytest.mark.slow
def test_unknown_modality_names_the_valid_ones(tmp_path, copy_png):
    root = _dataset(tmp_path / "data", copy_png)
    line = _one_line_error(_m3jepa(*_encode(root, tmp_path / "stores", modality="imge")))
    assert line == ("error: jsonl has no modality 'imge' (did you mean 'image'?); pass --modality with some "
                    "of image, text (comma-separated), or all")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["encode", "train-predictor"])
def test_unknown_dataset_suggests_the_closest(tmp_path, command):
    from m3jepa.data import list_datasets

    if command == "encode":
        args = ["encode", "--dataset", "jsonll", "--store-root", str(tmp_path / "stores")]
    else:
        pipeline = Path(__file__).resolve().parents[1] / "pipelines" / "tuxpaint.toml"
        args = ["train-predictor", "--pipeline", str(pipeline), "--dataset", "jsonll", "--run",
                str(tmp_path / "run"), "--store-root", str(tmp_path / "stores")]
    line = _one_line_error(_m3jepa(*args))
    assert line == (f"error: unknown dataset 'jsonll' (did you mean 'jsonl'?); known datasets: "
                    f"{', '.join(list_datasets())}")
