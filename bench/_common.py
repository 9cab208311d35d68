"""Shared benchmark helpers: machine header, matmul peak, interleaved timing with spread, FLOP counts."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from m3jepa.config import ModelConfig, PipelineConfig
from m3jepa.core.paired import ModalityFeatures, PairedSplit
from m3jepa.model import flops

REPO = Path(__file__).resolve().parents[1]


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return p


def setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def load_average() -> float:
    """The 1-minute load average: other processes share these cores, so every result prints it."""
    return os.getloadavg()[0]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def matmul_gflops(dtype: torch.dtype, m: int = 2048, n: int = 2048, k: int = 2048, reps: int = 10) -> float:
    """Best-of-`reps` GFLOP/s of one (m, k) @ (k, n) product: the machine's attainable peak now."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * n * k / best / 1e9


@dataclass
class Peak:
    """Measured matmul peaks (GFLOP/s), the denominators of model FLOP utilisation."""

    bf16: float
    fp32: float


def measure_peak() -> Peak:
    # 4096^3 in bf16 and 2048^3 in float32 are the largest-throughput shapes measured on this machine.
    return Peak(
        bf16=matmul_gflops(torch.bfloat16, 4096, 4096, 4096, reps=5), fp32=matmul_gflops(torch.float32)
    )


def header(title: str, peak: Peak | None = None) -> dict:
    """Print and return what a result needs to be read later: machine, versions, load, peak."""
    info = {
        "benchmark": title,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "git": git_sha(),
        "load_1min": round(load_average(), 2),
    }
    if peak is not None:
        info["peak_gflops"] = {"bf16": round(peak.bf16), "fp32": round(peak.fp32)}
    print(f"# {title}")
    print("  " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "benchmark"))
    return info


@dataclass
class Spread:
    """Repeated measurements of one quantity: median and range."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def __str__(self) -> str:
        v = self.values
        return f"{self.median:.4g} [{min(v):.4g}..{max(v):.4g}] n={len(v)}"

    def to_json(self) -> dict:
        return {
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            "n": len(self.values),
        }


def interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, per_round: dict[str, int]
) -> dict[str, Spread]:
    """Seconds per call of each fn, timed in alternating rounds (A B A B ...).

    Other processes share the cores, so a slow patch hits every contender of the round alike; the
    ratio of two contenders is then taken per round, and its spread is the honest error bar.
    """
    out = {name: Spread() for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = per_round.get(name, 1)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out[name].values.append((time.perf_counter() - t0) / n)
    return out


def ratio(slow: Spread, fast: Spread) -> Spread:
    """Per-round speed-up slow/fast (both measured in the same round)."""
    return Spread([s / f for s, f in zip(slow.values, fast.values, strict=True)])


def write_json(path: Path | None, record: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so peaks can be measured per phase."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------- model FLOPs


def train_flops_per_sample(cfg: ModelConfig, dims: dict[str, int], direction: str) -> float:
    """Model FLOPs of one training sample of `direction` (forward + backward, sparse top-k experts): the
    count `m3jepa model-info` prints (`m3jepa.model.flops.train_flops`, which says what it counts).
    The contrastive logits grow with the batch and are left out (`m3jepa.model.flops.logits_flops`)."""
    return flops.train_flops(cfg, dims, direction)


# ---------------------------------------------------------------- training inputs


def memory_split(dims: dict[str, int], rows: int, seed: int = 0) -> PairedSplit:
    """An in-memory PairedSplit of random float16 features, rows paired 1:1 (the loop's input type)."""
    gen = torch.Generator().manual_seed(seed)
    groups = np.array([f"g{i}" for i in range(rows)], dtype=object)
    mods = {
        m: ModalityFeatures(
            modality=m,
            store=Path("memory"),
            features=torch.randn(rows, dim, generator=gen).to(torch.float16),
            group_ids=groups,
            valid=np.ones(rows, dtype=bool),
            texts=[None] * rows,
            encoder="random",
            revision="0",
        )
        for m, dim in dims.items()
    }
    idx = np.arange(rows)
    names = list(dims)
    pairs = {f"{a}->{b}": (idx, idx) for a in names for b in names if a != b}
    return PairedSplit(split="bench", modalities=mods, pairs=pairs)


def pipeline(model: ModelConfig, batch_size: int, bf16: bool, directions: list[str]) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.model = model
    cfg.train.batch_size = batch_size
    cfg.runtime.precision = "bf16" if bf16 else "fp32"
    cfg.train.directions = list(directions)
    cfg.train.warmup_frac = 0.0
    return cfg


# ---------------------------------------------------------------- reference and wiring


def make_dense(predictor: torch.nn.Module) -> None:
    """Make a predictor's MoE run every expert on every row (the official release's evaluation)."""
    mixer = predictor.mixer
    cls = type(mixer)
    mixer.forward = types.MethodType(
        lambda self, x, task, dense=False: cls.forward(self, x, task, True), mixer
    )
    mixer.forward_tasks = types.MethodType(
        lambda self, xs, dense=False: cls.forward_tasks(self, xs, True), mixer
    )


def fuse_tasks(predictor: torch.nn.Module) -> None:
    """No-op, kept for callers not yet updated (bench/store_feed.py).

    M3JepaPredictor.forward now routes both tasks through one dispatch (MultiGateMoE.forward_tasks)
    itself; this used to monkeypatch that in.
    """
