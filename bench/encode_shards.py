"""Stage 1 over WebDataset shards: throughput against the bare encoder forward, and peak memory against rows.

    python -m bench.encode_shards --ratio-rows 400 --rounds 3 --rss-rows 5000 10000 20000

Shards: `max(--rss-rows)` samples written with webdataset's TarWriter, 1000 per tar, each a real Tux Paint
stamp (all PNG stamps in turn, repeated) with a caption and `{"split": "train"}` in its .json.

  ratio  in one process, on the first `--ratio-rows` samples: `forward` is the encoder on batches decoded
         beforehand (the runner's shard and batch plan), `encode` is `m3jepa.encode.runner.encode_store`
         (what `m3jepa encode --dataset webdataset` runs per store: the tar shards read by the webdataset
         library a shard ahead, decoded by DataLoader workers, encoded, committed on the write thread);
         rounds alternate and the ratio encode/forward of rows/s is taken per round (as bench/encode.py).
  rss    one `m3jepa encode --dataset webdataset --limit N --modality image` process per N: the peak
         resident memory of the main process and of the whole process tree (main + decoding workers),
         sampled every 0.2 s with psutil.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench import _common as C
from bench.encode import forward_only, predecoded, store_bytes
from m3jepa.config import EncodeConfig
from m3jepa.distributed import DistInfo

STAMPS = Path("/usr/share/tuxpaint/stamps")
PER_TAR = 1000


def write_shards(folder: Path, rows: int) -> list[Path]:
    """`rows` samples in tars of PER_TAR, from the Tux Paint PNG stamps in turn (repeated)."""
    import webdataset as wds

    pngs = sorted(STAMPS.rglob("*.png"))
    folder.mkdir(parents=True, exist_ok=True)
    tars = []
    for t, start in enumerate(range(0, rows, PER_TAR)):
        path = folder / f"{t:05d}.tar"
        with wds.TarWriter(str(path)) as w:
            for k in range(start, min(start + PER_TAR, rows)):
                png = pngs[k % len(pngs)]
                w.write({"__key__": f"{t:05d}{k - start:04d}", "png": png.read_bytes(),
                         "txt": f"{png.stem.replace('_', ' ')} number {k}",
                         "json": json.dumps({"split": "train"}).encode()})
        tars.append(path)
    return tars


def config(args: argparse.Namespace, shards: Path, store_root: Path, limit: int) -> EncodeConfig:
    return EncodeConfig(dataset="webdataset", root=str(shards), splits=["train"], modalities=["image"],
                        store_root=str(store_root), batch_size=args.batch_size, workers=args.workers,
                        device="cpu", shard_size=args.shard_size, limit=limit, threads=args.threads,
                        split_field="split")


def measure_ratio(args: argparse.Namespace, shards: Path, tmp: Path) -> dict:
    """encode_store against the bare forward pass on the same rows, alternating rounds."""
    from m3jepa.data import get_dataset
    from m3jepa.encode.jobs import plan_jobs
    from m3jepa.encode.mapper import load_encoder
    from m3jepa.encode.runner import encode_store
    from m3jepa.encoders import resolve_device
    from m3jepa.store import open_store

    cfg = config(args, shards, tmp / "plan", args.ratio_rows)
    ds = get_dataset("webdataset", str(shards), limit=args.ratio_rows, options=cfg.dataset_options())
    [job] = plan_jobs(cfg, ds)
    encoder = load_encoder(job, cfg, *resolve_device("cpu"))
    batches = predecoded(job, encoder.preprocessor, args.batch_size)
    state: dict = {"calls": 0, "first": None, "results": []}

    def forward() -> None:
        state["features"] = forward_only(encoder, batches, cfg.kind)

    def encode() -> None:
        path = tmp / f"store-{state['calls']}"
        state["calls"] += 1
        state["results"].append(encode_store(replace(job, path=path), encoder, cfg, DistInfo()))
        files = store_bytes(path)
        if state["first"] is None:  # the store holds the forward pass's features, every round the same bytes
            state["first"] = files
            stored = open_store(path).read_all(np.float32)
            if not np.array_equal(stored, state["features"].astype(cfg.dtype).astype(np.float32)):
                raise AssertionError("the store differs from the forward pass's features")
        elif files != state["first"]:
            raise AssertionError("this round's store differs from the first round's")
        shutil.rmtree(path)

    forward()
    encode()  # warm-up, checked
    state["results"].clear()
    times = C.interleaved({"forward": forward, "encode": encode}, args.rounds, {})
    rows = job.manifest.rows
    rps = {k: C.Spread([rows / s for s in v.values]) for k, v in times.items()}
    ratio = C.ratio(times["forward"], times["encode"])
    for r, res in enumerate(state["results"]):
        f, e = rps["forward"].values[r], rps["encode"].values[r]
        print(f"  round {r}: forward {f:.1f} rows/s, encode {e:.1f} rows/s, ratio {ratio.values[r]:.3f} "
              f"(read wait {res.read_s:.2f} s, compute {res.compute_s:.2f} s, write {res.write_s:.2f} s)")
    print(f"  rows/s forward {rps['forward']}   encode {rps['encode']}   encode/forward {ratio}")
    return {"rows": rows, "rows_per_s": {k: v.to_json() for k, v in rps.items()},
            "ratio_encode_over_forward": ratio.to_json()}


def measure_rss(args: argparse.Namespace, shards: Path, tmp: Path, rows: int) -> dict:
    """Peak RSS of one `m3jepa encode` process (and its process tree) over the first `rows` samples."""
    import psutil

    cmd = [sys.executable, "-m", "m3jepa", "encode", "--dataset", "webdataset", "--root", str(shards),
           "--split-field", "split", "--split", "train", "--modality", "image", "--limit", str(rows),
           "--store-root", str(tmp / f"rss-{rows}"), "--workers", str(args.workers), "--device", "cpu",
           "--shard-size", str(args.shard_size), "--set", f"encode.batch_size={args.batch_size}",
           "--image-encoder", args.image_encoder]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    tick = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    main, tree = 0, 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
            kids = sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.Error:
            break
        main, tree = max(main, rss), max(tree, rss + kids)
        time.sleep(0.2)
    out, err = proc.communicate()
    seconds = time.perf_counter() - tick
    if proc.returncode != 0:
        raise RuntimeError(f"encode of {rows} rows failed:\n{err[-3000:]}")
    shutil.rmtree(tmp / f"rss-{rows}")
    print(f"  {rows} rows: peak RSS main {main / 2**20:.0f} MiB, process tree {tree / 2**20:.0f} MiB, "
          f"{seconds:.0f} s")
    return {"rows": rows, "peak_rss_main_mib": round(main / 2**20, 1),
            "peak_rss_tree_mib": round(tree / 2**20, 1), "seconds": round(seconds, 1)}


def tiny_dinov2(path: Path) -> Path:
    """A randomly initialised DINOv2 of width 32 and 2 layers, saved to `path` (as tests/test_encoders.py)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=14)
    Dinov2Model(cfg).save_pretrained(path)
    return path


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--ratio-rows", type=int, default=400, help="rows of the throughput comparison (0: skip)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rss-rows", type=int, nargs="*", default=[5000, 10000, 20000])
    p.add_argument("--image-encoder", default="efficientnet-lite0",
                   help="the encoder of the memory runs (registry name or hf:<dir>)")
    p.add_argument("--tiny-encoder", action="store_true",
                   help="memory runs with a tiny random DINOv2 (2 layers, width 32) instead: the reading, "
                        "decoding and writing path at full size, the forward pass almost free")
    p.add_argument("--workers", type=int, default=EncodeConfig.workers)
    p.add_argument("--batch-size", type=int, default=EncodeConfig.batch_size)
    p.add_argument("--shard-size", type=int, default=EncodeConfig.shard_size)
    p.add_argument("--keep", type=Path, default=None, help="write the shards here and keep them")
    args = p.parse_args()
    C.setup(args)
    record = C.header("encode over WebDataset shards: m3jepa encode vs the bare forward; peak RSS vs rows")
    record["config"] = {k: getattr(args, k) for k in ("ratio_rows", "rounds", "rss_rows", "image_encoder",
                                                       "workers", "batch_size", "shard_size")}
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp_name:
        tmp = Path(tmp_name)
        if args.tiny_encoder:
            args.image_encoder = f"hf:{tiny_dinov2(tmp / 'tiny-dinov2')}"
            record["config"]["image_encoder"] = "tiny random DINOv2 (hidden 32, 2 layers, patch 14, 224 px)"
        shards = args.keep or tmp / "shards"
        rows = max([args.ratio_rows, *args.rss_rows])
        if not sorted(shards.glob("*.tar")):
            tick = time.perf_counter()
            write_shards(shards, rows)
            took = time.perf_counter() - tick
            print(f"  wrote {rows} samples in {-(-rows // PER_TAR)} shards in {took:.1f} s")
        if args.ratio_rows:
            record["ratio"] = measure_ratio(args, shards, tmp)
        record["rss"] = [measure_rss(args, shards, tmp, n) for n in args.rss_rows]
    if record["rss"]:
        peaks = [r["peak_rss_tree_mib"] for r in record["rss"]]
        print(f"  peak RSS (tree) spread: max/min = {max(peaks) / min(peaks):.3f}")
    record["load_1min_after"] = round(C.load_average(), 2)
    print(f"  load after: {record['load_1min_after']}")
    C.write_json(args.json, record)


if __name__ == "__main__":
    main()
