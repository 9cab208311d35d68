"""Training fed from a Zarr store against training from tensors in memory, through the real
`m3jepa train-predictor`, and training from a store larger than RAM.

    python -m bench.store_feed --images 4000 --rounds 4 --steps 8   # side by side: feed=memory vs feed=store
    python -m bench.store_feed --big-gb 30 --big-steps 20           # a >= 30 GB store: peak RSS, samples/s
    python -m bench.store_feed --images 4000 --paired-steps 64      # + both feeds in one process
    python -m bench.store_feed --images 4000 --s3-steps 54          # the store feed from S3 vs local disk
    python -m bench.store_feed --paired-only --paired-steps 64 --paired-feeds memory,memory+ahead --small

The stores hold the paper's dims in float16 (images 1024, captions 4096, 5 captions per image), laid
out as `m3jepa encode` writes them. Each contender is one `m3jepa train-predictor` process training the
paper's predictor (bf16, B = 128). The two contenders differ only in train.feed:
  memory  the train split is read into a float16 tensor, and its rows are indexed per step
  store   each batch's rows are pread from the stores' chunk files, 2 steps ahead on a thread
Seconds per step come from the run's own metrics.jsonl (log_every = 1), leaving out the first step
(warm-up). Peak RSS is the training process's (ru_maxrss from wait4). `--precision fp32` trains in float32
instead of bf16 (for a CPU whose bf16 matmuls have no fast kernel).

Separate processes see the shared cores' load at different times, which is noisy (±20% per round
here). `--paired-steps` therefore also runs the loop's own `_train_step` in ONE process on one model,
alternating the feed step by step (M S S M ...). A slow patch of the machine then hits both feeds alike.

`--s3-steps N` writes the same stores to moto's S3 server on 127.0.0.1 (bench/s3server.py, a process of
its own) and runs `_train_step` on one model in one process, three store feeds taking turns in blocks of
BLOCK steps: the local store (preads), the bucket with no cache (one `cat_ranges` call of ranged GETs per
modality and batch) and the bucket through fsspec's file cache (encode.store_cache). Each block starts its
own read-ahead (2 steps ahead on a thread, as in a run) and its first step is left out. It also times each
feed's opening (every shard's sha256 verified, issue #20) and one batch read alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import _common as C
from m3jepa.config import PipelineConfig, save_toml
from m3jepa.core.feeder import read_ahead
from m3jepa.core.paired import load_split, resolve_feed
from m3jepa.data.records import Record, membership_fingerprint
from m3jepa.model.predictor import PAPER_DIMS, paper_preset
from m3jepa.store import Manifest, StoreWriter, rows_from_records, store_path
from m3jepa.train.schedule import directions_at

DATASET = "bench"
DIRECTIONS = ["image->text", "text->image"]
CAPTIONS = 5
ENCODERS = {m: f"random-{d}" for m, d in PAPER_DIMS.items()}


def write_store(root: Path | str, split: str, modality: str, rows: int, shard_size: int, seed: int):
    """A complete float16 store of random features, written shard by shard (bounded memory)."""
    dim = PAPER_DIMS[modality]
    group = (lambda i: i // CAPTIONS) if modality == "text" else (lambda i: i)  # caption i shows image i // 5
    records = [Record(i, f"{split}-{modality}{i}", f"{split}-g{group(i)}", modality, "") for i in range(rows)]
    manifest = Manifest(
        dataset=DATASET,
        split=split,
        modality=modality,
        membership=membership_fingerprint(records),
        rows=rows,
        encoder=ENCODERS[modality],
        encoder_revision="0",
        pooling="none",
        layers="none",
        dim=dim,
        dtype="float16",
        format="zarr",
        shard_size=shard_size,
    )
    # Drawing 15G normal numbers would take longer than the measurement: each shard is one random
    # pool of 4096 rows, shifted per shard (rows differ; their values do not matter here).
    pool = np.random.default_rng(seed).standard_normal((4096, dim), dtype=np.float32).astype(np.float16)
    path = store_path(root, DATASET, split, modality, ENCODERS[modality])
    with StoreWriter(path, manifest) as w:
        for index, start, end in w.planned_shards():
            w.write_shard(index, np.roll(np.resize(pool, (end - start, dim)), index, axis=0))
        w.finalize(rows_from_records(records), [])
    return path


def write_split(root: Path, split: str, images: int, shard_size: int) -> float:
    """Image and caption stores of one split; returns their size on disk, GB."""
    paths = [
        write_store(root, split, "image", images, shard_size, 1),
        write_store(root, split, "text", CAPTIONS * images, shard_size, 2),
    ]
    return sum(f.stat().st_size for p in paths for f in p.rglob("*") if f.is_file()) / 1e9


def pipeline(root: Path, run: Path, args, steps: int, feed: str) -> PipelineConfig:
    """The paper's predictor on the bench stores (`--small`: d = 512, h = 1024, 12 experts, top-4, fp32: a
    step this host trains in a second); one validation and one checkpoint, at the last step."""
    from m3jepa.config import ModelConfig

    small = ModelConfig(dim=512, hidden=1024, num_experts=12, top_k=4, cl_dim=256)
    cfg = C.pipeline(small if args.small else paper_preset(), args.batch,
                     bf16=not args.small and args.precision == "bf16", directions=DIRECTIONS)
    cfg.encode.dataset, cfg.encode.store_root = DATASET, str(root)
    cfg.encode.image_encoder, cfg.encode.text_encoder = ENCODERS["image"], ENCODERS["text"]
    cfg.run_dir = str(run)
    t = cfg.train
    t.max_steps, t.eval_every, t.checkpoint_every, t.log_every = steps, steps, steps, 1
    t.feed, t.num_threads = feed, args.threads
    return cfg


def run_cli(cfg: PipelineConfig, work: Path) -> dict:
    """One `m3jepa train-predictor` process: seconds per step (after the first), peak RSS, wall time."""
    toml = work / f"{Path(cfg.run_dir).name}.toml"
    save_toml(cfg, toml)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    log = (work / f"{Path(cfg.run_dir).name}.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "m3jepa", "train-predictor", "--pipeline", str(toml)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    log.close()
    text = Path(log.name).read_text()
    if proc.returncode:
        raise RuntimeError(f"train-predictor failed ({proc.returncode}):\n{text[-3000:]}")
    return {
        "s_per_step": step_seconds(Path(cfg.run_dir) / "metrics.jsonl", cfg.train.batch_size),
        "peak_rss_mb": usage.ru_maxrss / 1024.0,
        "wall_s": wall,
        "log": [ln for ln in text.splitlines() if "train.feed" in ln or "split train" in ln],
    }


def step_seconds(metrics: Path, batch: int) -> float:
    """Mean seconds per step over steps 2..N, from the cumulative samples/s the loop logs every step."""
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    # samples_per_s at step k is k·B / (seconds since the loop began), so elapsed(k) = k·B / rate
    elapsed = {x["step"]: x["step"] * batch / x["samples_per_s"] for x in lines if "samples_per_s" in x}
    last = max(elapsed)
    return (elapsed[last] - elapsed[1]) / (last - 1)


def side_by_side(args, root: Path) -> dict:
    size = write_split(root, "train", args.images, 4096)
    write_split(root, "val", 256, 4096)
    print(f"  train stores: {size:.2f} GB ({CAPTIONS * args.images:,} captions, {args.images:,} images)")
    times = {"memory": C.Spread(), "store": C.Spread()}
    rss = {"memory": C.Spread(), "store": C.Spread()}
    for r in range(args.rounds):
        order = ("memory", "store") if r % 2 == 0 else ("store", "memory")  # ABBA: no contender always first
        for feed in order:
            run = root / "runs" / f"{feed}{r}"
            got = run_cli(pipeline(root, run, args, args.steps, feed), root)
            times[feed].values.append(got["s_per_step"])
            rss[feed].values.append(got["peak_rss_mb"])
            shutil.rmtree(run)  # 1.7 GB of checkpoint each
        m, s = times["memory"].values[-1], times["store"].values[-1]
        print(f"  round {r}: s/step memory {m:.3f}, store {s:.3f}; store/memory throughput {m / s:.3f}")
    ratio = C.ratio(times["memory"], times["store"])  # time memory/store = throughput store/memory
    print(f"  s/step: memory {times['memory']}  store {times['store']}")
    print(f"  store-fed throughput / in-memory throughput (per round): {ratio}")
    print(f"  peak RSS, MiB: memory {rss['memory']}  store {rss['store']}")
    return {
        "train_store_gb": size,
        "seconds_per_step": {k: v.to_json() for k, v in times.items()},
        "store_over_memory": ratio.to_json(),
        "per_round": ratio.values,
        "peak_rss_mb": {k: v.to_json() for k, v in rss.items()},
        "read_only_s": read_only(args, root).to_json(),
        "verify_s": {k: v.to_json() for k, v in verify_cost(root, size).items()},
        **({"paired": paired_steps(args, root)} if args.paired_steps else {}),
    }


def paired_only(args, root: Path) -> dict:
    """Only the one-process comparison of two feeds (--paired-only)."""
    size = write_split(root, "train", args.images, 4096)
    write_split(root, "val", 256, 4096)
    print(f"  train stores: {size:.2f} GB ({CAPTIONS * args.images:,} captions, {args.images:,} images)")
    return {"train_store_gb": size, "paired": paired_steps(args, root)}


def paired_steps(args, root: Path) -> dict:
    """The loop's `_train_step` on one model, feeds A and B (`--paired-feeds`) alternating A B B A per
    step; the ratio per A/B pair. A feed is `memory` (rows indexed on the loop's thread), `memory+ahead`
    (the same rows, prepared by the read-ahead thread as the loop does now) or `store`."""
    import torch

    from m3jepa.core.checkpoint import TrainState
    from m3jepa.core.device import Runtime
    from m3jepa.core.objective import Objective
    from m3jepa.distributed import DistInfo
    from m3jepa.train.loop import _train_step
    from m3jepa.train.optim import build_optimizer

    a, b = args.paired_feeds
    cfg = pipeline(root, root / "runs" / "paired", args, args.paired_steps + 2, "memory")
    t = cfg.train
    if args.threads:
        torch.set_num_threads(args.threads)
    feeds = {f: load_split(cfg, "train", DIRECTIONS, f.split("+")[0]) for f in (a, b)}
    objective = Objective(cfg.model, cfg.loss, feeds[a].dims())
    runtime = Runtime(torch.device("cpu"), cfg.runtime.precision)
    optimizer = build_optimizer(objective, cfg, runtime)
    state, info, n = TrainState(dims=feeds[a].dims(), directions=DIRECTIONS), DistInfo(), t.max_steps
    is_b = lambda s: s % 4 in (1, 2)  # noqa: E731  (A B B A: neither feed always goes first)
    for f, mine in ((a, lambda s: not is_b(s)), (b, is_b)):
        if f != "memory":  # "memory" alone: no read-ahead, as before the memory feed read ahead
            feeds[f].readahead = read_ahead(
                feeds[f],
                lambda s, mine=mine: directions_at(s, t.directions, t.schedule) if mine(s) else [],
                range(n),
                t.batch_size,
                t.seed,
            )
    seconds = {a: [], b: []}
    for step in range(n):
        feed = b if is_b(step) else a
        t0 = time.perf_counter()
        _train_step(objective, optimizer, cfg, feeds[feed], state, step, n, info, runtime)
        if step >= 2:  # warm-up
            seconds[feed].append(time.perf_counter() - t0)
    for f in feeds.values():
        f.close()
    sa, sb = np.asarray(seconds[a]), np.asarray(seconds[b])
    k = min(len(sa), len(sb))
    pairs = C.Spread((sa[:k] / sb[:k]).tolist())
    whole = float(sa.mean() / sb.mean())
    print(f"  one process, {n - 2} steps alternating: s/step {a:13} {C.Spread(sa.tolist())}")
    print(f"  {'':34}s/step {b:13} {C.Spread(sb.tolist())}")
    print(f"  {b}/{a} throughput: {whole:.4f} (mean over steps); per {a}/{b} pair {pairs}")
    return {
        "feeds": [a, b],
        "a_s": sa.tolist(),
        "b_s": sb.tolist(),
        "b_over_a_throughput": whole,
        "pairs": pairs.to_json(),
    }


def read_only(args, root: Path) -> C.Spread:
    """Seconds to read one batch of both modalities from the stores, with nothing overlapping it."""
    data = load_split(pipeline(root, root / "runs" / "read", args, 1, "store"), "train", DIRECTIONS, "store")
    read = C.Spread()
    for step in range(20):
        t0 = time.perf_counter()
        data.stored_batch(DIRECTIONS[step % 2], args.batch, 0, step)  # the read-ahead thread's work
        read.values.append(time.perf_counter() - t0)
    data.close()
    print(f"  one store batch read alone (both modalities), s: {read}")
    return read


BLOCK = 6  # steps each feed trains in a row, its read-ahead running as in a run of its own (L R C L R C ...)


def s3_vs_local(args, root: Path) -> dict:
    """The store feed from moto's S3 on 127.0.0.1 (no cache, and through the file cache) against the same
    stores on local disk: `_train_step` on one model, the feeds taking turns in blocks of BLOCK steps, each
    block with its own read-ahead (2 steps ahead, as in a run), its first step (a cold read) left out."""
    import torch

    from bench.s3server import S3Server

    with S3Server() as s3:
        os.environ.update(s3.env())
        s3.make_bucket("bench")
        remote = "s3://bench/stores"
        t0 = time.perf_counter()
        size = write_split(root, "train", args.images, 4096)
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for modality, rows, seed in (("image", args.images, 1), ("text", CAPTIONS * args.images, 2)):
            write_store(remote, "train", modality, rows, 4096, seed)
        upload_s = time.perf_counter() - t0
        print(f"  train stores {size:.2f} GB: written locally in {local_s:.1f}s, to the bucket in "
              f"{upload_s:.1f}s")
        cfgs = {}
        for name, store_root, store_cache in (("local", str(root), None), ("s3", remote, None),
                                              ("s3-cached", remote, str(root / "cache"))):
            cfg = pipeline(root, root / "runs" / "s3", args, args.s3_steps, "store")
            cfg.encode.store_root, cfg.encode.store_cache = store_root, store_cache
            cfgs[name] = cfg
        if args.threads:
            torch.set_num_threads(args.threads)
        feeds, opened = {}, {}
        for name, cfg in cfgs.items():  # opening verifies every shard's sha256 (a read of the whole store)
            t0 = time.perf_counter()
            feeds[name] = load_split(cfg, "train", DIRECTIONS, "store")
            opened[name] = time.perf_counter() - t0
            print(f"  {name:9s} opened and verified in {opened[name]:.1f}s ({size / opened[name]:.2f} GB/s)")
        reads = {}
        for name, data in feeds.items():
            reads[name] = _read_alone(data, args.batch)
            print(f"  {name:9s} one batch of both modalities read alone, s: {reads[name]}", flush=True)
        seconds, misses = _alternate(cfgs["local"], feeds, args.s3_steps)
    return _s3_summary(size, opened, reads, seconds, misses)


def _read_alone(data, batch: int) -> C.Spread:
    spread = C.Spread()
    for step in range(10):
        t0 = time.perf_counter()
        data.stored_batch(DIRECTIONS[step % 2], batch, 0, 10_000 + step)  # the read-ahead thread's work
        spread.values.append(time.perf_counter() - t0)
    return spread


def _alternate(cfg: PipelineConfig, feeds: dict, n: int) -> tuple[dict, dict]:
    """Seconds of each `_train_step`, by feed, the feeds taking BLOCK steps in turn until `n` steps are
    done (the first step of each block left out: the read-ahead starts with the block); and each feed's
    read-ahead misses."""
    import torch

    from m3jepa.core.checkpoint import TrainState
    from m3jepa.core.device import Runtime
    from m3jepa.core.objective import Objective
    from m3jepa.distributed import DistInfo
    from m3jepa.train.loop import _train_step
    from m3jepa.train.optim import build_optimizer

    t = cfg.train
    names = list(feeds)
    dims = feeds[names[0]].dims()
    objective = Objective(cfg.model, cfg.loss, dims)
    runtime = Runtime(torch.device("cpu"), cfg.runtime.precision)
    optimizer = build_optimizer(objective, cfg, runtime)
    state, info = TrainState(dims=dims, directions=DIRECTIONS), DistInfo()
    seconds = {name: [] for name in names}
    misses = dict.fromkeys(names, 0)
    plan = lambda s: directions_at(s, t.directions, t.schedule)  # noqa: E731
    for start in range(0, n, BLOCK):
        name = names[(start // BLOCK) % len(names)]
        data = feeds[name]
        block = range(start, min(start + BLOCK, n))
        data.readahead = read_ahead(data, plan, block, t.batch_size, t.seed)
        for step in block:
            t0 = time.perf_counter()
            _train_step(objective, optimizer, cfg, data, state, step, n, info, runtime)
            took = time.perf_counter() - t0
            print(f"    step {step:3d} {name:9s} {took:.3f}s", flush=True)
            if step > block.start:
                seconds[name].append(took)
        misses[name] += data.readahead.misses
        data.readahead.close()
        data.readahead = None
    for data in feeds.values():
        data.close()
    return seconds, misses


def _s3_summary(size: float, opened: dict, reads: dict, seconds: dict, misses: dict) -> dict:
    out = {"train_store_gb": size, "open_verify_s": opened, "readahead_misses": misses,
           "read_alone_s": {k: v.to_json() for k, v in reads.items()},
           "seconds_per_step": {k: C.Spread(v).to_json() for k, v in seconds.items()}}
    base = np.asarray(seconds["local"])
    print(f"  local     s/step {C.Spread(base.tolist())}")
    for name in [k for k in seconds if k != "local"]:
        other = np.asarray(seconds[name])
        per = BLOCK - 1  # timed steps of a block
        k = min(len(base), len(other)) // per * per
        rounds = base[:k].reshape(-1, per).mean(1) / other[:k].reshape(-1, per).mean(1)
        per_round = C.Spread(rounds.tolist())
        whole = float(base.mean() / other.mean())
        out[f"{name}_over_local"] = {"mean": whole, "per_round": per_round.to_json()}
        print(f"  {name:9s} s/step {C.Spread(other.tolist())}; throughput / local {whole:.3f} (mean over "
              f"steps), per round {per_round}")
    print(f"  read-ahead misses {misses}")
    return out


def verify_cost(root: Path, size_gb: float) -> dict[str, C.Spread]:
    """Seconds to verify both train stores as the store feed does when it opens them (every shard's sha256
    over its bytes, FeatureStore.verify_data: the chunk files hashed directly), and the same sha256 over
    the arrays read through zarr (the general path, what it replaced for these stores); warm page cache,
    alternating, 3 times each."""
    from m3jepa.store import open_store
    from m3jepa.store.backends import checksum

    def direct() -> None:
        for modality in ("image", "text"):
            with open_store(store_path(root, DATASET, "train", modality, ENCODERS[modality])) as store:
                store.verify_data()

    def through_zarr() -> None:
        for modality in ("image", "text"):
            with open_store(store_path(root, DATASET, "train", modality, ENCODERS[modality])) as store:
                for info in store.manifest.shards:
                    assert checksum(store._handle(info.index).arrays)[0] == info.sha256

    out = {"verify_data": C.Spread(), "through_zarr": C.Spread()}
    for _ in range(3):
        for name, fn in (("verify_data", direct), ("through_zarr", through_zarr)):
            t0 = time.perf_counter()
            fn()
            out[name].values.append(time.perf_counter() - t0)
    for name, spread in out.items():
        print(f"  verifying the train stores ({size_gb:.2f} GB), {name}, s: {spread} "
              f"({size_gb / spread.median:.2f} GB/s)")
    return out


def big_store(args, root: Path) -> dict:
    images = int(args.big_gb * 1e9 / (CAPTIONS * PAPER_DIMS["text"] * 2 + PAPER_DIMS["image"] * 2)) + 1
    t0 = time.perf_counter()
    size = write_split(root, "train", images, 65536)
    write_split(root, "val", 1000, 4096)
    print(
        f"  wrote {size:.1f} GB ({CAPTIONS * images:,} captions x 4096 + {images:,} images x 1024, float16)"
        f" in {time.perf_counter() - t0:.0f}s; RAM {_ram_gb():.1f} GB"
    )
    cfg = pipeline(root, root / "runs" / "big", args, args.big_steps, "auto")
    chosen = resolve_feed(cfg, "train", DIRECTIONS, "auto")
    print(f"  train.feed=auto chooses {chosen!r} for this store")
    got = run_cli(cfg, root)
    sps = args.batch / got["s_per_step"]
    print(
        f"  m3jepa train-predictor, {args.big_steps} steps from the {size:.1f} GB store: {sps:.1f} samples/s"
        f" ({got['s_per_step']:.2f} s/step after the first), peak RSS {got['peak_rss_mb']:.0f} MiB,"
        f" process wall time {got['wall_s']:.0f}s"
    )
    for line in got["log"]:
        print("    " + line)
    return {"store_gb": size, "captions": CAPTIONS * images, "images": images, "auto_feed": chosen, **got}


def _ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000, help="images in the side-by-side store (x5 captions)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="steps per run (the first is left out)")
    p.add_argument("--paired-steps", type=int, default=0, help="also alternate two feeds in one process")
    p.add_argument("--paired-feeds", type=lambda v: v.split(","), default=["memory", "store"],
                   help="the two feeds --paired-steps alternates: memory | memory+ahead | store")
    p.add_argument("--paired-only", action="store_true", help="only --paired-steps (no CLI rounds)")
    p.add_argument("--small", action="store_true", help="a 19M-parameter fp32 predictor, not the paper's")
    p.add_argument("--big-gb", type=float, default=0.0, help="instead, train from a store of this many GB")
    p.add_argument("--big-steps", type=int, default=20)
    p.add_argument("--s3-steps", type=int, default=0, help="instead, the store feed from S3 vs local disk")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="runtime.precision")
    p.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    args = p.parse_args()
    C.setup(args)
    record = C.header("store_feed: m3jepa train-predictor fed from a Zarr store vs from memory")
    root = Path(tempfile.mkdtemp(prefix="m3jepa-bench-", dir=args.dir))
    print(f"  stores in {root}: {shutil.disk_usage(root).free / 1e9:.0f} GB free")
    try:
        if args.big_gb:
            record["big"] = big_store(args, root)
        elif args.s3_steps:
            record["s3"] = s3_vs_local(args, root)
        elif args.paired_only:
            record["paired_only"] = paired_only(args, root)
        else:
            record["side_by_side"] = side_by_side(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the big store must not outlive the measurement
    print(f"  deleted {root}: {not root.exists()}")
    C.write_json(args.json, record)


if __name__ == "__main__":
    main()
