"""Growth of the fast training step: samples/s and peak memory against batch, experts, top-k and width.

    python -m bench.growth                  # every point, each in a fresh process (clean peak RSS)
    python -m bench.growth --axis batch     # one axis only

Each point changes one setting of the paper preset (B = 128, N = 12, k = 4, d = h = d_cl = 2048,
inputs 1024 / 4096) and trains with the fast path (bf16 autocast, sparse dispatch of both tasks,
fused AdamW) through the real `_train_step`, alternating image->text and text->image.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from bench import _common as C

AXES = {
    "batch": [32, 128, 512, 1024],
    "num_experts": [4, 12, 24],
    "top_k": [1, 2, 4, 8],
    "dim": [512, 1024, 2048],
}
BASE = {"batch": 128, "num_experts": 12, "top_k": 4, "dim": 2048}


def measure(point: dict, steps: int) -> dict:
    """Train `steps` steps at one point in this process; samples/s, FLOP rate and peak RSS."""
    from m3jepa.config import LossConfig
    from m3jepa.core.checkpoint import TrainState
    from m3jepa.core.device import Runtime
    from m3jepa.core.objective import Objective
    from m3jepa.distributed import DistInfo
    from m3jepa.model.predictor import PAPER_DIMS, count_parameters, paper_preset
    from m3jepa.train.loop import _train_step
    from m3jepa.train.optim import build_optimizer

    model = paper_preset()
    model.num_experts, model.top_k = point["num_experts"], point["top_k"]
    model.dim = model.hidden = model.cl_dim = point["dim"]
    directions = ["image->text", "text->image"]
    cfg = C.pipeline(model, point["batch"], bf16=True, directions=directions)
    data = C.memory_split(PAPER_DIMS, max(2048, 2 * point["batch"]))
    torch.manual_seed(0)
    objective = Objective(model, LossConfig(), PAPER_DIMS)
    runtime = Runtime(torch.device("cpu"), "bf16")  # the CPU fast path (m3jepa.accel)
    optimizer = build_optimizer(objective, cfg, runtime)
    state = TrainState(dims=data.dims(), directions=directions, stores={})
    for step in range(2):  # warm-up: optimizer state, allocator
        _train_step(objective, optimizer, cfg, data, state, step, 10**9, DistInfo(), runtime)
    t0 = time.perf_counter()
    for step in range(2, 2 + steps):
        _train_step(objective, optimizer, cfg, data, state, step, 10**9, DistInfo(), runtime)
    seconds = (time.perf_counter() - t0) / steps
    flops = sum(C.train_flops_per_sample(model, PAPER_DIMS, d) for d in directions) / 2
    sps = point["batch"] / seconds
    return {
        **point,
        "params_M": count_parameters(objective) / 1e6,
        "samples_per_s": sps,
        "gflops": sps * flops / 1e9,
        "peak_rss_mb": C.peak_rss_mb(),
        "load_1min": C.load_average(),
    }


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--axis", choices=sorted(AXES), nargs="*", default=sorted(AXES))
    p.add_argument("--steps", type=int, default=4, help="timed steps per point (after 2 warm-up steps)")
    p.add_argument("--one", type=str, default=None, help="internal: measure one point given as JSON")
    args = p.parse_args()
    C.setup(args)
    if args.one:
        print(json.dumps(measure(json.loads(args.one), args.steps)))
        return
    peak = C.measure_peak()
    record = C.header("growth: fast training step against size", peak)
    points = []
    for axis in args.axis:
        for value in AXES[axis]:
            point = {**BASE, axis: value}
            if point in points:
                continue
            points.append(point)
    record["points"] = []
    print(
        f"  {'batch':>5} {'N':>3} {'k':>2} {'d':>5} {'params M':>9} {'samples/s':>10} {'GFLOP/s':>8} "
        f"{'MFU %':>6} {'peak RSS MB':>11} {'load':>5}"
    )
    for point in points:
        cmd = [sys.executable, "-m", "bench.growth", "--one", json.dumps(point), "--steps", str(args.steps)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=C.REPO, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        record["points"].append(r)
        print(
            f"  {r['batch']:>5} {r['num_experts']:>3} {r['top_k']:>2} {r['dim']:>5} {r['params_M']:>9.1f} "
            f"{r['samples_per_s']:>10.1f} {r['gflops']:>8.1f} {100 * r['gflops'] / peak.bf16:>6.1f} "
            f"{r['peak_rss_mb']:>11.0f} {r['load_1min']:>5.2f}",
            flush=True,
        )
    C.write_json(args.json, record)


if __name__ == "__main__":
    main()
