"""Stage 1 runner: a fake-encoder component test, then the real `m3jepa encode` CLI on real stamps.

The CLI tests run real processes: an end-to-end encode and its cached rerun, a resume after
`kill -9`, torchrun with two ranks, and bad inputs through the jsonl dataset.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from m3jepa.config import EncodeConfig
from m3jepa.data.records import BadItemError, Record, membership_fingerprint
from m3jepa.distributed import DistInfo
from m3jepa.encode.jobs import StoreJob
from m3jepa.encode.runner import encode_store
from m3jepa.encoders.base import EncodedBatch, EncoderSpec
from m3jepa.store import Manifest, open_store, store_path
from m3jepa.store.manifest import load_manifest, read_rows
from m3jepa.store.skiplist import skip_list_path

# ---------------------------------------------------------------- component: a fake encoder


class _Pre:
    """Payload "<text>|<row>" → (row, length, crc); "BAD…" payloads are bad items."""

    def __call__(self, payload: str) -> dict[str, torch.Tensor]:
        if payload.startswith("BAD"):
            raise BadItemError(payload, "unreadable on purpose")
        text, row = payload.rsplit("|", 1)
        return {"x": torch.tensor([float(row), float(len(payload)), float(zlib.crc32(text.encode()) % 1000)])}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([it["x"] for it in items])}  # (B, 3)


class _Fake:
    def __init__(self, spec: EncoderSpec):
        self.spec = spec
        self.preprocessor = _Pre()
        self.batches: list[list[tuple[int, int]]] = []  # (row, length) per item, per batch

    def encode(self, batch: dict[str, torch.Tensor], kind: str) -> EncodedBatch:
        x = batch["x"]  # (B, 3)
        self.batches.append([(int(r), int(n)) for r, n, _ in x.tolist()])
        pooled = torch.cat([x, x[:, :1] * 2], dim=1)  # (B, 4)
        if kind == "pooled":
            return EncodedBatch(pooled=pooled)
        tokens = [p.expand(int(p[0]) % 3 + 1, 4) for p in pooled]  # B x (T_i, 4), T_i = row % 3 + 1
        return EncodedBatch(pooled=pooled, tokens=tokens)


def _job(tmp_path: Path, payloads: list[str], shard_size: int) -> StoreJob:
    records = [Record(i, f"s{i}", f"g{i}", "text", p) for i, p in enumerate(payloads)]
    spec = EncoderSpec("fake", "text", 4, "none", "r1", "last", factory=None)  # type: ignore[arg-type]
    manifest = Manifest(
        dataset="fake", split="train", modality="text", membership=membership_fingerprint(records),
        rows=len(records), encoder="fake", encoder_revision="r1", pooling="none", layers="last", dim=4,
        shard_size=shard_size,
    )
    path = store_path(tmp_path, "fake", "train", "text", "fake")
    return StoreJob("train", "text", records, spec, path, manifest)


def _payloads(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{'w' * rng.randint(1, 40)}|{i}" for i in range(n)]


def test_text_batches_sorted_within_shards_and_rows_restored(tmp_path):
    job = _job(tmp_path, _payloads(37), shard_size=10)
    fake = _Fake(job.spec)
    cfg = EncodeConfig(batch_size=4, workers=0, shard_size=10)
    result = encode_store(job, fake, cfg, DistInfo())
    assert result.encoded == 37 and result.skipped == 0
    for batch in fake.batches:
        assert len({row // 10 for row, _ in batch}) == 1, "a batch crossed a shard boundary"
        lengths = [n for _, n in batch]
        assert lengths == sorted(lengths, reverse=True), "text batch not sorted by length"
    feats = open_store(job.path).read_all()  # (37, 4), row order
    assert feats[:, 0].tolist() == list(range(37))  # every row holds its own features
    assert feats[:, 1].tolist() == [len(r.payload) for r in job.stream.records]


def test_bad_item_stops_before_its_shard_then_skip_bad_resumes(tmp_path):
    payloads = _payloads(12)
    payloads[6] = "BAD|6"
    job = _job(tmp_path, payloads, shard_size=4)
    strict = EncodeConfig(batch_size=3, workers=0, skip_bad=False)
    with pytest.raises(BadItemError, match=r"s6: .*unreadable on purpose.*--skip-bad"):
        encode_store(job, _Fake(job.spec), strict, DistInfo())
    shards = job.path / "shards"
    assert (shards / "00000.json").is_file() and not (shards / "00001.json").exists()
    assert not load_manifest(job.path).complete
    fake = _Fake(job.spec)
    result = encode_store(job, fake, EncodeConfig(batch_size=3, workers=0, skip_bad=True), DistInfo())
    assert result.encoded == 8  # shard 0 was kept from the failed run
    manifest = load_manifest(job.path)
    assert manifest.complete
    assert manifest.skipped == [{"row_id": 6, "sample_id": "s6", "reason": "unreadable on purpose"}]
    assert [r.valid for r in read_rows(job.path)] == [i != 6 for i in range(12)]
    assert skip_list_path(job.path, 1).is_file() and not skip_list_path(job.path, 0).exists()
    feats = open_store(job.path).read_all()
    assert not feats[6].any() and feats[7, 0] == 7


def test_tokens_kind_writes_ragged_rows_in_row_order(tmp_path):
    payloads = _payloads(9)
    payloads[4] = "BAD|4"
    job = _job(tmp_path, payloads, shard_size=4)
    job.manifest.kind = "tokens"
    cfg = EncodeConfig(batch_size=2, workers=0, kind="tokens", skip_bad=True)
    encode_store(job, _Fake(job.spec), cfg, DistInfo())
    store = open_store(job.path)
    assert store.token_counts().tolist() == [0 if i == 4 else i % 3 + 1 for i in range(9)]
    for i, tokens in enumerate(store.read_tokens(list(range(9)))):
        assert (tokens[:, 0] == i).all()  # each row's own tokens, whatever the batch order was


def test_the_summary_names_the_rank_that_printed_it():
    from m3jepa.encode.summary import EncodeSummary, StoreResult

    stores = [StoreResult("val", "image", "fake", "p", rows=4, encoded=2, seconds=1.0)]
    for rank in (0, 1):
        table = EncodeSummary(stores=stores, world_size=2, rank=rank).table()
        assert table.splitlines()[-1] == f"(rank {rank} of 2: encoded/seconds/MB are this rank's share)"
    assert "rank" not in EncodeSummary(stores=stores).table()  # one process: no label


# ---------------------------------------------------------------- the real CLI


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def _m3jepa(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m3jepa", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=300)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_tree(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    different = [name for name in fa if fa[name] != fb[name]]
    assert not different, f"files differ: {different[:5]}"


@pytest.mark.slow
def test_encode_end_to_end_then_cached_then_hdf5(tmp_path, tuxpaint_root):
    from m3jepa.data import get_dataset

    def args(root: Path, split: str = "all", fmt: str = "zarr") -> list[str]:
        return ["encode", "--dataset", "tuxpaint", "--limit", "40", "--split", split,
                "--store-root", str(root),
                "--shard-size", "16", "--workers", "1", "--format", fmt]

    root = tmp_path / "zarr"
    first = _m3jepa(*args(root))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "loaded encoder efficientnet-lite0" in first.stderr and "total" in first.stdout
    dataset = get_dataset("tuxpaint", limit=40)
    for split in ("train", "val", "test"):
        for modality, encoder in (("image", "efficientnet-lite0"), ("text", "minilm-l6")):
            store = store_path(root, "tuxpaint", split, modality, encoder)
            verify = _m3jepa("stores", "verify", str(store))
            assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr
            records = dataset.records(split, modality)
            assert [r.sample_id for r in read_rows(store)] == [r.sample_id for r in records]
            assert load_manifest(store).rows == len(records) > 0

    again = _m3jepa(*args(root))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "all 6 stores cached; no encoder loaded" in again.stdout
    assert "loaded encoder" not in again.stderr

    h5 = tmp_path / "hdf5"
    third = _m3jepa(*args(h5, split="val", fmt="hdf5"))
    assert third.returncode == 0, third.stderr[-3000:]
    for modality, encoder in (("image", "efficientnet-lite0"), ("text", "minilm-l6")):
        a = open_store(store_path(root, "tuxpaint", "val", modality, encoder)).read_all(np.float16)
        b = open_store(store_path(h5, "tuxpaint", "val", modality, encoder)).read_all(np.float16)
        assert a.shape == b.shape and np.array_equal(a, b)
        assert next((h5 / "tuxpaint/val" / modality / encoder / "shards").glob("*.h5"), None) is not None


def _resume_args(root: Path) -> list[str]:
    return ["encode", "--dataset", "tuxpaint", "--limit", "60", "--split", "train", "--modality", "image",
            "--store-root", str(root), "--shard-size", "8", "--workers", "1"]


@pytest.mark.slow
def test_resume_after_kill_9_is_byte_identical(tmp_path, tuxpaint_root):
    killed = tmp_path / "killed"
    store = store_path(killed, "tuxpaint", "train", "image", "efficientnet-lite0")
    proc = subprocess.Popen([sys.executable, "-m", "m3jepa", *_resume_args(killed)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (store / "shards" / "00000.json").is_file():  # the first shard committed
            assert proc.poll() is None, "the encode finished or failed before it could be killed"
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the encoder and its DataLoader worker
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    manifest = load_manifest(store)
    assert not manifest.complete
    committed = len(list((store / "shards").glob("?????.json")))
    assert 1 <= committed < 8

    resumed = _m3jepa(*_resume_args(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already written; resuming" in resumed.stderr
    clean = tmp_path / "clean"
    fresh = _m3jepa(*_resume_args(clean))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    _assert_same_tree(killed, clean)
    assert load_manifest(store).complete


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tmp_path, tuxpaint_root):
    args = ["encode", "--dataset", "tuxpaint", "--limit", "12", "--split", "val", "--shard-size", "4",
            "--workers", "0", "--store-root"]
    # CPU results depend on the intra-op thread count; torchrun runs each rank with OMP_NUM_THREADS=1,
    # and --threads 1 gives the one-process run the same.
    env = _env(OMP_NUM_THREADS="1")
    one = _m3jepa(*args[:1], "--threads", "1", *args[1:], str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["torchrun", "--nproc_per_node=2", "--standalone", "-m", "m3jepa", *args,
                          str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # each rank prints its own table, labelled with its own rank (not rank 0's twice)
    assert two.stdout.count("(rank 0 of 2:") == 1 and two.stdout.count("(rank 1 of 2:") == 1, two.stdout
    _assert_same_tree(tmp_path / "one", tmp_path / "two")


# ---------------------------------------------------------------- bad inputs (jsonl dataset)


def _jsonl_root(tmp_path: Path, copy_png, bad: str) -> tuple[Path, str]:
    """Five train pairs item1..item5 (item3 the bad one when it is media); returns (root, bad id)."""
    root = tmp_path / "data"
    lines, bad_id = [], "item3"
    for k in range(1, 6):
        rel = f"img/item{k}.png"
        path = copy_png(root / rel, k)
        captions = [f"A stamp number {k}."]
        if k == 3 and bad == "corrupt":
            path.write_bytes(random.Random(0).randbytes(4096))
        elif k == 3 and bad == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif k == 3 and bad == "escape":
            copy_png(tmp_path / "outside.png", k)
            rel = "../outside.png"
        elif k == 3 and bad == "empty-caption":
            captions.append("   ")
            bad_id = "item3#1"
        lines.append(json.dumps({"id": f"item{k}", "image": rel, "caption": captions, "split": "train"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root, bad_id


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["corrupt", "truncated", "escape", "empty-caption"])
def test_bad_inputs_through_the_cli(tmp_path, copy_png, bad):
    root, bad_id = _jsonl_root(tmp_path, copy_png, bad)
    modality = "text" if bad == "empty-caption" else "image"
    stores = tmp_path / "stores"
    args = ["encode", "--dataset", "jsonl", "--root", str(root), "--split", "train", "--modality", modality,
            "--store-root", str(stores), "--shard-size", "2", "--workers", "1"]
    failed = _m3jepa(*args)
    assert failed.returncode == 2
    assert f"error: {bad_id}" in failed.stderr or f"{bad_id}:" in failed.stderr, failed.stderr[-2000:]
    assert "--skip-bad" in failed.stderr
    assert "Traceback" not in failed.stderr

    # The failed run left a resumable store (or none): the same command with --skip-bad completes it.
    ok = _m3jepa(*args, "--skip-bad")
    assert ok.returncode == 0, ok.stderr[-3000:]
    encoder = "minilm-l6" if modality == "text" else "efficientnet-lite0"
    store = store_path(stores, "jsonl", "train", modality, encoder, data_root=root)
    assert _m3jepa("stores", "verify", str(store)).returncode == 0
    rows = read_rows(store)
    if bad in ("corrupt", "truncated"):  # found while decoding: a zero row, valid = false, listed
        assert "already written; resuming" in ok.stderr  # shard 00000 survived the failed run
        skipped = load_manifest(store).skipped
        assert [s["sample_id"] for s in skipped] == [bad_id] and skipped[0]["row_id"] == 2
        assert [r.valid for r in rows] == [True, True, False, True, True]
        assert not open_store(store).read([2]).any()
    else:  # dropped while loading the dataset: named in the log, absent from the store
        assert f"{bad_id}" in ok.stderr and "dropped while loading" in ok.stderr
        assert bad_id not in [r.sample_id for r in rows] and all(r.valid for r in rows)
        assert bad_id in [d["sample_id"] for d in load_manifest(store).dropped]  # and listed


@pytest.mark.slow
@pytest.mark.parametrize(("option", "value", "message"), [
    ("--dataset", "no-such-data", "unknown dataset 'no-such-data'"),
    ("--image-encoder", "no-such-encoder", "unknown encoder 'no-such-encoder'"),
    ("--text-encoder", "efficientnet-lite0", "encodes image, not text"),
])
def test_unknown_dataset_or_encoder_is_a_clear_error(tmp_path, tuxpaint_root, option, value, message):
    out = _m3jepa("encode", "--limit", "4", "--store-root", str(tmp_path), option, value)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.rglob("*.json"))  # refused before any store was started
