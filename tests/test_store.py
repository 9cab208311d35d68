"""Feature store: round trips on both backends, resume byte-identity, refusals, locks, verify."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3jepa.data.records import Record, membership_fingerprint
from m3jepa.store import (
    IncompleteStoreError,
    Manifest,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    StoreWriter,
    encoder_slug,
    is_complete,
    list_stores,
    open_store,
    plan_shards,
    rows_from_records,
    store_path,
    verify_store,
)
from m3jepa.store.cli_views import inspect_view, list_view
from m3jepa.store.manifest import assign_shards, load_manifest

FORMATS = ["zarr", "hdf5"]
DIM = 8


def make_records(n: int, modality: str = "text") -> list[Record]:
    return [Record(i, f"s{i}", f"g{i // 5}", modality, f"caption {i}") for i in range(n)]


def make_manifest(n: int, **kw) -> Manifest:
    base = dict(
        dataset="toy",
        split="train",
        modality="text",
        membership=membership_fingerprint(make_records(n)),
        rows=n,
        encoder="hf:/tmp/Enc",
        encoder_revision="abc",
        pooling="mean",
        layers="last",
        dim=DIM,
        shard_size=16,
    )
    base.update(kw)
    return Manifest(**base)


def make_data(n: int, kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, DIM)).astype(np.float32)
    if kind == "pooled":
        return feats, None
    counts = rng.integers(0, 6, size=n)
    tokens = [rng.standard_normal((c, DIM)).astype(np.float32) for c in counts]
    return feats, tokens


def write_store(path: Path, m: Manifest, feats, tokens=None, *, only=None, skipped=(), finalize=True):
    """Write shards of `m` (all, or the indices in `only`) and optionally finalize."""
    with StoreWriter(path, m) as w:
        done = w.done_shards()
        for index, start, end in w.my_shards():
            if index in done or (only is not None and index not in only):
                continue
            if tokens is None:
                w.write_shard(index, feats[start:end])
            else:
                part = tokens[start:end]
                offsets = np.concatenate([[0], np.cumsum([len(t) for t in part])]).astype(np.int64)
                stacked = np.concatenate(part) if part else np.zeros((0, DIM), np.float32)
                w.write_shard(index, feats[start:end], stacked, offsets)
        if finalize:
            skip_ids = {s["row_id"] for s in skipped}
            return w.finalize(rows_from_records(make_records(m.rows), skip_ids), list(skipped))
    return None


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["pooled", "tokens"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, fmt, kind, dtype):
    n = 53  # 4 shards, the last one partial
    m = make_manifest(n, format=fmt, kind=kind, dtype=dtype)
    feats, tokens = make_data(n, kind)
    write_store(tmp_path / "s", m, feats, tokens)
    store = open_store(tmp_path / "s")
    expect = feats.astype(dtype).astype(np.float32)
    assert len(store) == n and store.manifest.complete
    np.testing.assert_array_equal(store.read_all(), expect)
    ids = np.random.default_rng(1).permutation(n)
    np.testing.assert_array_equal(store.read(ids), expect[ids])
    np.testing.assert_array_equal(store.read(np.array([5, 5, 40, 0])), expect[[5, 5, 40, 0]])
    assert store.read(ids[:3], dtype=None).dtype == np.dtype(dtype)
    batches = list(store.iter_batches(10))
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), np.arange(n))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), store.read_all())
    assert store.rows.sample_ids[7] == "s7" and store.rows.group_ids[7] == "g1"
    assert store.rows.texts[7] == "caption 7" and store.rows.valid.all()
    if kind == "tokens":
        got = store.read_tokens(ids)
        for i, t in zip(ids, got, strict=True):
            np.testing.assert_array_equal(t, tokens[i].astype(dtype).astype(np.float32))
        np.testing.assert_array_equal(store.token_counts(), [len(t) for t in tokens])
    assert verify_store(tmp_path / "s").ok
    store.close()


def test_backends_agree(tmp_path):
    feats, _ = make_data(40, "pooled")
    for fmt in FORMATS:
        write_store(tmp_path / fmt, make_manifest(40, format=fmt), feats)
    z, h = open_store(tmp_path / "zarr"), open_store(tmp_path / "hdf5")
    np.testing.assert_array_equal(z.read_all(), h.read_all())
    assert z.rows.sample_ids == h.rows.sample_ids
    assert [s.sha256 for s in z.manifest.shards] == [s.sha256 for s in h.manifest.shards]


def test_skipped_rows_and_pickling(tmp_path):
    import pickle

    n = 20
    feats, _ = make_data(n, "pooled")
    feats[3] = 0
    skipped = [{"row_id": 3, "sample_id": "s3", "reason": "bad image"}]
    m = write_store(tmp_path / "s", make_manifest(n, format="hdf5"), feats, skipped=skipped)
    assert m.skipped == skipped
    store = open_store(tmp_path / "s")
    assert not store.rows.valid[3] and store.rows.valid.sum() == n - 1
    store.read([0])
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.read([3, 4]), store.read([3, 4]))


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["pooled", "tokens"])
def test_resume_is_byte_identical(tmp_path, fmt, kind):
    n = 70
    m = make_manifest(n, format=fmt, kind=kind)
    feats, tokens = make_data(n, kind)
    write_store(tmp_path / "once", m, feats, tokens)
    # An interrupted run: two shards committed, a killed shard's temporary left behind.
    write_store(tmp_path / "twice", m, feats, tokens, only={0, 3}, finalize=False)
    (tmp_path / "twice/shards/00001.json.tmp-999").write_text("{")
    (tmp_path / "twice/manifest.json.tmp-999").write_text("{")
    stray = tmp_path / "twice/shards" / f"00002{'.zarr' if fmt == 'zarr' else '.h5'}.tmp-999"
    stray.mkdir() if fmt == "zarr" else stray.write_bytes(b"partial")
    with pytest.raises(IncompleteStoreError, match="2 of 5 shards"):
        open_store(tmp_path / "twice")
    with StoreWriter(tmp_path / "twice", m) as w:
        assert w.done_shards() == {0, 3}
        assert not stray.exists() and not (tmp_path / "twice/shards/00001.json.tmp-999").exists()
    write_store(tmp_path / "twice", m, feats, tokens)
    once, twice = tree_bytes(tmp_path / "once"), tree_bytes(tmp_path / "twice")
    assert sorted(once) == sorted(twice)
    assert [k for k in once if once[k] != twice[k]] == []
    assert not any(".lock" in k for k in once)


def test_two_ranks_match_one(tmp_path):
    n = 70
    m = make_manifest(n, format="hdf5")
    feats, _ = make_data(n, "pooled")
    write_store(tmp_path / "one", m, feats)
    ranks = [StoreWriter(tmp_path / "two", m, rank=r, world_size=2).open() for r in (1, 0)]
    for w in ranks:  # rank 1 opens first: it must not need rank 0's manifest
        assert [i for i, _, _ in w.my_shards()] == list(range(w.rank, 5, 2))
        for index, start, end in w.my_shards():
            w.write_shard(index, feats[start:end])
    with pytest.raises(StoreError, match="only rank 0"):
        ranks[0].finalize([], [])
    ranks[1].finalize(rows_from_records(make_records(n)), [])
    for w in ranks:
        w.close()
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def test_uncommitted_shard_is_rewritten(tmp_path):
    m = make_manifest(40)
    feats, _ = make_data(40, "pooled")
    write_store(tmp_path / "s", m, feats, only={1}, finalize=False)
    (tmp_path / "s/shards/00001.json").unlink()  # killed after the rename, before the sidecar
    with StoreWriter(tmp_path / "s", m) as w:
        assert w.done_shards() == set()
    write_store(tmp_path / "s", m, feats)
    assert verify_store(tmp_path / "s").ok


def test_is_complete(tmp_path):
    m = make_manifest(20)
    feats, _ = make_data(20, "pooled")
    assert not is_complete(tmp_path / "s", m)
    write_store(tmp_path / "s", m, feats, only={0}, finalize=False)
    assert not is_complete(tmp_path / "s", m)
    write_store(tmp_path / "s", m, feats)
    assert is_complete(tmp_path / "s", m)
    assert not is_complete(tmp_path / "s", make_manifest(20, dtype="float32"))


# ---------------------------------------------------------------- refusals


MISMATCHES = {
    "encoder": "other",
    "encoder_revision": "def",
    "dtype": "float32",
    "kind": "tokens",
    "dim": DIM + 1,
    "format": "hdf5",
    "shard_size": 8,
    "membership": "0" * 64,
    "rows": 21,
    "layers": "last2",
    "pooling": "cls",
}


@pytest.mark.parametrize("field", sorted(MISMATCHES))
def test_mismatch_refused(tmp_path, field):
    write_store(tmp_path / "s", make_manifest(20), make_data(20, "pooled")[0], only={0}, finalize=False)
    asked = make_manifest(20, **{field: MISMATCHES[field]})
    with pytest.raises(StoreMismatchError) as err, StoreWriter(tmp_path / "s", asked):
        pass
    msg = str(err.value)
    assert f"{field}: asked {MISMATCHES[field]!r}" in msg and "delete the store directory" in msg
    assert "--store-root" in msg
    with StoreWriter(tmp_path / "s", make_manifest(20)) as w:  # the refusal released the lock
        assert w.done_shards() == {0}


def test_bad_values_refused(tmp_path):
    m = make_manifest(20)
    feats, _ = make_data(20, "pooled")
    with StoreWriter(tmp_path / "s", m) as w:
        bad = feats[:16].copy()
        bad[2, 3] = np.nan
        with pytest.raises(ValueError, match="shard 00000.*NaN"):
            w.write_shard(0, bad)
        with pytest.raises(ValueError, match="overflow float16"):
            w.write_shard(0, feats[:16] * 1e6)
        with pytest.raises(ValueError, match=r"shape \(15, 8\)"):
            w.write_shard(0, feats[:15])
        with pytest.raises(ValueError, match="tokens/offsets"):
            w.write_shard(0, feats[:16], feats[:3], np.zeros(17, np.int64))
        with pytest.raises(IncompleteStoreError, match="2 of 2 shards"):
            w.finalize(rows_from_records(make_records(20)), [])
        assert w.done_shards() == set()


def test_open_store_refusals(tmp_path):
    with pytest.raises(StoreError, match="not a feature store"):
        open_store(tmp_path)
    write_store(tmp_path / "s", make_manifest(20), make_data(20, "pooled")[0])
    data = json.loads((tmp_path / "s/manifest.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "s/manifest.json").write_text(json.dumps(data))
    with pytest.raises(StoreError, match="schema_version 99"):
        open_store(tmp_path / "s")


# ---------------------------------------------------------------- locks


HOLDER = textwrap.dedent("""
    import sys, time
    from m3jepa.store.lock import StoreLock
    StoreLock(sys.argv[1], 0).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_lock_held_by_another_process(tmp_path):
    m = make_manifest(20)
    (tmp_path / "s").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "s")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"process {holder.pid}"), StoreWriter(tmp_path / "s", m):
            pass
        with StoreWriter(tmp_path / "s", m, rank=1, world_size=2):  # another rank has its own lock
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with StoreWriter(tmp_path / "s", m) as w:  # the OS released the killed holder's flock
        assert w.done_shards() == set()


