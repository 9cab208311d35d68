"""Stores damaged or outdated on disk: every loader refuses them naming the store and the item, and a store
whose dataset changed under it is reported stale (issue #11, parts 2 and 3)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic_stores import ENCODERS, make_split, overrides

from m3jepa.config import load_pipeline
from m3jepa.core.paired import load_split, modality_store
from m3jepa.data.records import Record, membership_fingerprint, row_fingerprint
from m3jepa.store import Manifest, StoreError, StoreMismatchError, StoreWriter, store_path
from m3jepa.store.backends import remove_path, write_shard_file
from m3jepa.store.manifest import load_manifest, read_rows

FEEDS = ["memory", "store"]
DIRECTIONS = ["image->text"]


@pytest.fixture
def stores(tmp_path: Path) -> Path:
    """train stores: 40 images (shards 00000 rows 0-63 is all of them) and 80 captions (2 shards of 64)."""
    make_split(tmp_path / "stores", "train", 40)
    return tmp_path / "stores"


def _cfg(stores: Path, tmp_path: Path):
    return load_pipeline(None, overrides(stores, tmp_path / "run"))


def _text_store(stores: Path) -> Path:
    return store_path(stores, "synthetic", "train", "text", ENCODERS["text"])


def _edit_manifest(store: Path, edit) -> None:
    data = json.loads((store / "manifest.json").read_text())
    edit(data)
    (store / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _refused(cfg, feed: str, message: str) -> None:
    with pytest.raises(StoreError) as err:
        load_split(cfg, "train", DIRECTIONS, feed=feed)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def _m3jepa(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "m3jepa", *args], capture_output=True, text=True, env=env, timeout=300
    )


# ---------------------------------------------------------------- part 2: checked when read


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_shard_file_outside_the_store_is_refused(stores, tmp_path, feed, where):
    text = _text_store(stores)
    other = tmp_path / "other"
    shutil.copytree(text, other)  # another store's rows, readable and with matching checksums
    name = (
        str(other / "shards/00000.zarr") if where == "absolute" else "../../../../../other/shards/00000.zarr"
    )
    _edit_manifest(text, lambda m: m["shards"][0].update(file=name))
    _refused(
        _cfg(stores, tmp_path),
        feed,
        f"store {text}: shard 00000 (rows 0-63) names file {name!r}, not its own 'shards/00000.zarr'; "
        f"a manifest may not point outside its store; run `m3jepa stores verify {text}`",
    )


@pytest.mark.parametrize("feed", FEEDS)
def test_missing_chunk_is_refused_on_every_feed(stores, tmp_path, feed):
    text = _text_store(stores)
    (text / "shards/00001.zarr/features/c/0/0").unlink()  # zarr would read its rows as zeros
    _refused(
        _cfg(stores, tmp_path),
        feed,
        f"store {text}: shard 00001 (rows 64-79): chunk shards/00001.zarr/features/c/0/0 (rows 64-79) is "
        f"missing; run `m3jepa stores verify {text}`",
    )


def test_verify_names_the_missing_chunk(stores):
    text = _text_store(stores)
    (text / "shards/00001.zarr/features/c/0/0").unlink()
    out = _m3jepa("stores", "verify", str(text))
    assert out.returncode == 1
    assert f"{text}: CORRUPT" in out.stdout
    assert "  shard 00001: chunk shards/00001.zarr/features/c/0/0 (rows 64-79) is missing" in out.stdout


def test_truncated_chunk_is_refused_by_the_store_feed(stores, tmp_path):
    text = _text_store(stores)
    chunk = text / "shards/00000.zarr/features/c/0/0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    _refused(
        _cfg(stores, tmp_path),
        "store",
        f"store {text}: shard 00000 (rows 0-63): chunk shards/00000.zarr/features/c/0/0 (rows 0-63) has "
        f"100 bytes, a chunk has 8192; run `m3jepa stores verify {text}`",
    )


def test_flipped_byte_is_caught_when_loading_into_memory(stores, tmp_path):
    text = _text_store(stores)
    chunk = text / "shards/00001.zarr/features/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0x01  # a low mantissa bit: still a finite float, same size
    chunk.write_bytes(bytes(data))
    _refused(
        _cfg(stores, tmp_path),
        "memory",
        _mismatch(text, "00001", "64-79"),
    )


def _mismatch(store: Path, shard: str, rows: str) -> str:
    return (f"store {store}: shard {shard} (rows {rows}) does not match the sha256 in its manifest (its "
            f"data changed on disk); run `m3jepa stores verify {store}`, and re-encode it: rerun the "
            "`m3jepa encode` command that wrote it with --force")


# ---------------------------------------------------------------- issue 20 item 1: every reader verifies
# 64 groups, 2 captions each: the text store has two shards of 64 rows, one 8 KiB chunk file each


def _flip(store: Path, tmp_path: Path) -> tuple[str, str]:
    chunk = store / "shards/00001.zarr/features/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0x01  # a low mantissa bit: a finite float, the same size
    chunk.write_bytes(bytes(data))
    return "00001", "64-127"


def _swap(store: Path, tmp_path: Path) -> tuple[str, str]:
    a, b = (store / f"shards/{s}.zarr/features/c/0/0" for s in ("00000", "00001"))
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)  # rows 0-63 now hold rows 64-127's features: each caption paired with another's
    b.write_bytes(da)
    return "00000", "0-63"


def _symlinked_copy(store: Path, tmp_path: Path) -> tuple[str, str]:
    copy = tmp_path / "elsewhere" / "00001.zarr"
    shutil.copytree(store / "shards/00001.zarr", copy)
    chunk = copy / "features/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[8] ^= 0x40
    chunk.write_bytes(bytes(data))
    shutil.rmtree(store / "shards/00001.zarr")
    (store / "shards/00001.zarr").symlink_to(copy, target_is_directory=True)
    return "00001", "64-127"


DAMAGE = {"flipped byte": _flip, "chunks swapped between shards": _swap, "symlink to a modified copy":
          _symlinked_copy}


@pytest.fixture
def stores64(tmp_path: Path) -> Path:
    make_split(tmp_path / "stores", "train", 64)
    return tmp_path / "stores"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_store_feed_verifies_every_shard_before_a_batch(stores64, tmp_path, damage):
    text = _text_store(stores64)
    shard, rows = DAMAGE[damage](text, tmp_path)
    _refused(_cfg(stores64, tmp_path), "store", _mismatch(text, shard, rows))


def test_store_feed_refuses_a_chunk_file_replaced_after_it_verified_it(stores64, tmp_path):
    from m3jepa.core.errors import StoreDataError

    text = _text_store(stores64)
    data = load_split(_cfg(stores64, tmp_path), "train", DIRECTIONS, feed="store")  # verified here
    chunk = text / "shards/00001.zarr/features/c/0/0"
    replacement = tmp_path / "new"
    replacement.write_bytes(chunk.read_bytes())
    os.replace(replacement, chunk)  # the same bytes even: another file than the one hashed
    with pytest.raises(StoreDataError, match=r"chunk 0 of shard 00001 \(rows 64\.\.\): shards/00001\.zarr/"
                       r"features/c/0/0 was replaced or written to after the store feed verified it"):
        data.modalities["text"].take(np.arange(60, 70))
    data.close()


def test_store_feed_refusal_through_the_cli_is_one_line(stores64, tmp_path):
    text = _text_store(stores64)
    _swap(text, tmp_path)
    sets = [x for s in overrides(stores64, tmp_path / "run", **{"train.feed": "store", "train.max_steps": 2})
            for x in ("--set", s)]
    out = _m3jepa("train-predictor", *sets)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == f"error: {_mismatch(text, '00000', '0-63')}"
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def embed_model(tmp_path_factory):
    from m3jepa.api import load
    from m3jepa.train.loop import train

    root = tmp_path_factory.mktemp("embed")
    for split in ("train", "val", "test"):
        make_split(root / "stores", split, 64)
    sets = {"runtime.device": "cpu", "train.max_steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2}
    train(load_pipeline(None, overrides(root / "stores", root / "run", **sets)))
    return root, load(root / "run", device="cpu")


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_embed_verifies_every_shard_it_reads(embed_model, tmp_path, damage):
    from m3jepa.search import embed_store

    root, model = embed_model
    source = tmp_path / "text"
    shutil.copytree(_text_store(root / "stores"), source)
    shard, rows = DAMAGE[damage](source, tmp_path)
    with pytest.raises(StoreError) as err:
        embed_store(model, source, tmp_path / "out")
    assert str(err.value) == _mismatch(source, shard, rows)


def test_embed_cli_refuses_a_flipped_test_chunk(embed_model, tmp_path):
    root, _ = embed_model
    text = store_path(root / "stores", "synthetic", "test", "text", ENCODERS["text"])
    chunk = text / "shards/00001.zarr/features/c/0/0"
    good = chunk.read_bytes()
    try:
        _flip(text, tmp_path)
        out = _m3jepa("embed", "--run", str(root / "run"), "--split", "test", "--modality", "text",
                      "--out", str(tmp_path / "out"), "--device", "cpu")
    finally:
        chunk.write_bytes(good)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == f"error: {_mismatch(text, '00001', '64-127')}"


@pytest.mark.parametrize("feed", FEEDS)
def test_swapped_group_ids_in_rows_jsonl_are_caught(stores, tmp_path, feed):
    text = _text_store(stores)
    lines = [json.loads(line) for line in (text / "rows.jsonl").read_text().splitlines()]
    lines[0]["group_id"], lines[2]["group_id"] = lines[2]["group_id"], lines[0]["group_id"]
    assert lines[0]["group_id"] != lines[2]["group_id"]
    (text / "rows.jsonl").write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in lines))
    _refused(
        _cfg(stores, tmp_path),
        feed,
        f"store {text}: rows.jsonl does not match the manifest's rows_sha256 (its ids, group ids, captions "
        f"or validity changed on disk); run `m3jepa stores verify {text}`",
    )


def test_store_without_rows_hash_loads_with_one_warning(stores, tmp_path, caplog):
    text = _text_store(stores)
    _edit_manifest(text, lambda m: m.pop("rows_sha256"))  # as written before the field existed
    cfg = _cfg(stores, tmp_path)
    with caplog.at_level(logging.WARNING, logger="m3jepa.store.reader"):
        for feed in FEEDS:
            split = load_split(cfg, "train", DIRECTIONS, feed=feed)
            assert split.num_pairs("image->text") == 80
            split.close()
    warnings = [r.getMessage() for r in caplog.records if "rows.jsonl was hashed" in r.getMessage()]
    assert warnings == [
        f"store {text} was written before rows.jsonl was hashed into its manifest, so edits to its ids, "
        "group ids or captions cannot be detected; refresh it: rerun the `m3jepa encode` command that "
        "wrote it with --force"
    ]


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("bad", ["dim", "dtype"])
def test_shard_of_wrong_dim_or_dtype_names_the_field(stores, tmp_path, feed, bad):
    text = _text_store(stores)
    shard = text / "shards/00001.zarr"
    feats = np.ones((16, 31), np.float32) if bad == "dim" else np.ones((16, 32), np.float16)
    remove_path(shard)
    write_shard_file("zarr", shard, {"features": feats})
    detail = (
        "features have shape (16, 31), the manifest says (16, 32) (rows 64-79, dim 32)"
        if bad == "dim"
        else "features are float16, the manifest says float32 (dtype)"
    )
    _refused(
        _cfg(stores, tmp_path),
        feed,
        f"store {text}: shard 00001 (rows 64-79): shards/00001.zarr {detail}; "
        f"run `m3jepa stores verify {text}`",
    )


# ---------------------------------------------------------------- part 3: caching looks at content


def test_resume_from_other_content_is_refused(tmp_path):
    records = [Record(i, f"s{i}", f"g{i}", "text", f"caption {i}") for i in range(8)]
    manifest = Manifest(
        dataset="toy",
        split="train",
        modality="text",
        membership=membership_fingerprint(records),
        rows=8,
        encoder="e",
        encoder_revision="r",
        pooling="none",
        layers="last",
        dim=4,
        shard_size=4,
        content="a" * 64,
        content_hash="stat",
    )
    path = tmp_path / "s"
    with StoreWriter(path, manifest) as w:
        w.write_shard(0, np.ones((4, 4), np.float32))  # then killed: shard 00001 never written
    manifest.content = "b" * 64  # the same ids, edited captions
    with pytest.raises(StoreMismatchError) as err:
        StoreWriter(path, manifest).open()
    assert str(err.value) == (
        f"{path} was started from other captions or media files than the dataset holds now (its content "
        "fingerprint differs); re-encode it: rerun `m3jepa encode` with --force"
    )


def test_row_fingerprint_stat_sees_a_touch_and_sha256_sees_only_bytes(tmp_path):
    media = tmp_path / "a.png"
    media.write_bytes(b"x" * 10)
    record = Record(0, "a", "a", "image", str(media))
    stat, digest = row_fingerprint(record, "stat"), row_fingerprint(record, "sha256")
    os.utime(media, ns=(1, 1))  # same bytes, another mtime (a copy)
    assert row_fingerprint(record, "stat") == "stat:10:1" != stat
    assert (
        row_fingerprint(record, "sha256")
        == digest
        == "sha256:" + hashlib.sha256(b"x" * 10).hexdigest()
    )
    assert row_fingerprint(Record(0, "a#0", "a", "text", "A cat."), "stat").startswith("text:")


def _jsonl(root: Path, copy_png, captions: list[str]) -> Path:
    lines = []
    for k, caption in enumerate(captions, start=1):
        if not (root / f"img/item{k}.png").exists():
            copy_png(root / f"img/item{k}.png", k)
        lines.append(
            json.dumps(
                {"id": f"item{k}", "image": f"img/item{k}.png", "caption": [caption], "split": "train"}
            )
        )
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_edited_captions_and_replaced_image_make_stores_stale(tmp_path, copy_png):
    root = _jsonl(tmp_path / "data", copy_png, ["A cat.", "A dog.", "A cow."])
    stores = tmp_path / "stores"
    args = [
        "encode",
        "--dataset",
        "jsonl",
        "--root",
        str(root),
        "--split",
        "train",
        "--modality",
        "image,text",
        "--store-root",
        str(stores),
        "--workers",
        "0",
    ]
    first = _m3jepa(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    text = store_path(stores, "jsonl", "train", "text", "minilm-l6", data_root=root)
    image = store_path(stores, "jsonl", "train", "image", "efficientnet-lite0", data_root=root)
    assert text.parent.parent.parent.name.startswith("jsonl-") and load_manifest(text).data_root == str(root)

    _jsonl(root, copy_png, ["A black cat.", "A brown dog.", "A white cow."])  # same ids, every caption edited
    copy_png(root / "img/item2.png", 6)  # another picture under the same name
    stale = _m3jepa(*args)
    assert stale.returncode == 2
    assert (
        f"error: {image} is stale: 1 of 3 rows changed since it was written (1 media files; first: item2) "
        "(and 1 more stale stores); re-encode: rerun this `m3jepa encode` command with --force"
    ) in stale.stderr
    assert "Traceback" not in stale.stderr

    out = _m3jepa("stores", "verify", str(text), "--root", str(root))
    assert out.returncode == 1 and f"{text}: STALE" in out.stdout
    assert (
        f"  stale: {text} is stale: 3 of 3 rows changed since it was written (3 captions; first: item1#0, "
        "item2#0, item3#0)"
    ) in out.stdout
    out = _m3jepa("stores", "verify", str(image), "--dataset", "jsonl", "--root", str(root))
    assert out.returncode == 1 and "(1 media files; first: item2)" in out.stdout

    forced = _m3jepa(*args, "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert [r.text for r in read_rows(text)] == ["A black cat.", "A brown dog.", "A white cow."]
    out = _m3jepa("stores", "verify", str(image), "--root", str(root))
    assert out.returncode == 0 and f"{image}: OK" in out.stdout
    again = _m3jepa(*args)
    assert again.returncode == 0 and "all 2 stores cached; no encoder loaded" in again.stdout


@pytest.mark.slow
def test_two_jsonl_folders_get_two_stores_and_stage_2_finds_each(tmp_path, copy_png):
    roots = [_jsonl(tmp_path / name, copy_png, [f"{name} one.", f"{name} two."]) for name in ("a", "b")]
    stores = tmp_path / "stores"
    for root in roots:
        out = _m3jepa(
            "encode",
            "--dataset",
            "jsonl",
            "--root",
            str(root),
            "--split",
            "train",
            "--modality",
            "text",
            "--store-root",
            str(stores),
            "--workers",
            "0",
        )
        assert out.returncode == 0, out.stderr[-3000:]
    paths = [store_path(stores, "jsonl", "train", "text", "minilm-l6", data_root=r) for r in roots]
    assert paths[0] != paths[1] and all(p.is_dir() for p in paths)
    listing = _m3jepa("stores", "list", str(stores)).stdout
    assert all(str(r) in listing for r in roots)
    for root, path in zip(roots, paths, strict=True):
        cfg = load_pipeline(
            None,
            [
                'encode.dataset="jsonl"',
                f'encode.root="{root}"',
                f'encode.store_root="{stores}"',
                f'run_dir="{tmp_path / "run"}"',
            ],
        )
        assert modality_store(cfg, "train", "text") == path
        assert [r.text for r in read_rows(path)] == [f"{root.name} one.", f"{root.name} two."]
