"""Stage-1 throughput: the real `m3jepa encode` path against the encoder's forward pass alone.

    python -m bench.encode --limit 300 --rounds 3

Both contenders run on the same Tux Paint rows (the first `--limit` stamps of the train split) with the
same loaded encoder (efficientnet-lite0 for images, minilm-l6 for text), the same batches and threads:
  forward  the rows decoded and collated in memory beforehand (same shard/batch plan as the runner);
           only `encoder.encode` is timed, batch after batch
  encode   `m3jepa.encode.runner.encode_store`, what `m3jepa encode` runs per store: a StoreWriter on a
           fresh directory, decoding in DataLoader workers (at WORKER_NICENESS, as the encoder is on
           the CPU; text on the in-process reader), the forward pass, shard writes and the finalized
           manifest; only the encoder load is left out (as above)
Rounds alternate (forward, encode, forward, encode, ...) and the ratio encode/forward of rows/s is taken
per round. Before timing, the store written by `encode` is checked against the forward pass's own
features, and every round's store against the first one, byte for byte.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import _common as C
from m3jepa.config import EncodeConfig
from m3jepa.distributed import DistInfo
from m3jepa.encode.jobs import StoreJob, plan_jobs
from m3jepa.encode.mapper import load_encoder
from m3jepa.encode.reader import WORKER_NICENESS, Decode, shard_works, task_of
from m3jepa.encode.runner import encode_store
from m3jepa.encoders import resolve_device
from m3jepa.store import open_store
from m3jepa.store.manifest import plan_shards

MODALITIES = ("image", "text")


def config(args: argparse.Namespace, modality: str, root: Path) -> EncodeConfig:
    """The EncodeConfig `m3jepa encode --split train --modality <m> --limit N ...` would build."""
    return EncodeConfig(
        dataset="tuxpaint", splits=["train"], modalities=[modality], store_root=str(root),
        batch_size=args.batch_size, workers=args.workers, device="cpu", shard_size=args.shard_size,
        limit=args.limit, threads=args.threads,
    )


def predecoded(job: StoreJob, preprocessor: Any, batch_size: int) -> list[Any]:
    """Every batch of the store, decoded and collated in this process, in the runner's batch order."""
    decode = Decode(preprocessor)
    shards = plan_shards(job.manifest.rows, job.manifest.shard_size)
    return [decode[task_of(work, rows, job.refused)]
            for work in shard_works(job.stream, shards, batch_size, job.modality) for rows in work.batches]


def forward_only(encoder: Any, batches: list[Any], kind: str) -> np.ndarray:
    """The forward pass alone over pre-decoded batches; returns pooled features in row order (N, D)."""
    rows = [r for b in batches for r in b.rows]
    out = np.zeros((len(rows), encoder.spec.dim), dtype=np.float32)
    with torch.inference_mode():
        for b in batches:
            out[b.rows] = encoder.encode(b.inputs, kind).pooled.float().numpy()  # (b, D)
    return out


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class Contenders:
    """One modality: the job, the loaded encoder, its pre-decoded batches, and a fresh store per call."""

    def __init__(self, args: argparse.Namespace, modality: str, tmp: Path):
        from m3jepa.data import get_dataset

        self.args, self.tmp, self.calls = args, tmp, 0
        self.cfg = config(args, modality, tmp / "plan")
        dataset = get_dataset("tuxpaint", seed=0, limit=args.limit)
        self.job = plan_jobs(self.cfg, dataset)[0]
        device, dtype = resolve_device("cpu")
        tick = time.perf_counter()
        self.encoder = load_encoder(self.job, self.cfg, device, dtype)
        self.load_s = time.perf_counter() - tick
        tick = time.perf_counter()
        self.batches = predecoded(self.job, self.encoder.preprocessor, args.batch_size)
        self.decode_s = time.perf_counter() - tick
        self.results: list[Any] = []
        self.first: dict[str, bytes] | None = None

    @property
    def rows(self) -> int:
        return self.job.manifest.rows

    def forward(self) -> None:
        self.features = forward_only(self.encoder, self.batches, self.cfg.kind)

    def encode(self) -> None:
        path = self.tmp / f"store-{self.calls}"
        self.calls += 1
        job = replace(self.job, path=path)
        self.results.append(encode_store(job, self.encoder, self.cfg, DistInfo()))
        self.check(path)
        shutil.rmtree(path)

    def check(self, path: Path) -> None:
        """The store holds the forward pass's features; every store equals the first, byte for byte."""
        files = store_bytes(path)
        if self.first is None:
            self.first = files
            stored = open_store(path).read_all(np.float32)  # (N, D)
            expected = self.features.astype(self.cfg.dtype).astype(np.float32)
            if not np.array_equal(stored, expected):
                raise AssertionError(f"{path}: the store differs from the forward pass's features")
        elif files != self.first:
            raise AssertionError(f"{path}: this round's store differs from the first round's")