def test_lock_in_process(tmp_path):
    m = make_manifest(20)
    with StoreWriter(tmp_path / "s", m), pytest.raises(StoreLockedError, match=str(os.getpid())):
        StoreWriter(tmp_path / "s", m).open()


# ---------------------------------------------------------------- verify


def _flip_byte_in_largest_file(store: Path) -> Path:
    files = [p for p in (store / "shards").rglob("*") if p.is_file() and not p.name.endswith(".json")]
    largest = max(files, key=lambda p: (p.stat().st_size, str(p)))
    data = bytearray(largest.read_bytes())
    data[-64] ^= 0x40
    largest.write_bytes(bytes(data))
    return largest


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_catches_flipped_byte(tmp_path, fmt):
    n = 40
    write_store(tmp_path / "s", make_manifest(n, format=fmt, shard_size=32), make_data(n, "pooled")[0])
    assert verify_store(tmp_path / "s").ok
    _flip_byte_in_largest_file(tmp_path / "s")
    report = verify_store(tmp_path / "s")
    assert not report.ok and list(report.shard_problems) == [0]
    assert "sha256 mismatch" in report.shard_problems[0][0]
    assert "shard 00000" in report.text() and "CORRUPT" in report.text()


def test_verify_catches_truncated_rows_and_missing_shard(tmp_path):
    write_store(tmp_path / "s", make_manifest(40, format="hdf5"), make_data(40, "pooled")[0])
    rows = tmp_path / "s/rows.jsonl"
    rows.write_text("".join(rows.read_text().splitlines(keepends=True)[:-1]))
    (tmp_path / "s/shards/00001.h5").unlink()
    report = verify_store(tmp_path / "s")
    assert not report.ok
    assert any("39 lines" in p for p in report.problems)
    assert report.shard_problems[1] == ["shards/00001.h5 is missing"]


