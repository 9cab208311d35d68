"""Stage-1 fast paths against their plain references: overlapped reading and background shard writes.

Reading ahead (a thread, or DataLoader workers: the first batch in pieces, the rest whole) must hand the
encoder the very batches a synchronous reader makes, and a store committed on a background thread must
equal, byte for byte, one committed shard by shard in the encoding thread.
"""

from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path

import pytest
import torch

from m3jepa.config import EncodeConfig
from m3jepa.data.records import BadItemError, Record, membership_fingerprint
from m3jepa.distributed import DistInfo
from m3jepa.encode import reader as reader_mod
from m3jepa.encode import runner as runner_mod
from m3jepa.encode.jobs import StoreJob
from m3jepa.encode.reader import WORKER_NICENESS, Decode, ShardWork, decode_shards, split, task_of
from m3jepa.encode.runner import encode_store, reader_workers
from m3jepa.encoders.base import EncodedBatch, EncoderSpec
from m3jepa.store import Manifest, store_path
from m3jepa.store.manifest import load_manifest
from m3jepa.store.writer import BackgroundWrites


class _Pre:
    """Payload "<text>|<row>" → {"x": (T,) with T = len(text) % 5 + 1}; "BAD…" is a bad item."""

    def __call__(self, payload: str) -> dict[str, torch.Tensor]:
        if payload.startswith("BAD"):
            raise BadItemError(payload, "unreadable on purpose")
        if payload.startswith("CRASH"):
            raise RuntimeError("an unexpected failure")
        text, row = payload.rsplit("|", 1)
        n = len(text) % 5 + 1
        return {"x": torch.full((n,), float(row)) + torch.arange(n) / 10}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(it["x"].numel() for it in items)
        out = torch.zeros(len(items), longest)  # (B, T): right-padded, so batch makeup is visible
        for i, it in enumerate(items):
            out[i, : it["x"].numel()] = it["x"]
        return {"x": out}


class _Fake:
    """pooled = (mean, max, first, T) of each padded row: depends on the batch's padding, like a real one."""

    def __init__(self, spec: EncoderSpec):
        self.spec = spec
        self.preprocessor = _Pre()

    def encode(self, batch: dict[str, torch.Tensor], kind: str) -> EncodedBatch:
        x = batch["x"]  # (B, T)
        t = torch.full((x.shape[0], 1), float(x.shape[1]))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True), x[:, :1], t], 1)  # (B, 4)
        return EncodedBatch(pooled=pooled)


def _records(n: int, modality: str = "text", bad: tuple[int, ...] = ()) -> list[Record]:
    payloads = [f"{'w' * (zlib.crc32(str(i).encode()) % 17)}|{i}" for i in range(n)]
    for i in bad:
        payloads[i] = f"BAD|{i}"
    return [Record(i, f"s{i}", f"g{i}", modality, p) for i, p in enumerate(payloads)]


def _plan(n: int, size: int) -> list[list[int]]:
    order = sorted(range(n), key=lambda i: (zlib.crc32(str(i).encode()) % 7, i))  # not consecutive
    return [order[i : i + size] for i in range(0, n, size)]


def _works(records: list[Record], plan: list[list[int]], cut: int | None = None) -> list[ShardWork]:
    """The plan as one shard of all rows, or (cut) two shards: the batches before `cut` and the rest,
    each shard holding the rows of its batches (rows renumbered so each shard is a row range)."""
    if cut is None:
        return [ShardWork(0, 0, len(records), records, plan)]
    first = sorted(r for b in plan[:cut] for r in b)
    rest = sorted(r for b in plan[cut:] for r in b)
    order = first + rest
    new = {old: i for i, old in enumerate(order)}
    renumbered = [Record(i, records[old].sample_id, records[old].group_id, records[old].modality,
                         records[old].payload) for i, old in enumerate(order)]
    batches = [[new[r] for r in b] for b in plan]
    return [ShardWork(0, 0, len(first), renumbered[: len(first)], batches[:cut]),
            ShardWork(1, len(first), len(order), renumbered[len(first):], batches[cut:])]


def _reference(works: list[ShardWork], pre, refused=None) -> list[tuple]:
    """Each planned batch decoded and collated in this thread, one by one."""
    decode = Decode(pre)
    return _as_tuples(decode[task_of(w, rows, refused or {})] for w in works for rows in w.batches)


def _decoded(works: list[ShardWork], pre, workers: int, refused=None, **kw) -> list[tuple]:
    out = []
    for shard in decode_shards(iter(works), pre, refused or {}, workers, **kw):
        batches = list(shard.batches)
        assert len(batches) == len(shard.work.batches)
        out += _as_tuples(batches)
    return out


