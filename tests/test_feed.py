"""Store-fed training (train.feed): the same batches and weights as in memory, bounded reads, named errors."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import torchrun
from safetensors.numpy import load_file
from synthetic_stores import DATASET, make_split, make_stores, overrides

from m3jepa.config import ConfigError, load_pipeline
from m3jepa.core import feeder
from m3jepa.core import paired as train_data
from m3jepa.core.errors import StoreDataError
from m3jepa.core.paired import load_split
from m3jepa.store import open_store, store_path
from m3jepa.train.loop import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
DIRECTIONS = ["image->text", "text->image"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    return make_stores(tmp_path_factory.mktemp("stores"))


def _cfg(stores: Path, run: Path, **extra):
    return load_pipeline(None, overrides(stores, run, **extra))


def _weights(run: Path, which: str = "latest") -> dict[str, np.ndarray]:
    return load_file(str(run / "checkpoints" / which / "model.safetensors"))


def _log(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k != "samples_per_s"} for x in lines]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), f"{k} differs between feed=memory and feed=store"
    assert _log(a) == _log(b)


# ---------------------------------------------------------------- batches


def test_store_batches_equal_memory_batches_for_every_rank(stores, tmp_path):
    cfg = _cfg(stores, tmp_path / "run")
    mem = load_split(cfg, "train", DIRECTIONS, feed="memory")
    lazy = load_split(cfg, "train", DIRECTIONS, feed="store")
    assert lazy.feed == "store" and all(m.features is None for m in lazy.modalities.values())
    assert lazy.dims() == mem.dims()
    for d in DIRECTIONS:
        assert all(np.array_equal(a, b) for a, b in zip(mem.pairs[d], lazy.pairs[d], strict=True))
        for step in (0, 7, 13):  # 13: a later epoch
            for rank, world in ((0, 1), (0, 2), (1, 2)):
                xm, ym = mem.batch(d, 32, 0, step, rank, world)
                xs, ys = lazy.batch(d, 32, 0, step, rank, world)
                src = d.split("->")[0]
                assert xs.dtype == ys.dtype == torch.float32 and xs.shape == (32 // world, mem.dims()[src])
                assert torch.equal(xm, xs) and torch.equal(ym, ys)
    lazy.close()


def _float16_store(root: Path, rows: int, dim: int) -> tuple[Path, np.ndarray]:
    """A float16 zarr store (the encoder default) holding subnormal, normal and large values."""
    from m3jepa.data.records import Record, membership_fingerprint
    from m3jepa.store import Manifest, StoreWriter, rows_from_records

    rng = np.random.default_rng(0)
    scale = rng.choice([1e-6, 1.0, 1e4], (rows, dim))  # float16 subnormals, ordinary and large values
    feats = (rng.standard_normal((rows, dim)) * scale).clip(-6e4, 6e4).astype(np.float16)
    records = [Record(i, f"s{i}", f"g{i}", "image", "x.png") for i in range(rows)]
    manifest = Manifest(
        dataset=DATASET, split="train", modality="image", membership=membership_fingerprint(records),
        rows=rows, encoder="f16", encoder_revision="r1", pooling="none", layers="none", dim=dim,
        dtype="float16", format="zarr", shard_size=128,
    )  # fmt: skip
    with StoreWriter(root, manifest) as w:
        for index, start, end in w.planned_shards():
            w.write_shard(index, feats[start:end])
        w.finalize(rows_from_records(records), [])
    return root, feats


def test_float16_store_rows_are_bit_identical_to_the_in_memory_path(tmp_path):
    path, feats = _float16_store(tmp_path / "f16", 300, 16)
    store = open_store(path)
    in_memory = train_data._read_checked(store)  # what feed=memory indexes
    assert in_memory.dtype == torch.float16 and np.array_equal(in_memory.numpy(), feats)
    ids = np.random.default_rng(1).integers(0, 300, 200)
    reader = feeder.RowReader(store)
    assert reader(ids).dtype == torch.float16
    assert torch.equal(in_memory[torch.from_numpy(ids)].float(), reader(ids).float())
    reader.close()


def test_nonfinite_rows_match_numpy_for_float16_and_float32():
    a = np.random.default_rng(2).standard_normal((64, 9)).astype(np.float16)
    a[3, 1], a[10, 0], a[20, 8], a[30, 4] = np.inf, -np.inf, np.nan, 65504.0  # 65504: largest finite
    for x in (a, a.astype(np.float32)):
        got = feeder._nonfinite_rows(x)
        assert np.array_equal(got, ~np.isfinite(x).all(axis=1))
        assert np.flatnonzero(got).tolist() == [3, 10, 20]


def test_concatenated_inputs_read_from_the_store(tmp_path):
    from test_vqa import _vqa_cfg, make_vqa_split

    make_vqa_split(tmp_path / "vqa", "train", 40, broken=True)
    cfg = _vqa_cfg(tmp_path / "vqa", tmp_path / "run")
    d = "image+question->answer"
    mem = load_split(cfg, "train", [d], feed="memory")
    lazy = load_split(cfg, "train", [d], feed="store")
    for step in range(4):
        (xm, ym), (xs, ys) = mem.batch(d, 16, 0, step), lazy.batch(d, 16, 0, step)
        assert set(xs) == {"image", "question"} and torch.equal(ym, ys)
        assert all(torch.equal(xm[m], xs[m]) for m in xm)


def test_raw_rows_keep_a_bounded_set_of_open_files(tmp_path, monkeypatch):
    from synthetic_stores import write_store

    from m3jepa.data.records import Record

    monkeypatch.setattr(feeder, "MAX_OPEN_CHUNKS", 3)
    n = 700  # shards of 64 rows: 11 chunk files
    feats = np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32)
    records = [Record(i, f"s{i}", f"g{i}", "image", f"{i}.png") for i in range(n)]
    store = open_store(write_store(tmp_path, "train", "image", records, feats))
    raw = feeder.RawRows(store)
    ids = np.random.default_rng(0).integers(0, n, 500)
    assert np.array_equal(raw.read(ids), feats[ids]) and len(raw._fds) == 3
    raw.close()


def test_read_ahead_serves_planned_batches_and_reads_the_unplanned(stores, tmp_path):
    cfg = _cfg(stores, tmp_path / "run")
    lazy = load_split(cfg, "train", DIRECTIONS, feed="store")
    mem = load_split(cfg, "train", DIRECTIONS, feed="memory")
    # a plan that is wrong on odd steps (as the dynamic schedule can be after a validation)
    plan = lambda s: ["image->text"]  # noqa: E731
    # the memory feed reads ahead the same way (the thread indexes and pins; the loop casts)
    ahead = load_split(cfg, "train", DIRECTIONS, feed="memory")
    for split in (lazy, ahead):
        split.readahead = feeder.read_ahead(split, plan, range(2, 12), 32, 0)
        for step in range(2, 12):
            d = DIRECTIONS[step % 2]
            x, y = split.batch(d, 32, 0, step)
            xm, ym = mem.batch(d, 32, 0, step)
            assert torch.equal(x, xm) and torch.equal(y, ym)
        assert split.readahead.misses == 5  # the five text->image steps were read on the spot
        split.close()
        assert split.readahead is None
    resident = dataclasses.replace(mem, feed="device")  # rows indexed where they live: nothing to read
    assert feeder.read_ahead(resident, plan, range(3), 32, 0) is None


def test_memory_read_ahead_gives_the_run_of_reading_on_the_spot(stores, tmp_path, monkeypatch):
    from m3jepa.train import loop

    same = {"train.max_steps": 16, "train.eval_every": 8, "train.schedule": "dynamic", "train.feed": "memory"}
    train(_cfg(stores, tmp_path / "ahead", **same))
    monkeypatch.setattr(loop, "read_ahead", lambda *a, **k: None)
    train(_cfg(stores, tmp_path / "spot", **same))
    _assert_same_run(tmp_path / "ahead", tmp_path / "spot")


# ---------------------------------------------------------------- checks


def test_nan_row_is_named_when_its_batch_is_read(tmp_path):
    import zarr

    bad = tmp_path / "bad"
    for split in ("train", "val", "test"):
        make_split(bad, split, 16)
    from m3jepa.store.backends import checksum, open_shard
    from m3jepa.store.manifest import load_manifest, save_manifest

    path = store_path(bad, DATASET, "train", "image", "syn-image")
    zarr.open_group(str(path / "shards" / "00000.zarr"), mode="r+")["features"][3, 0] = np.inf
    # a store whose manifest agrees with its inf (the writer refuses one, so this forges the checksum,
    # as a store written by another tool could): the checksums pass, and the value check of each batch
    # is what catches it. 32 pairs, batch 32: the one batch holds every row, so step 0 meets row 3
    m = load_manifest(path)
    handle = open_shard(m.format, path / m.shards[0].file)
    m.shards[0].sha256, _ = checksum(handle.arrays)
    handle.close()
    m.shards[0].files = None  # (the file MD5s are not what the store feed checks; drop the stale ones)
    save_manifest(path, m)
    with pytest.raises(StoreDataError, match=r"syn-image.*NaN or infinite.*row 3 \(sample train-g0003\)"):
        train(_cfg(bad, tmp_path / "run", **{"train.feed": "store"}))


def test_auto_feed_follows_the_stores_size(stores, tmp_path, monkeypatch):
    cfg = _cfg(stores, tmp_path / "run")
    assert train_data.resolve_feed(cfg, "train", DIRECTIONS, "auto") == "memory"
    stored = 512 * 32 * 4 + 256 * 48 * 4  # text + image rows x dim x float32
    monkeypatch.setattr(train_data, "ram_bytes", lambda: 4 * stored)  # exactly 25%: not under it
    assert train_data.resolve_feed(cfg, "train", DIRECTIONS, "auto") == "store"
    monkeypatch.setattr(train_data, "ram_bytes", lambda: 4 * stored + 4)
    assert train_data.resolve_feed(cfg, "train", DIRECTIONS, "auto") == "memory"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this host: two copies
    assert train_data.resolve_feed(cfg, "train", DIRECTIONS, "auto") == "store"
    assert train_data.resolve_feed(cfg, "train", DIRECTIONS, "memory") == "memory"
    with pytest.raises(ConfigError, match="train.feed"):
        train_data.resolve_feed(cfg, "train", DIRECTIONS, "disk")
    assert 0 < train_data.ram_bytes() < 1 << 50


# ---------------------------------------------------------------- the real loop


@pytest.mark.parametrize("schedule", ["alternate", "dynamic", "joint"])
def test_store_fed_training_gives_bit_identical_weights(stores, tmp_path, schedule, monkeypatch):
    # dynamic: validation at steps 8 and 16 changes the draws the read-ahead planned; joint: 2 per step
    same = {"train.max_steps": 24, "train.eval_every": 8, "train.schedule": schedule}
    mem, lazy = tmp_path / "mem", tmp_path / "store"
    train(_cfg(stores, mem, **same, **{"train.feed": "memory"}))
    reads = {"n": 0}
    real = feeder.RowReader.__call__

    def counted(self, rows):
        reads["n"] += 1
        return real(self, rows)

    monkeypatch.setattr(feeder.RowReader, "__call__", counted)
    train(_cfg(stores, lazy, **same, **{"train.feed": "store"}))
    assert reads["n"] >= 2 * 24  # the batches really came from the stores: x and y of every step
    _assert_same_run(mem, lazy)


def test_store_fed_resume_after_a_failed_read_is_bit_exact(stores, tmp_path, monkeypatch):
    same = {"train.max_steps": 30, "train.checkpoint_every": 5, "train.feed": "store"}
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train(_cfg(stores, ref, **same))
    calls = {"n": 0}
    real = feeder.RowReader.__call__

    def failing(self, rows):  # the disk goes away after 2 x 13 reads (step 13's batch)
        calls["n"] += 1
        if calls["n"] > 26:
            raise OSError("disk gone")
        return real(self, rows)

    monkeypatch.setattr(feeder.RowReader, "__call__", failing)
    with pytest.raises(OSError, match="disk gone"):
        train(_cfg(stores, cut, **same))
    assert json.loads((cut / "checkpoints/latest/state.json").read_text())["step"] == 10
    monkeypatch.setattr(feeder.RowReader, "__call__", real)
    train(_cfg(stores, cut, **same), resume=True)
    _assert_same_run(ref, cut)


def _torchrun(stores: Path, run: Path, **extra) -> None:
    sets = []
    for s in overrides(stores, run, **extra):
        sets += ["--set", s]
    res = torchrun("-m", "m3jepa", "train-predictor", *sets)  # a free port (tests/launch.py)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_two_process_store_feed_matches_two_process_memory(stores, tmp_path):
    same = {"model.dropout": 0.0, "train.max_steps": 12, "train.eval_every": 6, "train.checkpoint_every": 6}
    _torchrun(stores, tmp_path / "mem", **same, **{"train.feed": "memory"})
    _torchrun(stores, tmp_path / "store", **same, **{"train.feed": "store"})
    _assert_same_run(tmp_path / "mem", tmp_path / "store")