# ---------------------------------------------------------------- planning and layout


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(0, 5000), shard_size=st.integers(1, 700))
def test_plan_partitions_rows(rows, shard_size):
    plan = plan_shards(rows, shard_size)
    assert [i for i, _, _ in plan] == list(range(len(plan)))
    covered = [r for _, a, b in plan for r in range(a, b)]
    assert covered == list(range(rows))
    assert all(0 < b - a <= shard_size for _, a, b in plan)
    for world in range(1, 5):
        owned = sorted(s for rank in range(world) for s in assign_shards(plan, rank, world))
        assert owned == plan


def test_layout_and_slug(tmp_path):
    assert encoder_slug("minilm-l6") == "minilm-l6"
    a, b = encoder_slug("hf:/models/My_Bert"), encoder_slug("hf:/models/my_bert")
    assert a.startswith("hf-models-my_bert-") and a != b and "/" not in a
    p = store_path(tmp_path, "coco", "train", "image", "hf:/x/y")
    assert p.parent == tmp_path / "coco/train/image"
    with pytest.raises(StoreError):
        store_path(tmp_path, "..", "train", "image", "e")


def test_manifest_is_sorted_json_without_clock(tmp_path):
    write_store(tmp_path / "s", make_manifest(20), make_data(20, "pooled")[0])
    text = (tmp_path / "s/manifest.json").read_text()
    data = json.loads(text)
    assert list(data) == sorted(data) and data["complete"] and data["schema_version"] == 1
    assert str(tmp_path) not in text and str(tmp_path) not in (tmp_path / "s/shards/00000.json").read_text()