def _as_tuples(batches) -> list[tuple]:
    return [(b.rows, b.bad, None if b.inputs is None else b.inputs["x"].tolist()) for b in batches]


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize(("parts", "n"), [(1, 5), (2, 5), (2, 64), (3, 7), (4, 2), (2, 1)])
def test_split_keeps_rows_in_order(parts, n):
    rows = list(range(100, 100 + n))
    pieces = split(rows, parts)
    assert [r for p in pieces for r in p] == rows
    assert len(pieces) <= parts and all(pieces)


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("cut", [None, 3])
def test_every_reader_yields_the_reference_batches(workers, cut):
    records = _records(41, bad=(3, 17, 18))
    pre = _Pre()
    works = _works(records, _plan(len(records), 6), cut)
    refused = {5: "refused before reading"}
    reference = _reference(works, pre, refused)
    assert len(reference) == 7 and any(5 in [r for r, _ in bad] for _, bad, _ in reference)
    assert _decoded(works, pre, workers, refused) == reference


@pytest.mark.parametrize(("workers", "first"), [(3, 7), (3, 2), (2, 1), (4, 5)])  # (4, 5): 3 pieces
def test_worker_layouts_yield_the_reference_batches(workers, first):
    # The first batch is cut into pieces (fewer than `workers` when it is short), the rest go whole.
    records = _records(30, bad=(0, 9))
    pre = _Pre()
    rest = list(range(first, 30))
    plan = [list(range(first))] + [rest[k : k + 5] for k in range(0, len(rest), 5)]
    works = _works(records, plan, cut=2)
    assert _decoded(works, pre, workers) == _reference(works, pre)


class _Niceness(_Pre):
    def __call__(self, payload: str) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([float(os.nice(0))])}  # the niceness of the process decoding it


@pytest.mark.parametrize(("yield_cpu", "pin", "added"), [(None, False, WORKER_NICENESS), (False, False, 0),
                                                          (True, False, WORKER_NICENESS)])
def test_workers_yield_the_cpu_only_when_asked_or_encoding_on_the_cpu(yield_cpu, pin, added):
    works = _works(_records(6), [[0, 1], [2, 3], [4, 5]])
    batches = [b for s in decode_shards(iter(works), _Niceness(), {}, 2, pin=pin, yield_cpu=yield_cpu)
               for b in s.batches]
    want = min(19, os.nice(0) + added)
    assert len(batches) == 3 and all(b.inputs["x"].flatten().tolist() == [want, want] for b in batches)


