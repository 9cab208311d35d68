"""`--dataset webdataset`: img2dataset's tar shards read as a record stream (m3jepa/data/wds.py, tars.py).

Shards are written here with Python's tarfile (members named as img2dataset names them, and some named
as no producer should), from real Tux Paint stamps. The end-to-end test against img2dataset itself is
tests/test_img2dataset.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
from launch import ENV, torchrun

from m3jepa.config import EncodeConfig
from m3jepa.data import get_dataset, wds
from m3jepa.data.records import (
    Blob,
    DatasetError,
    ListStream,
    RecordStream,
    record_stream,
    row_fingerprint,
)
from m3jepa.data.wds import hash_split
from m3jepa.distributed import DistInfo
from m3jepa.encode.jobs import plan_jobs
from m3jepa.encode.runner import encode_store
from m3jepa.encoders.base import EncodedBatch, EncoderSpec


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar shard holding `members` (name, bytes) in order, as regular files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, png: bytes, caption: str | None = "a stamp", meta: dict | None = None,
            ext: str = "png") -> list[tuple[str, bytes]]:
    out = [(f"{key}.{ext}", png)]
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    out.append((f"{key}.json", json.dumps(meta or {"key": key}).encode()))
    return out


@pytest.fixture
def pngs(real_pngs: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in real_pngs]


@pytest.fixture
def shards(tmp_path: Path, pngs: list[bytes]) -> Path:
    """Three shards of 4, 4 and 2 samples (keys as img2dataset writes them), splits in their .json."""
    root = tmp_path / "shards"
    k = 0
    for s, n in enumerate((4, 4, 2)):
        members = []
        for i in range(n):
            key = f"{s:05d}{i:04d}"
            split = ("train", "val")[k % 2]
            members += _sample(key, pngs[k % len(pngs)], f"stamp number {k}", {"split": split})
            k += 1
        _tar(root / f"{s:05d}.tar", members)
    return root


# ---------------------------------------------------------------- the stream contract


def test_list_datasets_stream_through_the_adapter(tuxpaint_root):
    ds = get_dataset("tuxpaint", limit=6)
    stream = record_stream(ds, "train", "text")
    assert isinstance(stream, ListStream) and isinstance(stream, RecordStream) and stream.parts() is None
    records = ds.records("train", "text")
    assert list(stream.read()) == records
    assert [r.row_id for r in stream.read([(1, 3), (5, 6)])] == [1, 2, 5]


def test_a_webdataset_streams_and_lists_the_same_records(shards, pngs):
    ds = get_dataset("webdataset", str(shards), options={"split_field": "split"})
    stream = ds.stream("train", "image")
    assert isinstance(stream, RecordStream)
    listed = list(stream.read(data=False))  # planning: no image bytes read
    read = list(stream.read())  # encoding: every member's bytes, by the webdataset library
    assert [r.sample_id for r in listed] == [r.sample_id for r in read] == [
        "000000000", "000000002", "000010000", "000010002", "000020000"]
    assert [r.row_id for r in read] == list(range(5)) and all(r.data is None for r in listed)
    assert read[1].data == pngs[2] and read[1].payload == f"{shards}/00000.tar:000000002.png"
    assert stream.parts() == [(0, 2), (2, 4), (4, 5)]
    assert read == ds.records("train", "image")  # records(): the same rows, in a list
    captions = [r.payload for r in ds.stream("val", "text").read()]
    assert captions == ["stamp number 1", "stamp number 3", "stamp number 5", "stamp number 7",
                        "stamp number 9"]
    assert isinstance(read[0].media(), Blob) and read[0].media().data == pngs[0]


def test_ranges_open_only_the_shards_that_hold_them(shards, monkeypatch):
    ds = get_dataset("webdataset", str(shards), options={"split_field": "split"})
    stream = ds.stream("train", "image")
    everything = list(stream.read())
    opened: list[str] = []
    real = wds.read_members
    monkeypatch.setattr(wds, "read_members", lambda name: opened.append(Path(name).name) or real(name))
    got = list(stream.read([(2, 3), (4, 5)]))
    assert got == [everything[2], everything[4]]
    assert opened == ["00001.tar", "00002.tar"]  # shard 00000 holds neither row: never opened


def test_split_rules(shards, tmp_path):
    by_hash = get_dataset("webdataset", str(shards), seed=3)
    for split in ("train", "val", "test"):
        keys = [r.sample_id for r in by_hash.stream(split, "text").read()]
        assert all(hash_split(k, 3) == split for k in keys)
    assert sum(len(list(by_hash.stream(s, "text").read())) for s in by_hash.splits()) == 10
    # per-split patterns, relative to the root, read through an fsspec URL (file://)
    url = f"file://{shards}"
    per_split = get_dataset("webdataset", url, options={"train_shards": "{00000..00001}.tar",
                                                         "val_shards": "00002.tar"})
    assert per_split.splits() == ["train", "val"]
    assert [r.sample_id for r in per_split.stream("val", "image").read()] == ["000020000", "000020001"]
    assert len(list(per_split.stream("train", "text").read())) == 8
    # a brace pattern as the root; limit keeps the first N samples of each split
    pattern = get_dataset("webdataset", f"{shards}/{{00001..00002}}.tar", limit=2,
                          options={"split_field": "split"})
    assert [r.sample_id for r in pattern.stream("train", "text").read()] == ["000010000", "000010002"]
    with pytest.raises(DatasetError, match="either per-split shards"):
        get_dataset("webdataset", str(shards), options={"split_field": "split", "val_shards": "00002.tar"})
    with pytest.raises(DatasetError, match=r"00003.tar not found \(and 1 more\)"):
        get_dataset("webdataset", f"{shards}/{{00001..00004}}.tar")
    with pytest.raises(DatasetError, match=r"encode.caption_field apply to --dataset webdataset only"):
        get_dataset("tuxpaint", options={"caption_field": "caption"})


def test_hash_split_is_the_documented_formula():
    for key in ("000000000", "a/b", "clé"):
        u = int(hashlib.sha256(f"7\x00{key}".encode()).hexdigest()[:16], 16) / 2**64
        assert hash_split(key, 7) == ("train" if u < 0.8 else "val" if u < 0.9 else "test")
    counts = {s: 0 for s in ("train", "val", "test")}
    for k in range(5000):
        counts[hash_split(f"{k:09d}", 0)] += 1
    assert abs(counts["train"] - 4000) < 150 and abs(counts["val"] - 500) < 100


def test_caption_from_a_json_field(tmp_path, pngs):
    root = _tar(tmp_path / "s" / "00000.tar", _sample("k0", pngs[0], None, {"caption": " A badger. "})
                + _sample("k1", pngs[1], None, {"caption": "An echidna."}))
    ds = get_dataset("webdataset", str(root), seed=1, options={"caption_field": "caption"})
    texts = {r.sample_id: r.payload for s in ds.splits() for r in ds.stream(s, "text").read()}
    assert texts == {"k0": "A badger.", "k1": "An echidna."}


# ---------------------------------------------------------------- bad members


BAD = {
    "no-caption": (lambda png: _sample("bad", png, caption=None), "no caption (.txt member)"),
    "empty-caption": (lambda png: _sample("bad", png, caption="  "), "its caption is empty"),
    "no-image": (lambda png: [("bad.txt", b"x"), ("bad.json", b"{}")], "no image member"),
    "traversal": (lambda png: [("../bad.png", png), ("../bad.txt", b"x"), ("../bad.json", b"{}")],
                  "traversal-looking name"),
    "absolute": (lambda png: [("/etc/bad.png", png), ("/etc/bad.txt", b"x")], "is absolute"),
    "repeated": (lambda png: _sample("bad", png) + [("bad.png", png)], "used twice in this shard"),
    "bad-json": (lambda png: [("bad.png", png), ("bad.txt", b"x"), ("bad.json", b"{not json")],
                 "not valid JSON"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_members_name_shard_and_key(tmp_path, pngs, kind):
    make, reason = BAD[kind]
    good = _sample("good", pngs[0], meta={"split": "train"})
    last = _sample("last", pngs[2], meta={"split": "train"})
    shard = _tar(tmp_path / "s" / "00000.tar", good + make(pngs[1]) + last)
    options = {"split_field": "split"} if kind == "bad-json" else {}

    def ids(ds) -> list[str]:
        return [r.sample_id for s in ds.splits() for r in ds.stream(s, "image").read(data=False)]

    with pytest.raises(DatasetError) as e:
        ids(get_dataset("webdataset", str(shard.parent), options=options or {"split_field": "split"}))
    line = str(e.value)
    assert str(shard) in line and reason in line and "--skip-bad" in line and "\n" not in line
    lenient = get_dataset("webdataset", str(shard.parent), skip_bad=True,
                          options=options or {"split_field": "split"})
    assert ids(lenient) == ["good", "last"]
    [(key, why)] = lenient.skipped
    assert key in ("bad", "../bad", "/etc/bad") and str(shard) in why and reason in why


def test_an_unreadable_shard_is_one_line(shards):
    tar = shards / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:700])  # cut inside the first member
    ds = get_dataset("webdataset", str(shards), options={"split_field": "split"})
    with pytest.raises(DatasetError, match=r"shard .*00001.tar cannot be read as a tar file"):
        list(ds.stream("train", "image").read(data=False))
    with pytest.raises(DatasetError, match=r"shard .*00001.tar cannot be read as a tar file"):
        list(ds.stream("train", "image").read())


# ---------------------------------------------------------------- content fingerprints per shard


def test_fingerprints_follow_the_shard_or_the_member_bytes(shards, pngs):
    ds = get_dataset("webdataset", str(shards), options={"split_field": "split"})
    first = next(ds.stream("train", "image").read())
    st = os.stat(shards / "00000.tar")
    assert row_fingerprint(first, "stat") == f"stat:{st.st_size}:{st.st_mtime_ns}"
    assert row_fingerprint(first, "sha256") == "sha256:" + hashlib.sha256(pngs[0]).hexdigest()
    os.utime(shards / "00000.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the shard rewritten
    again = next(ds.stream("train", "image").read())
    assert row_fingerprint(again, "stat") != row_fingerprint(first, "stat")
    assert row_fingerprint(again, "sha256") == row_fingerprint(first, "sha256")  # same bytes
    with pytest.raises(ValueError, match="data=True"):
        row_fingerprint(next(ds.stream("train", "image").read(data=False)), "sha256")


# ---------------------------------------------------------------- ranks take whole shards


class _BytesPre:
    """An image payload (a Blob) or a caption → (length, crc, first byte): depends only on its bytes."""

    def __call__(self, payload: Blob | str) -> dict[str, torch.Tensor]:
        data = payload.data if isinstance(payload, Blob) else payload.encode()
        return {"x": torch.tensor([float(len(data)), float(zlib.crc32(data) % 10007), float(data[0])])}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([it["x"] for it in items])}  # (B, 3)


class _Fake:
    def __init__(self, spec: EncoderSpec):
        self.spec = spec
        self.preprocessor = _BytesPre()

    def encode(self, batch: dict[str, torch.Tensor], kind: str) -> EncodedBatch:
        return EncodedBatch(pooled=torch.cat([batch["x"], batch["x"][:, :1] / 7], dim=1))  # (B, 4)


class _Rank(DistInfo):
    """Rank r of 2 run one after the other in this process: barriers are no-ops (rank 1 runs first)."""

    def barrier(self) -> None:
        pass


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_ranks_take_whole_shards_and_write_the_one_process_store(shards, tmp_path, monkeypatch):
    spec = EncoderSpec("fake", "image", 4, "none", "r1", "last", factory=None)  # type: ignore[arg-type]
    monkeypatch.setattr("m3jepa.encode.jobs.encoder_spec", lambda cfg, modality, ds: spec)
    opened: list[tuple[int, str]] = []
    real, rank_now = wds.read_members, [0]
    monkeypatch.setattr(wds, "read_members", lambda n: opened.append((rank_now[0], Path(n).name)) or real(n))

    def run(root: Path, ranks: list[int], world: int) -> None:
        cfg = EncodeConfig(dataset="webdataset", root=str(shards), splits=["train"], modalities=["image"],
                           store_root=str(root), shard_size=2, batch_size=2, workers=0, split_field="split")
        ds = get_dataset("webdataset", str(shards), options=cfg.dataset_options())
        [job] = plan_jobs(cfg, ds)
        for rank in ranks:
            rank_now[0] = rank
            encode_store(job, _Fake(spec), cfg, _Rank(rank, world))

    run(tmp_path / "one", [0], 1)
    opened.clear()
    run(tmp_path / "two", [1, 0], 2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    # train rows per shard: 2, 2, 1 → store shards of 2 rows start in tar 0, 1, 2 → ranks 0, 1, 0
    assert opened == [(1, "00001.tar"), (0, "00000.tar"), (0, "00002.tar")]


TORCHRUN_TARS = (4, 2, 6, 3)  # train rows per tar: parts 0..4, 4..6, 6..12, 12..15 (store shards of 2 rows)


@pytest.mark.slow
def test_torchrun_ranks_take_whole_tar_shards_and_write_the_one_process_bytes(tmp_path, pngs):
    """The real launcher: `torchrun` (c10d rendezvous on 127.0.0.1, gloo, CPU) with two ranks, against a
    one-process encode of the same tars. Tars p = 0, 2 (10 rows) go to rank 0 and 1, 3 (5 rows) to rank 1;
    each rank's `--verbose` log names the tars it read for each store."""
    root, k = tmp_path / "shards", 0
    for s, n in enumerate(TORCHRUN_TARS):
        members = []
        for i in range(n):
            key, png = f"{s:05d}{i:04d}", pngs[k % len(pngs)]
            members += _sample(key, png, f"stamp number {k}", {"split": "train"})
            k += 1
        _tar(root / f"{s:05d}.tar", members)
    args = ["encode", "--dataset", "webdataset", "--root", str(root), "--split-field", "split", "--split",
            "train", "--shard-size", "2", "--workers", "0", "--verbose", "--store-root"]
    # torchrun runs each rank with OMP_NUM_THREADS=1; --threads 1 gives the one-process run the same
    one = subprocess.Popen([sys.executable, "-m", "m3jepa", *args[:1], "--threads", "1", *args[1:],
                            str(tmp_path / "one")], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        two = torchrun("--tee", "3", "-m", "m3jepa", *args, str(tmp_path / "two"), timeout=300)
    finally:
        out_one = one.communicate(timeout=300)[0]
    assert one.returncode == 0, out_one[-3000:]
    out = two.stdout + two.stderr
    assert two.returncode == 0, out[-3000:]

    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    manifests = sorted(n for n in a if n.endswith("/manifest.json"))
    assert [n.split("/")[-3] for n in manifests] == ["image", "text"]
    for n in manifests:  # complete stores of every row (the manifest holds no timing field)
        m = json.loads(a[n])
        assert m["complete"] and m["rows"] == sum(TORCHRUN_TARS) and len(m["shards"]) == 8
    assert a.keys() == b.keys() and sum(".zarr/features/c/" in n for n in a) == 16
    assert [n for n in a if a[n] != b[n]] == []  # every shard array, sidecar, manifest and rows.jsonl

    def lines(rank: int, text: str) -> list[str]:
        prefix = f"[default{rank}]:"  # torchrun --tee's label of local rank `rank`'s lines
        return [x[len(prefix):] for x in out.splitlines() if x.startswith(prefix) and text in x]

    for rank, (tars, rows, shards) in enumerate([((0, 2), 10, 5), ((1, 3), 5, 3)]):
        share = f"rank {rank} of 2 takes whole parts {tars[0]}, {tars[1]} of the dataset's 4 ({rows} rows)"
        assert len(lines(rank, share + f"; writes {shards} of 8 store shards")) == 2, out[-3000:]  # per store
        reads = lines(rank, "webdataset train: reading")
        read = [re.search(r"reading \S*/(\d{5})\.tar ", x).group(1) for x in reads]
        assert read == [f"{t:05d}" for t in tars] * 2, read  # the image store's, then the text store's
        table = [x for x in lines(rank, "train  ") if re.search(r"(image|text) ", x)]
        assert len(table) == 2 and all(re.search(rf" 15 +{rows} +0 ", x) for x in table), table


# ---------------------------------------------------------------- through the runner: bad pixels, staleness


class _Pixels:
    """The real image preprocessor (at 32 px) and a forward pass of channel means: decoding is real."""

    def __init__(self, spec: EncoderSpec):
        from m3jepa.encoders.image import ImagePreprocessor

        self.spec = spec
        self.preprocessor = ImagePreprocessor(resize=32, crop=32)

    def encode(self, batch: dict[str, torch.Tensor], kind: str) -> EncodedBatch:
        x = batch["pixel_values"]  # (B, 3, 32, 32)
        return EncodedBatch(pooled=torch.cat([x.mean((2, 3)), x.std((2, 3))[:, :1]], dim=1))  # (B, 4)


def _plan(shards: Path, store_root: Path, modalities: list[str], skip_bad: bool = False, **kw):
    cfg = EncodeConfig(dataset="webdataset", root=str(shards), splits=["train"], modalities=modalities,
                       store_root=str(store_root), shard_size=2, batch_size=2, workers=0, split_field="split",
                       skip_bad=skip_bad, **kw)
    ds = get_dataset("webdataset", str(shards), skip_bad=skip_bad, options=cfg.dataset_options())
    return cfg, plan_jobs(cfg, ds)


@pytest.fixture
def fake_specs(monkeypatch):
    specs = {m: EncoderSpec(f"fake-{m}", m, 4, "none", "r1", "last", factory=None)  # type: ignore[arg-type]
             for m in ("image", "text")}
    monkeypatch.setattr("m3jepa.encode.jobs.encoder_spec", lambda cfg, modality, ds: specs[modality])
    return specs


def test_a_corrupt_member_is_skipped_and_named(shards, tmp_path, fake_specs):
    from m3jepa.data.records import BadItemError
    from m3jepa.store.manifest import load_manifest, read_rows

    tar = shards / "00001.tar"  # train rows 2 and 3: keys 000010000 and 000010002
    with tarfile.open(tar) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t]
    members = [(n, b"\x89PNG\r\n\x1a\n" + bytes(200) if n == "000010002.png" else d) for n, d in members]
    _tar(tar, members)
    cfg, [job] = _plan(shards, tmp_path / "stores", ["image"])
    with pytest.raises(BadItemError, match=r"000010002: image .*00001.tar:000010002.png is corrupt.*"
                                           r"train/image row 3.*--skip-bad"):
        encode_store(job, _Pixels(fake_specs["image"]), cfg, DistInfo())
    cfg, [job] = _plan(shards, tmp_path / "stores", ["image"], skip_bad=True)
    encode_store(job, _Pixels(fake_specs["image"]), cfg, DistInfo())
    m = load_manifest(job.path)
    assert m.complete and [s["sample_id"] for s in m.skipped] == ["000010002"]
    assert [r.valid for r in read_rows(job.path)] == [True, True, True, False, True]