def test_cli_views(tmp_path):
    root = tmp_path / "stores"
    path = store_path(root, "toy", "train", "text", "hf:/tmp/Enc")
    write_store(path, make_manifest(20, kind="tokens"), *make_data(20, "tokens"))
    assert [p for p, _ in list_stores(root)] == [path]
    table = list_view(root)
    assert "toy" in table and "hf:/tmp/Enc" in table and "tokens" in table and "yes" in table
    view = inspect_view(path)
    assert "20 rows" in view and "complete   yes" in view and "token rows" in view
    assert "no stores" in list_view(tmp_path / "empty")


def test_store_import_is_light():
    code = (
        "import sys, m3jepa.store, m3jepa.store.reader, m3jepa.store.writer; "
        "print(sorted(m for m in ('torch', 'transformers', 'zarr', 'h5py') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert out.stdout.strip() == "[]"


def test_finalize_streams_its_rows_and_writes_nothing_for_a_bad_stream(tmp_path):
    m = make_manifest(20, shard_size=8)
    feats, _ = make_data(20, "pooled")
    write_store(tmp_path / "a", m, feats, finalize=False)
    with StoreWriter(tmp_path / "a", m) as w:
        rows = (r for r in rows_from_records(make_records(20)))  # a generator: no len(), read once
        final = w.finalize(rows, [])
    assert final.complete and (tmp_path / "a" / "rows.jsonl").read_bytes().count(b"\n") == 20
    assert final.rows_sha256 == hashlib.sha256((tmp_path / "a" / "rows.jsonl").read_bytes()).hexdigest()
    write_store(tmp_path / "b", m, feats, finalize=False)
    for bad, message in ((make_records(19), "got 19 rows"), (make_records(21), "more than the 20 rows"),
                         (make_records(20)[::-1], "position 0 has row_id 19")):
        with StoreWriter(tmp_path / "b", m) as w, pytest.raises(ValueError, match=message):
            w.finalize(iter(rows_from_records(bad)), [])
        leftovers = [p.name for p in (tmp_path / "b").iterdir() if p.name.startswith("rows.jsonl")]
        assert leftovers == [] and not load_manifest(tmp_path / "b").complete
