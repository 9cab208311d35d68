"""Stores at URLs (issue #18 part 3), against a real S3 protocol server: moto's standalone server on
127.0.0.1 (started once for the session, stopped by PID) with s3fs as the client, configured the way a
user would (AWS_ENDPOINT_URL and credentials in the environment)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic_stores import DATASET, make_split, overrides, write_store

from bench.s3server import SECRET, S3Server
from m3jepa.config import ConfigError, EncodeConfig, load_pipeline
from m3jepa.core.paired import load_split
from m3jepa.data.records import Record, membership_fingerprint
from m3jepa.location import LocationError, StoreURL, location
from m3jepa.store import (
    IncompleteStoreError,
    Manifest,
    StoreError,
    StoreLockedError,
    StoreWriter,
    list_stores,
    open_store,
    rows_from_records,
    store_path,
    verify_store,
)
from m3jepa.store.cli_views import list_view
from m3jepa.store.lease import LeaseLostError, StoreLease

BUCKET = "m3jepa-test"
DIRECTIONS = ["image->text", "text->image"]


@pytest.fixture(scope="session")
def s3():
    """The moto server, with AWS_ENDPOINT_URL and test credentials in this process's environment (and so
    in every subprocess's), as a user points s3fs at an S3-compatible endpoint."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    before = {k: os.environ.get(k) for k in S3Server().env()}
    with S3Server() as server:
        os.environ.update(server.env())
        server.make_bucket(BUCKET)
        try:
            yield server
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _fs():
    import fsspec

    return fsspec.filesystem("s3", use_listings_cache=False)