def test_real_image_batches_from_workers_equal_the_reference_bit_for_bit(tuxpaint_root):
    from m3jepa.data import get_dataset
    from m3jepa.encoders.image import ImagePreprocessor

    records = get_dataset("tuxpaint", limit=12).records("train", "image")[:10]
    pre = ImagePreprocessor()
    plan = [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    works = _works(records, plan)
    got = [b for s in decode_shards(iter(works), pre, {}, workers=2) for b in s.batches]
    for batch, rows in zip(got, plan, strict=True):
        want = Decode(pre)[task_of(works[0], rows, {})]
        assert batch.rows == want.rows == rows
        assert torch.equal(batch.inputs["pixel_values"], want.inputs["pixel_values"])


def test_a_batch_of_only_bad_items_passes_through():
    works = _works(_records(4, bad=(0, 1, 2, 3)), [[0, 1], [2, 3]])
    batches = [b for s in decode_shards(iter(works), _Pre(), {}, workers=2) for b in s.batches]
    got = [(b.rows, b.inputs, [r for r, _ in b.bad]) for b in batches]
    assert got == [([], None, [0, 1]), ([], None, [2, 3])]


def test_thread_reader_raises_unexpected_errors_and_stops_early():
    records = _records(10)
    records[5] = Record(5, "s5", "g5", "text", "CRASH|5")
    pre = _Pre()
    reader = decode_shards(iter(_works(records, [[i] for i in range(10)])), pre, {}, workers=0)
    with pytest.raises(RuntimeError, match="unexpected failure"):
        for shard in reader:
            for _ in shard.batches:
                pass
    many = [ShardWork(k, 4 * k, 4 * k + 4, [Record(4 * k + i, "s", "g", "text", f"w|{i}") for i in range(4)],
                      [[4 * k + i] for i in range(4)]) for k in range(50)]
    reader = decode_shards(iter(many), pre, {}, workers=0)
    next(next(reader).batches)
    reader.close()  # must not wait for the other 199 batches
    assert not any(t.name == "m3jepa-encode-reader" and t.is_alive() for t in threading.enumerate())


def test_text_is_read_on_a_thread_images_by_workers():
    assert reader_workers("text", 2) == 0 and reader_workers("question", 2) == 0
    assert reader_workers("image", 2) == 2 and reader_workers("audio", 1) == 1
    assert reader_workers("image", 0) == 0


# ---------------------------------------------------------------- writing


def test_background_writes_keep_order_and_raise_in_the_caller():
    seen: list[int] = []
    with BackgroundWrites(depth=1) as writes:
        done = [r for i in range(5) for r, _ in writes.submit(lambda k: seen.append(k) or k, i)]
        done += [r for r, _ in writes.drain()]
    assert done == [0, 1, 2, 3, 4] and seen == [0, 1, 2, 3, 4]

    def fail(k: int) -> int:
        if k == 1:
            raise OSError("disk full")
        seen.append(k)
        return k

    seen.clear()
    with pytest.raises(OSError, match="disk full"), BackgroundWrites(depth=1) as writes:
        for i in range(4):
            writes.submit(fail, i)
        writes.drain()
    assert seen == [0]  # the error surfaced at the next submit; nothing after it was queued


def test_background_writes_finish_queued_commits_when_the_caller_fails():
    seen: list[int] = []
    with pytest.raises(KeyError), BackgroundWrites(depth=1) as writes:
        writes.submit(seen.append, 0)
        raise KeyError("the encoder failed on the next shard")
    assert seen == [0]  # the fully encoded shard was still committed


# ---------------------------------------------------------------- whole stores, byte for byte


def _job(root: Path, records: list[Record], shard_size: int, modality: str) -> StoreJob:
    spec = EncoderSpec("fake", modality, 4, "none", "r1", "last", factory=None)  # type: ignore[arg-type]
    manifest = Manifest(
        dataset="fake", split="train", modality=modality, membership=membership_fingerprint(records),
        rows=len(records), encoder="fake", encoder_revision="r1", pooling="none", layers="last", dim=4,
        shard_size=shard_size,
    )
    return StoreJob("train", modality, records, spec, store_path(root, "fake", "train", modality, "fake"),
                    manifest)


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _synchronous(monkeypatch: pytest.MonkeyPatch) -> None:
    """Synchronous reading (nothing read or decoded ahead) and each shard committed before the next."""
    monkeypatch.setattr(reader_mod, "THREAD_DEPTH", 0)
    monkeypatch.setattr(reader_mod, "RECORD_DEPTH", 0)
    monkeypatch.setattr(runner_mod, "BACKGROUND_WRITES", False)
    monkeypatch.setattr(runner_mod, "reader_workers", lambda modality, workers: 0)


@pytest.mark.parametrize(("modality", "workers"), [("text", 2), ("image", 2), ("image", 0)])
def test_overlapped_store_equals_the_reference_byte_for_byte(tmp_path, monkeypatch, modality, workers):
    records = _records(45, modality, bad=(7,))
    cfg = EncodeConfig(batch_size=4, workers=workers, shard_size=8, skip_bad=True)
    fast = _job(tmp_path / "fast", records, 8, modality)
    encode_store(fast, _Fake(fast.spec), cfg, DistInfo())
    with monkeypatch.context() as m:
        _synchronous(m)
        ref = _job(tmp_path / "ref", records, 8, modality)
        encode_store(ref, _Fake(ref.spec), cfg, DistInfo())
    assert load_manifest(fast.path).complete and len(load_manifest(fast.path).shards) == 6
    assert _tree(fast.path) == _tree(ref.path)


@pytest.mark.slow
def test_real_image_store_with_workers_equals_the_reference(tmp_path, monkeypatch, tuxpaint_root):
    from m3jepa.data import get_dataset
    from m3jepa.encoders import get_encoder_spec

    records = get_dataset("tuxpaint", limit=12).records("train", "image")[:12]
    spec = get_encoder_spec("efficientnet-lite0")
    encoder = spec.factory(torch.device("cpu"), torch.float32)
    cfg = EncodeConfig(batch_size=4, workers=2, shard_size=8, threads=torch.get_num_threads())

    def job(root: Path) -> StoreJob:
        j = _job(root, records, 8, "image")
        j.spec = spec
        j.manifest.encoder, j.manifest.encoder_revision, j.manifest.dim = spec.name, spec.revision, spec.dim
        return j

    fast = job(tmp_path / "fast")
    encode_store(fast, encoder, cfg, DistInfo())
    with monkeypatch.context() as m:
        _synchronous(m)
        ref = job(tmp_path / "ref")
        encode_store(ref, encoder, cfg, DistInfo())
    assert _tree(fast.path) == _tree(ref.path)