def test_edited_shard_is_stale_untouched_cached(shards, tmp_path, fake_specs):
    from m3jepa.encode.jobs import cache_state

    cfg, jobs = _plan(shards, tmp_path / "stores", ["image", "text"])
    for job in jobs:
        encode_store(job, _Pixels(fake_specs["image"]) if job.modality == "image" else _Fake(job.spec), cfg,
                     DistInfo())
    assert [cache_state(job, cfg) for job in _plan(shards, tmp_path / "stores", ["image", "text"])[1]] == [
        True, True]
    st = os.stat(shards / "00001.tar")
    os.utime(shards / "00001.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # shard 1 rewritten
    image, text = (cache_state(job, cfg) for job in _plan(shards, tmp_path / "stores", ["image", "text"])[1])
    assert isinstance(image, str)
    assert "2 of 5 rows changed since it was written (2 media files; first: 000010000, 000010002)" in image
    assert text is True  # its captions did not change
    # fingerprinted by the members' bytes, a rewrite with the same bytes changes nothing
    cfg, jobs = _plan(shards, tmp_path / "sha", ["image"], content_hash="sha256")
    encode_store(jobs[0], _Pixels(fake_specs["image"]), cfg, DistInfo())
    os.utime(shards / "00002.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert cache_state(_plan(shards, tmp_path / "sha", ["image"], content_hash="sha256")[1][0], cfg) is True