def _kill_once_committed(args: list[str], env: dict, key: str, timeout: float) -> subprocess.Popen:
    """Run `m3jepa *args` in its own session, SIGKILL it once the bucket has `key` (a committed shard),
    and return the killed process."""
    proc = subprocess.Popen([sys.executable, "-m", "m3jepa", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    fs = _fs()
    try:
        deadline = time.monotonic() + timeout
        while not fs.exists(key):
            assert proc.poll() is None, "it finished or failed before it could be killed"
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return proc


def _m3jepa(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "m3jepa", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _objects(prefix: str) -> dict[str, bytes]:
    """Every object under s3://BUCKET/prefix by key relative to it, with its bytes."""
    fs = _fs()
    base = f"{BUCKET}/{prefix}/"
    keys = fs.find(base)
    return {k[len(base):]: data for k, data in fs.cat(keys).items()} if keys else {}  # concurrent GETs


def _manifest(records: list[Record], fmt: str = "zarr", shard_size: int = 8, dim: int = 16) -> Manifest:
    return Manifest(dataset=DATASET, split="train", modality="image", rows=len(records),
                    membership=membership_fingerprint(records), encoder="syn-image", encoder_revision="r1",
                    pooling="none", layers="none", dim=dim, dtype="float32", format=fmt,
                    shard_size=shard_size)


def _records(n: int) -> list[Record]:
    return [Record(i, f"s{i}", f"g{i}", "image", f"{i}.png") for i in range(n)]


# ---------------------------------------------------------------- locations and credentials


def test_locations_parse_and_refuse_secrets_without_repeating_them(s3):
    assert location("stores") == Path("stores") and location("file:///tmp/x") == Path("/tmp/x")
    url = location(f"s3://{BUCKET}/a/")
    assert isinstance(url, StoreURL) and str(url / "b" / "c") == f"s3://{BUCKET}/a/b/c"
    assert (url / "b").parent == url and (url / "b").name == "b"
    for bad in (f"s3://AKIAEXAMPLE:{SECRET}@{BUCKET}/x", f"s3://{BUCKET}/x?X-Amz-Signature={SECRET}",
                f"simplecache::s3://{BUCKET}/x"):
        with pytest.raises(LocationError) as err:
            location(bad)
        assert SECRET not in str(err.value)
    with pytest.raises(ConfigError) as err:
        EncodeConfig(store_root=f"s3://AKIAEXAMPLE:{SECRET}@{BUCKET}/x")
    assert SECRET not in str(err.value) and "AWS_SECRET_ACCESS_KEY" in str(err.value)
    with pytest.raises(LocationError, match="nosuchfs:// is not a filesystem fsspec knows"):
        location("nosuchfs://bucket/x")


def test_a_secret_in_the_url_is_refused_before_anything_is_written(s3, tmp_path):
    root = f"s3://AKIAEXAMPLE:{SECRET}@{BUCKET}/x"
    out = _m3jepa("train-predictor", "--store-root", root, "--run", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert SECRET not in out.stdout + out.stderr
    assert not any(tmp_path.iterdir())  # no run folder, no config.toml holding the URL


# ---------------------------------------------------------------- the commit, the lease


def test_any_fsspec_filesystem_works_memory_without_conditional_writes():
    """memory:// has no ETags and no conditional PUT: the same commit, the lease's plain-write fallback,
    and a listing check by size."""
    records = _records(20)
    feats = np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32)
    path = store_path("memory://m3jepa-test/stores", DATASET, "train", "image", "syn-image")
    with StoreWriter(path, _manifest(records)) as w:
        with pytest.raises(StoreLockedError, match="is being written by process"):
            StoreWriter(path, _manifest(records)).open()
        for index, start, end in w.planned_shards():
            w.write_shard(index, feats[start:end])
        w.finalize(rows_from_records(records), [])
    assert np.array_equal(open_store(path).read_checked(), feats)
    report = verify_store(path)
    assert report.ok and "0 of them also by MD5" in report.text() and "size only" in report.text()
    old = StoreLease(location("memory://m3jepa-test/lease"), 0, ttl=0.3).acquire()
    old._stop.set()
    time.sleep(0.4)
    new = StoreLease(location("memory://m3jepa-test/lease"), 0).acquire()
    old.renew()
    with pytest.raises(LeaseLostError):
        old.check()
    new.release()
    old.release()



def test_a_store_without_its_manifest_is_invisible_until_it_commits(s3):
    root = location(f"s3://{BUCKET}/invisible")
    records = _records(20)
    feats = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    path = store_path(root, DATASET, "train", "image", "syn-image")
    with StoreWriter(path, _manifest(records)) as w:
        for index, start, end in w.planned_shards()[:2]:
            w.write_shard(index, feats[start:end])
        assert not (path / "manifest.json").is_file() and (path / "writing.json").is_file()
        assert list_stores(root) == []
        with pytest.raises(IncompleteStoreError, match=r"incomplete store \(2 of 3 shards committed\)"):
            open_store(path)
        w.write_shard(2, feats[16:20])
        w.finalize(rows_from_records(records), [])
    assert [str(p) for p, _ in list_stores(root)] == [str(path)]
    assert not (path / "writing.json").is_file()
    assert np.array_equal(open_store(path).read_checked(), feats)
    assert f"{DATASET}  train  image" in list_view(str(root))  # `m3jepa stores list`


def test_a_second_writer_is_refused_by_the_lease_and_a_lost_lease_stops_commits(s3):
    path = location(f"s3://{BUCKET}/lease/store")
    records = _records(16)
    with StoreWriter(path, _manifest(records)) as w:
        with pytest.raises(StoreLockedError, match=rf"{path} is being written by process {os.getpid()} on "):
            StoreWriter(path, _manifest(records)).open()
        w.write_shard(0, np.zeros((8, 16), np.float32))
    # the lease is released: another writer opens at once
    with StoreWriter(path, _manifest(records)):
        pass

    # an expired lease is taken over; its old holder finds out at its next renewal and commits no more
    old = StoreLease(path, 0, ttl=1.0).acquire()
    old._stop.set()  # (a holder that stalled: no renewals)
    time.sleep(1.2)
    new = StoreLease(path, 0, ttl=30.0).acquire()
    old.renew()
    with pytest.raises(LeaseLostError, match="lost its lease .lease.rank0 .another writer took it over"):
        old.check()
    new.check()
    new.release()
    old.release()

    with pytest.raises(StoreError, match=r"s3://no-such-bucket-m3/x: the bucket does not exist"):
        StoreWriter("s3://no-such-bucket-m3/x", _manifest(records)).open()


_HOLD = """
import sys, time
from m3jepa.location import location
from m3jepa.store.lease import StoreLease
StoreLease(location(sys.argv[1]), 0).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_holders_lease_is_taken_over_at_once_on_its_machine_and_waited_out_elsewhere(s3, caplog):
    """kill -9 of a real process holding a lease (the default 60 s): on its machine the next writer takes
    the lease at once, with a line saying why; the same lease naming another machine is refused until it
    expires; a live holder, or a PID that a new process has taken, is told apart by its start time."""
    import socket

    from m3jepa.store.lease import LeaseHeldError, machine_id, process_start

    path = location(f"s3://{BUCKET}/lease-kill/store")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "held\n"
    finally:
        proc.kill()  # SIGKILL: no release, the lease object stays
        proc.wait(timeout=60)
    key, fs = (path / ".lease.rank0").key, _fs()
    dead = json.loads(fs.cat_file(key))
    assert dead["holder"]["pid"] == proc.pid and dead["holder"]["machine"] == machine_id()
    assert dead["expires"] - time.time() > 50  # nowhere near expiring

    def take(body: dict) -> str:
        """Put `body` as the lease, take it; the line that says why it was taken."""
        fs.pipe_file(key, json.dumps(body).encode())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="m3jepa.store.lease"):
            StoreLease(path, 0).acquire().release()
        return caplog.text

    start = time.monotonic()
    line = take(dead)
    assert time.monotonic() - start < 10  # at once, not after the expiry
    assert (f"took over the lease {path}/.lease.rank0 of process {proc.pid} on {socket.gethostname()}: that "
            "process no longer runs on this machine (killed?)") in line, line
    # another machine's holder (another host, or another container's PID namespace): waited out
    elsewhere = {**dead, "holder": {**dead["holder"], "machine": "node7/other-boot/pid:[1]", "host": "node7"}}
    fs.pipe_file(key, json.dumps(elsewhere).encode())
    held = rf"is being written by process {proc.pid} on node7 .*for (5\d|60) s more .*at most 60 s"
    with pytest.raises(LeaseHeldError, match=held):
        StoreLease(path, 0).acquire()
    assert "it expired 2 s ago" in take({**elsewhere, "expires": time.time() - 2})
    # this machine, a live holder: refused; the same PID with another start time (reused): taken
    me = {**dead, "holder": {**dead["holder"], "pid": os.getpid(), "started": process_start(os.getpid())}}
    fs.pipe_file(key, json.dumps(me).encode())
    with pytest.raises(LeaseHeldError, match=f"process {os.getpid()} on "):
        StoreLease(path, 0).acquire()
    me["holder"]["started"] = 1  # not when this process started
    assert "no longer runs on this machine" in take(me)
    assert not fs.exists(key)


def test_listing_checks_catch_a_replaced_object_without_a_download(s3, tmp_path):
    root = location(f"s3://{BUCKET}/listing")
    records = _records(16)
    path = write_store(root, "train", "image", records, np.ones((16, 16), np.float32), shard_size=8)
    assert verify_store(path).ok
    key = (path / "shards/00001.zarr/features/c/0/0").key
    fs = _fs()
    data = bytearray(fs.cat_file(key))
    data[5] ^= 1
    fs.pipe_file(key, bytes(data))  # same size, other bytes: its ETag (MD5) changes
    report = verify_store(path)  # listing only
    assert report.status == "CORRUPT" and "not downloaded" in report.text()
    assert "shards/00001.zarr/features/c/0/0 is not the object that was written" in report.text()
    report = verify_store(path, download=True)  # `m3jepa stores verify URL --download`
    assert report.status == "CORRUPT" and "every shard downloaded" in report.text()
    replaced = "shards/00001.zarr/features/c/0/0 is not the object that was written"
    with pytest.raises(StoreError, match=replaced):
        open_store(path).read_checked()  # what the memory feed and evaluate call


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_the_store_feed_from_the_bucket_gives_the_local_batches(s3, tmp_path, fmt):
    """Ranged GETs (no cache; zarr) or HDF5 through a remote file object, and fsspec's file cache: exactly
    the local store's batches."""
    local, remote = tmp_path / "local", f"s3://{BUCKET}/feed-{fmt}"
    for root in (local, remote):
        make_split(location(root), "train", 40, fmt=fmt)
    cache = tmp_path / "cache"
    cfgs = {"local": load_pipeline(None, overrides(local, tmp_path / "run")),
            "ranged": load_pipeline(None, overrides(remote, tmp_path / "run")),
            "cached": load_pipeline(None, overrides(remote, tmp_path / "run",
                                                    **{"encode.store_cache": str(cache)}))}
    splits = {k: load_split(c, "train", DIRECTIONS, feed="store") for k, c in cfgs.items()}
    for step in range(3):
        want = splits["local"].batch("image->text", 16, 0, step)
        for k in ("ranged", "cached"):
            got = splits[k].batch("image->text", 16, 0, step)
            assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(want, got, strict=True)), k
    for s in splits.values():
        s.close()
    assert any(cache.rglob("*"))  # the cached feed read local copies


# ---------------------------------------------------------------- stage 1 to 3 with the stores only in S3

SMALL = {"encode.limit": 12, "encode.workers": 1, "encode.shard_size": 8, "model.dim": 64,
         "model.hidden": 128, "model.num_experts": 4, "model.top_k": 2, "model.cl_dim": 32,
         "train.batch_size": 8, "train.max_steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4,
         "train.num_threads": 1}


def _sets(**values: object) -> list[str]:
    toml = {k: json.dumps(v) if isinstance(v, str) else v for k, v in values.items()}
    return [x for k, v in toml.items() for x in ("--set", f"{k}={v}")]


@pytest.mark.slow
def test_encode_train_evaluate_index_with_the_stores_only_in_the_bucket(s3, tmp_path, tuxpaint_root):
    """`m3jepa run` (encode, train with the store feed through the read cache, evaluate in memory) and
    `m3jepa index`, with the stores only in the bucket and a recognisable secret key in the environment."""
    root = f"s3://{BUCKET}/e2e"
    cache = tmp_path / "cache"
    outputs = []

    def m3jepa(*args: str) -> str:
        out = _m3jepa(*args, cwd=tmp_path)
        outputs.append(out.stdout + out.stderr)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    m3jepa("run", "tuxpaint", "--workdir", str(tmp_path), "--device", "cpu",
           *_sets(**SMALL, **{"encode.store_root": root, "train.feed": "store",
                              "encode.store_cache": str(cache)}))
    listed = list_view(root)  # `m3jepa stores list s3://...`
    assert listed.count("tuxpaint") == 6 and " NO " not in listed
    assert verify_store(f"{root}/tuxpaint/test/image/efficientnet-lite0").ok
    run = tmp_path / "runs" / "tuxpaint"
    recorded = json.loads((run / "stores.json").read_text())
    assert recorded["store_root"] == root
    assert recorded["splits"]["train"]["stores"]["image"]["store"] == f"{root}/tuxpaint/train/image/" \
        "efficientnet-lite0"
    assert json.loads((run / "metrics.json").read_text())["directions"]["image->text"]["R@1"] >= 0
    m3jepa("index", "--run", str(run), "--split", "test", "--modality", "image", "--device", "cpu")
    # the memory feed (no cache: whole chunks GET) and evaluate on a second run, from the same stores
    mem = tmp_path / "runs" / "memory"
    m3jepa("train-predictor", "--pipeline", "tuxpaint", "--run", str(mem), "--store-root", root, "--device",
           "cpu", *_sets(**SMALL, **{"train.feed": "memory"}))
    m3jepa("evaluate", "--run", str(mem), "--device", "cpu")
    assert json.loads((mem / "metrics.json").read_text())["directions"]["image->text"]["R@1"] >= 0
    m3jepa("stores", "inspect", f"{root}/tuxpaint/train/image/efficientnet-lite0")
    assert "complete   yes" in outputs[-1] and root in outputs[-1]
    index = next((run / "embedded" / "test").glob("image*.index"))
    hits = m3jepa("search", "--index", str(index), "--text", "a cat", "--k", "3", "--json", "--device", "cpu")
    assert len(json.loads(hits)["hits"]) == 3
    m3jepa("export", "--run", str(run), "--out", str(tmp_path / "runs" / "export"))
    _serve_one_query(index)

    assert not (tmp_path / "stores").exists()  # no local store root: the stores are only in the bucket
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "runs"]
    assert any(cache.rglob("*"))  # the store feed read the bucket through the cache
    # the credentials were used, and are nowhere: not printed, not in any file written here or in the bucket
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(SECRET.encode() in b for b in written)
    assert not any(SECRET in o for o in outputs)
    assert not any(SECRET.encode() in b for b in _objects("e2e").values())


def _serve_one_query(index: Path) -> None:
    """`m3jepa serve`'s app (in this process: the engine the CLI opens, create_app) answers a
    caption query over an index whose run's stores are in the bucket."""
    from fastapi.testclient import TestClient

    from m3jepa.serve.app import create_app
    from m3jepa.serve.server import index_specs, open_engine

    engine = open_engine([str(index)], "cpu")
    with TestClient(create_app(engine), base_url="http://127.0.0.1") as client:
        r = client.post("/api/search", json={"text": "a cat", "k": 2, "index": next(iter(index_specs(
            [str(index)])))})
    assert r.status_code == 200 and len(r.json()["hits"]) == 2, r.text


def _encode_args(root: str) -> list[str]:
    return ["encode", "--dataset", "tuxpaint", "--limit", "40", "--split", "train", "--modality", "image",
            "--store-root", root, "--shard-size", "8", "--workers", "0"]


@pytest.mark.slow
def test_kill_9_mid_encode_to_the_bucket_resumes_byte_identical(s3, tuxpaint_root):
    killed = f"s3://{BUCKET}/killed"
    store = store_path(killed, "tuxpaint", "train", "image", "efficientnet-lite0")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    fs = _fs()
    proc = _kill_once_committed(_encode_args(killed), env, (store / "shards/00000.json").key, 240)  # shard 1
    assert not fs.exists((store / "manifest.json").key) and fs.exists((store / ".lease.rank0").key)
    assert list_stores(killed) == []

    resumed = _m3jepa(*_encode_args(killed))  # the dead holder's lease (this machine) is taken over at once
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already written; resuming" in resumed.stderr
    assert f"took over the lease {store}/.lease.rank0 of process {proc.pid} on " in resumed.stderr
    fresh = _m3jepa(*_encode_args(f"s3://{BUCKET}/clean"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    a, b = _objects("killed"), _objects("clean")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)  # byte-identical objects
    assert not any(".lease" in k or "writing.json" in k for k in a)
    assert verify_store(store, download=True).ok


# ---------------------------------------------------------------- webdataset shards in the bucket


def test_webdataset_shards_in_the_bucket_edited_stale_untouched_cached(s3, real_pngs):
    """`--dataset webdataset` with its tar shards and its stores in the bucket: each shard's fingerprint
    is its listing's size, time and ETag, so a shard re-uploaded with one image member changed (same size)
    makes only its rows stale, and the stores of untouched shards stay cached."""
    from test_webdataset import _Fake, _Pixels, _sample, _tar

    from m3jepa.config import EncodeConfig
    from m3jepa.data import get_dataset
    from m3jepa.distributed import DistInfo
    from m3jepa.encode.jobs import cache_state, plan_jobs
    from m3jepa.encode.runner import encode_store
    from m3jepa.encoders.base import EncoderSpec

    fs, pngs = _fs(), [p.read_bytes() for p in real_pngs]
    shards, root = f"s3://{BUCKET}/wds/shards", f"s3://{BUCKET}/wds/stores"

    def upload(index: int, first: bytes) -> None:
        """Shard `index` of 4 samples (train, val alternating); its first image's bytes are `first`."""
        members = []
        for i in range(4):
            png = first if i == 0 else pngs[(4 * index + i) % len(pngs)]
            split = {"split": ("train", "val")[i % 2]}
            members += _sample(f"{index:05d}{i:04d}", png, f"stamp {index}.{i}", split)
        fs.pipe_file(f"{shards.removeprefix('s3://')}/{index:05d}.tar", _tar_bytes(members))

    def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return _tar(Path(tmp) / "x.tar", members).read_bytes()

    for index in range(3):
        upload(index, pngs[(4 * index) % len(pngs)])
    specs = {m: EncoderSpec(f"fake-{m}", m, 4, "none", "r1", "last", factory=None)  # type: ignore[arg-type]
             for m in ("image", "text")}

    def plan():
        cfg = EncodeConfig(dataset="webdataset", root=shards, splits=["train"], modalities=["image", "text"],
                           store_root=root, shard_size=2, batch_size=2, workers=0, split_field="split")
        ds = get_dataset("webdataset", shards, options=cfg.dataset_options())
        return cfg, plan_jobs(cfg, ds)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("m3jepa.encode.jobs.encoder_spec", lambda cfg, modality, ds: specs[modality])
        cfg, jobs = plan()
        assert all(isinstance(job.path, StoreURL) for job in jobs)
        for job in jobs:
            encoder = _Pixels(specs["image"]) if job.modality == "image" else _Fake(job.spec)
            encode_store(job, encoder, cfg, DistInfo())
        assert [cache_state(job, cfg) for job in plan()[1]] == [True, True]
        edited = bytearray(pngs[4])
        edited[-20] ^= 0xFF  # one byte inside the PNG's last chunk: same size, other bytes
        upload(1, bytes(edited))  # shard 1 re-uploaded
        image, text = (cache_state(job, cfg) for job in plan()[1])
    assert isinstance(image, str), image
    # the time has one-second steps: the ETag (the MD5 of a plain upload) tells two same-size uploads apart
    from m3jepa.data.tars import shard_stat

    tar = f"{shards}/00001.tar"
    assert shard_stat(tar).endswith(":" + hashlib.md5(fs.cat_file(tar.removeprefix("s3://"))).hexdigest())
    assert "2 of 6 rows changed since it was written (2 media files; first: 000010000, 000010002)" in image
    assert text is True  # its captions did not change
    assert sorted(m.modality for _, m in list_stores(root)) == ["image", "text"]


# ---------------------------------------------------------------- `m3jepa stores import` into the bucket

IMPORT = ["--dataset", "cc-bucket", "--image-encoder", "img-x", "--text-encoder", "txt-y",
          "--shard-size", "8"]


def _import_args(src: Path | str, root: str) -> list[str]:
    return ["stores", "import", str(src), *IMPORT, "--store-root", root]


def _cli(*args: str):
    """The real CLI in this process (typer's runner: no interpreter start); its result."""
    from typer.testing import CliRunner

    from m3jepa import cli

    return CliRunner().invoke(cli.app, list(args))


@pytest.fixture(scope="module")
def imported(s3, tmp_path_factory) -> tuple[Path, str, Path, str]:
    """One clip-retrieval folder (2 shards of 40 rows, hash split) imported by the CLI into the bucket and
    into a local folder: (source, bucket root, local root, the bucket import's stdout)."""
    from test_store_import import random_shards, write_clip_retrieval

    tmp = tmp_path_factory.mktemp("import")
    src = write_clip_retrieval(tmp / "emb", random_shards(2, 40))
    out = {}
    for root in (f"s3://{BUCKET}/imported", str(tmp / "local")):
        res = _cli(*_import_args(src, root))
        assert res.exit_code == 0, res.output[-3000:]
        out[root] = res.stdout
    return src, f"s3://{BUCKET}/imported", tmp / "local", out[f"s3://{BUCKET}/imported"]


def _store_paths(root: str | Path) -> dict[tuple[str, str], object]:
    return {(split, mod): store_path(location(root), "cc-bucket", split, mod, enc)
            for split in ("train", "val", "test") for mod, enc in (("image", "img-x"), ("text", "txt-y"))}


@pytest.mark.slow
def test_an_import_into_the_bucket_is_the_local_import_verifies_and_trains(imported, tmp_path):
    src, url, local, stdout = imported
    assert "(cached)" not in stdout and url in stdout
    nxt = next(x for x in stdout.splitlines() if x.startswith("next: "))
    assert f"--store-root {url} " in nxt  # the printed next command names the bucket
    remote_stores, local_stores = _store_paths(url), _store_paths(local)
    for key, path in remote_stores.items():
        objects = _objects(path.relative_to(location(f"s3://{BUCKET}")))
        files = {p.relative_to(local_stores[key]).as_posix(): p.read_bytes()
                 for p in local_stores[key].rglob("*") if p.is_file() and not p.name.startswith(".lock")}
        assert sorted(objects) == sorted(files), key  # no lease, no writing.json left in the bucket
        for name, data in files.items():
            if name == "manifest.json":  # the same manifest: nothing in it names where the store is
                assert json.loads(objects[name]) == json.loads(data), key
            else:
                assert objects[name] == data, (key, name)  # shard bytes, sidecars, rows.jsonl
    verified = _cli("stores", "verify", str(remote_stores[("train", "image")]))  # the listing's MD5s
    assert verified.exit_code == 0 and ": OK (" in verified.stdout, verified.output
    again = _cli(*_import_args(src, url))
    assert again.exit_code == 0 and again.stdout.count("(cached)") == 6, again.output[-3000:]
    # the printed next command, as printed, trains a few steps with the store feed from the bucket
    small = {"train.max_steps": 4, "train.batch_size": 16, "train.eval_every": 4,
             "train.checkpoint_every": 4, "model.dim": 32, "model.hidden": 32, "model.num_experts": 2,
             "model.top_k": 1, "model.cl_dim": 16, "train.feed": "store", "train.num_threads": 1}
    run = tmp_path / "run"
    res = _cli(*nxt.removeprefix("next: m3jepa ").split(), "--run", str(run), "--device", "cpu",
               *_sets(**small))
    assert res.exit_code == 0, res.output[-3000:]
    assert json.loads((run / "stores.json").read_text())["store_root"] == url
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["val"]["image->text"]["R@10"] >= 0


@pytest.mark.slow
def test_kill_9_mid_import_to_the_bucket_resumes_to_the_same_objects(imported):
    src, url, _, _ = imported
    killed = f"s3://{BUCKET}/import-killed"
    store = _store_paths(killed)[("train", "image")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    fs = _fs()
    # two of its 8 shards committed
    _kill_once_committed(_import_args(src, killed), env, (store / "shards/00001.json").key, 120)
    assert not fs.exists((store / "manifest.json").key) and fs.exists((store / ".lease.rank0").key)
    assert store not in [p for p, _ in list_stores(killed)]  # invisible until its manifest commits

    resumed = _cli(*_import_args(src, killed))  # the dead holder's lease (this machine) is taken over
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert f"--store-root {killed} " in resumed.stdout
    a, b = _objects("import-killed"), _objects("imported")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)  # byte-identical objects, no lease


def test_import_refuses_a_secret_in_the_store_url_and_a_url_source_in_one_line(imported):
    src, _, _, _ = imported
    before = _fs().find(BUCKET)
    for args in (_import_args(src, f"s3://AKIAEXAMPLE:{SECRET}@{BUCKET}/x"),
                 _import_args(src, f"s3://{BUCKET}/x?X-Amz-Signature={SECRET}"),
                 _import_args(f"s3://{BUCKET}/emb", f"s3://{BUCKET}/x")):
        res = _cli(*args)
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
        assert SECRET not in res.output and "Traceback" not in res.output
    assert "must be in a local folder" in res.output  # the last: a URL as SOURCE
    assert "AWS_SECRET_ACCESS_KEY" in _cli(*_import_args(src, f"s3://k:{SECRET}@{BUCKET}/x")).output
    assert _fs().find(BUCKET) == before  # nothing written
