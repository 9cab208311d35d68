"""Training fed from a Zarr store against training from tensors in memory, and a store larger than RAM.

    python -m bench.store_feed --images 4000             # store-fed vs in-memory, side by side
    python -m bench.store_feed --big-gb 30 --big-steps 6 # a 30 GB store: peak RSS while training

Stores hold the paper's dims in float16 (images 1024, captions 4096, 5 captions per image). Both
contenders train the fast path (bf16, sparse dispatch of both tasks, fused AdamW) with the same step
body; they differ only in where the batch comes from:
  memory  the whole store read into a float16 tensor, rows indexed per step (the loop today)
  store   `m3jepa.train.feeder`: rows pread from the store's chunk files, 2 steps ahead on a thread
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import _common as C
from m3jepa.config import LossConfig
from m3jepa.data.records import Record, membership_fingerprint
from m3jepa.model.predictor import PAPER_DIMS, paper_preset
from m3jepa.store import Manifest, StoreWriter, open_store, rows_from_records
from m3jepa.train.data import batch_indices
from m3jepa.train.feeder import Prefetcher, StorePairs
from m3jepa.train.objective import Objective
from m3jepa.train.optim import build_optimizer

DIRECTIONS = ["image->text", "text->image"]
CAPTIONS = 5


def write_store(path: Path, modality: str, rows: int, dim: int, shard_size: int, seed: int) -> Path:
    """A complete float16 store of random features, written shard by shard (bounded memory)."""
    records = [
        Record(i, f"{modality}{i}", f"g{i // CAPTIONS if modality == 'text' else i}", modality, "")
        for i in range(rows)
    ]
    manifest = Manifest(
        dataset="bench",
        split="train",
        modality=modality,
        membership=membership_fingerprint(records),
        rows=rows,
        encoder=f"random-{dim}",
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
    with StoreWriter(path, manifest) as w:
        for index, start, end in w.planned_shards():
            n = end - start
            w.write_shard(index, np.roll(np.resize(pool, (n, dim)), index, axis=0))
        w.finalize(rows_from_records(records), [])
    return path


def store_pairs(image: Path, text: Path) -> dict[str, StorePairs]:
    """Caption i pairs with image i // 5, in both directions (what pair_rows gives for such stores)."""
    si, st = open_store(image), open_store(text)
    captions = np.arange(len(st), dtype=np.int64)
    return {
        "image->text": StorePairs(si, st, captions // CAPTIONS, captions),
        "text->image": StorePairs(st, si, captions, captions // CAPTIONS),
    }


class Trainer:
    """The loop's step body (bf16 autocast, AGD, clip, fused AdamW) on batches handed to it."""

    def __init__(self, batch: int) -> None:
        torch.manual_seed(0)
        self.cfg = C.pipeline(paper_preset(), batch, bf16=True, directions=DIRECTIONS)
        self.objective = Objective(self.cfg.model, LossConfig(), PAPER_DIMS)
        C.fuse_tasks(self.objective.predictor)
        self.optimizer = build_optimizer(self.objective, self.cfg)

    def step(self, direction: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = self.objective(direction, x, y).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()


def side_by_side(args, root: Path) -> dict:
    image = write_store(root / "image", "image", args.images, PAPER_DIMS["image"], 4096, 1)
    text = write_store(root / "text", "text", CAPTIONS * args.images, PAPER_DIMS["text"], 4096, 2)
    pairs = store_pairs(image, text)
    memory = {
        m: torch.from_numpy(open_store(p).read_all(dtype=None)) for m, p in (("image", image), ("text", text))
    }
    b, seed = args.batch, 0

    def memory_batch(step: int):
        d = DIRECTIONS[step % 2]
        p = pairs[d]
        idx = batch_indices(len(p.rows_s), b, seed, step)
        src, tgt = d.split("->")
        return (
            d,
            memory[src][torch.from_numpy(p.rows_s[idx])].float(),
            memory[tgt][torch.from_numpy(p.rows_t[idx])].float(),
        )

    def store_batch(step: int):
        d = DIRECTIONS[step % 2]
        return (d, *pairs[d].batch(b, seed, step))

    d0, xm, ym = memory_batch(3)
    _, xs, ys = store_batch(3)
    assert torch.equal(xm, xs) and torch.equal(ym, ys), "store and memory batches differ"
    total = 2 + args.rounds * args.steps
    mem_trainer, store_trainer = Trainer(b), Trainer(b)
    feed = iter(Prefetcher(store_batch, range(total), depth=2))
    counters = {"memory": 0}

    def run_memory() -> None:
        mem_trainer.step(*memory_batch(counters["memory"]))
        counters["memory"] += 1

    def run_store() -> None:
        _, batch = next(feed)
        store_trainer.step(*batch)

    for _ in range(2):
        run_memory()
        run_store()
    times = C.interleaved(
        {"memory": run_memory, "store": run_store}, args.rounds, {"memory": args.steps, "store": args.steps}
    )
    r = C.ratio(times["memory"], times["store"])  # time ratio memory/store = throughput store/memory
    print(f"  B={b}: s/step memory {times['memory']}  store {times['store']}")
    print(f"  store-fed throughput / in-memory throughput (per round): {r}")
    read = C.Spread()
    for step in range(10):
        t0 = time.perf_counter()
        store_batch(step)
        read.values.append(time.perf_counter() - t0)
    print(f"  one store batch read alone (both modalities), s: {read}")
    return {
        "seconds_per_step": {k: v.to_json() for k, v in times.items()},
        "store_over_memory": r.to_json(),
        "read_only_s": read.to_json(),
    }


def big_store(args, root: Path) -> dict:
    text_rows = int(args.big_gb * 1e9 / (PAPER_DIMS["text"] * 2))
    images = text_rows // CAPTIONS
    t0 = time.perf_counter()
    write_store(root / "image", "image", images, PAPER_DIMS["image"], 65536, 1)
    write_store(root / "text", "text", CAPTIONS * images, PAPER_DIMS["text"], 65536, 2)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e9
    print(
        f"  wrote {size:.1f} GB ({CAPTIONS * images:,} captions × 4096 + {images:,} images × 1024, float16)"
        f" in {time.perf_counter() - t0:.0f}s"
    )
    pairs = store_pairs(root / "image", root / "text")
    trainer = Trainer(args.batch)
    C.reset_peak_rss()
    t0 = time.perf_counter()
    with Prefetcher(
        lambda s: (DIRECTIONS[s % 2], *pairs[DIRECTIONS[s % 2]].batch(args.batch, 0, s)),
        range(args.big_steps),
    ) as feed:
        for _, batch in feed:
            trainer.step(*batch)
    sps = args.big_steps * args.batch / (time.perf_counter() - t0)
    rss = C.peak_rss_mb()
    print(
        f"  trained {args.big_steps} steps from the {size:.1f} GB store: {sps:.1f} samples/s,"
        f" peak RSS {rss:.0f} MiB"
    )
    return {"store_gb": size, "samples_per_s": sps, "peak_rss_mb": rss}


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000, help="images in the side-by-side store (x5 captions)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="steps per contender per round")
    p.add_argument("--big-gb", type=float, default=0.0, help="also train from a store of this many GB")
    p.add_argument("--big-steps", type=int, default=6)
    p.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    args = p.parse_args()
    C.setup(args)
    record = C.header("store_feed: training from a Zarr store vs from memory")
    root = Path(tempfile.mkdtemp(prefix="m3jepa-bench-", dir=args.dir))
    try:
        if args.big_gb:
            record["big"] = big_store(args, root / "big")
        else:
            record["side_by_side"] = side_by_side(args, root / "small")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    C.write_json(args.json, record)


if __name__ == "__main__":
    main()