def run_modality(args: argparse.Namespace, modality: str, tmp: Path) -> dict:
    c = Contenders(args, modality, tmp)
    print(f"  {modality}: {c.rows} rows, {len(c.batches)} batches; encoder {c.job.spec.name} loaded in "
          f"{c.load_s:.1f} s; pre-decoding in this process took {c.decode_s:.2f} s "
          f"({1000 * c.decode_s / c.rows:.1f} ms/row)")
    tick = time.perf_counter()
    c.forward()  # warm-up, and the reference features for the check
    c.encode()  # warm-up (file cache, allocator), checked against the forward pass
    c.results.clear()
    # A short store (text) is encoded several times per round, so a round is not one scheduler hiccup.
    reps = max(1, math.ceil(args.min_seconds / (time.perf_counter() - tick)))
    times = C.interleaved({"forward": c.forward, "encode": c.encode}, args.rounds,
                          {"forward": reps, "encode": reps})
    rps = {k: C.Spread([c.rows / s for s in v.values]) for k, v in times.items()}
    ratio = C.ratio(times["forward"], times["encode"])  # = encode rows/s / forward rows/s, per round
    per_round = [_sum_results(c.results[r * reps : (r + 1) * reps]) for r in range(args.rounds)]
    rounds = zip(rps["forward"].values, rps["encode"].values, ratio.values, per_round, strict=True)
    for r, (f, e, q, res) in enumerate(rounds):
        print(f"  {modality} round {r} ({reps} call(s) each): forward {f:.1f} rows/s, encode {e:.1f} rows/s, "
              f"ratio {q:.3f}  (encode {res['seconds']:.2f} s: read wait {res['read_s']:.2f}, "
              f"compute {res['compute_s']:.2f}, write {res['write_s']:.2f} on its thread)")
    print(f"  {modality}: rows/s forward {rps['forward']}   encode {rps['encode']}")
    print(f"  {modality}: encode / forward (per round) {ratio}")
    return {
        "modality": modality,
        "encoder": c.job.spec.name,
        "rows": c.rows,
        "batches": len(c.batches),
        "load_s": c.load_s,
        "predecode_ms_per_row": 1000 * c.decode_s / c.rows,
        "rows_per_s": {k: v.to_json() for k, v in rps.items()},
        "ratio_encode_over_forward": ratio.to_json(),
        "calls_per_round": reps,
        "rounds": [
            {"forward_rows_per_s": f, "encode_rows_per_s": e, "ratio": q, **res}
            for f, e, q, res in zip(rps["forward"].values, rps["encode"].values, ratio.values, per_round,
                                    strict=True)
        ],
    }


def _sum_results(results: list[Any]) -> dict[str, float]:
    keys = ("seconds", "read_s", "compute_s", "write_s")
    return {k: sum(getattr(r, k) for r in results) for k in keys}


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=300, help="stamps (train rows) per modality")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=4.0,
                   help="repeat each contender within a round until it takes about this long")
    p.add_argument("--modality", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    p.add_argument("--workers", type=int, default=EncodeConfig.workers)
    p.add_argument("--batch-size", type=int, default=EncodeConfig.batch_size)
    p.add_argument("--shard-size", type=int, default=EncodeConfig.shard_size)
    args = p.parse_args()
    C.setup(args)
    record = C.header("encode: m3jepa encode (real stage-1 path) vs the encoder forward pass alone")
    keys = ("limit", "rounds", "workers", "batch_size", "shard_size", "min_seconds")
    record["config"] = {k: getattr(args, k) for k in keys} | {"worker_niceness": WORKER_NICENESS}
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        record["results"] = [run_modality(args, m, Path(tmp) / m) for m in args.modality]
    record["load_1min_after"] = round(C.load_average(), 2)
    print(f"  load after: {record['load_1min_after']}")
    C.write_json(args.json, record)


if __name__ == "__main__":
    main()
