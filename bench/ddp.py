"""Stage 2's gradient all-reduce under torchrun: m3jepa's GradReducer against torch's DistributedDataParallel
(find_unused_parameters=True, what the loop used before), and bf16 against fp32 on the wire.

    python -m bench.ddp --steps 30                    # speed: launches itself under torchrun, 2 gloo ranks
    python -m bench.ddp --accuracy --store-root S     # accuracy of bf16 on the wire: real runs, 3 seeds

Speed. Every rank holds one copy of the same objective per contender (the same initial weights):
  ddp        torch's DDP with find_unused_parameters=True (each step walks the autograd graph to find the
             heads the step did not use, and all-reduces every bucket, unused parameters as zeros)
  reducer    m3jepa.core.collectives.GradReducer: after backward, one all-reduce of the used-flags, then
             only the parameters some rank used, fp32
  bf16       the same with runtime.grad_compression = "bf16"
  local      no all-reduce at all (the floor: forward, backward and AdamW alone)
The contenders take turns step by step on the same batches (rotating order), so a slow patch of the
shared cores hits them alike; each step is timed whole (batch, forward, backward, reduction, clip, AdamW).
After the steps the bench prints each copy's largest weight difference from the DDP copy (the reducer's
must be float noise) and the bytes each sent into all-reduces per step.

Accuracy. `--accuracy` trains the named pipeline with `torchrun --nproc_per_node=2 -m m3jepa train-predictor`
once per seed with grad_compression none and once with bf16, then `m3jepa evaluate`s both: best validation
mean R@1 and test R@1 per direction, side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from bench import _common as C

DIMS = {"image": 1024, "text": 4096}  # the paper's encoders (DINOv2-L, Llama-3-8B)
DIRECTIONS = ["image->text", "text->image"]


def _torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    rdzv = ["--nproc_per_node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
            f"--rdzv-id={uuid.uuid4().hex}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *rdzv, *args], env=env,
                          capture_output=True, text=True)


# ---------------------------------------------------------------- speed (one rank's side)


def worker(args) -> None:
    import torch.distributed as dist

    from m3jepa.config import ModelConfig
    from m3jepa.core.collectives import GradReducer
    from m3jepa.core.objective import Objective
    from m3jepa.distributed import env_info

    dist.init_process_group("gloo")
    info = env_info()
    torch.set_num_threads(1)
    model = ModelConfig(dim=args.dim, hidden=args.hidden, num_experts=12, top_k=4, cl_dim=args.dim // 2,
                        dropout=0.0)
    cfg = C.pipeline(model, args.batch, bf16=False, directions=DIRECTIONS)
    data = C.memory_split(DIMS, 4096)
    copies, reducers = {}, {}
    for name in ("ddp", "reducer", "bf16", "local"):
        torch.manual_seed(0)
        copies[name] = Objective(cfg.model, cfg.loss, DIMS)
    ddp = torch.nn.parallel.DistributedDataParallel(copies["ddp"], find_unused_parameters=True)
    reducers["reducer"] = GradReducer(copies["reducer"], info, "none")
    reducers["bf16"] = GradReducer(copies["bf16"], info, "bf16")
    optims = {n: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for n, m in copies.items()}
    names = list(copies)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for step in range(args.steps):
        d = DIRECTIONS[step % 2]
        x, y = data.batch(d, args.batch, 0, step, info.rank, info.world_size)
        order = names[step % len(names):] + names[: step % len(names)]  # rotate: no contender always first
        for name in order:
            dist.barrier()  # both ranks start the contender together
            t0 = time.perf_counter()
            optims[name].zero_grad(set_to_none=True)
            module = ddp if name == "ddp" else copies[name]
            module(d, x, y, info).total.backward()
            if name in reducers:
                reducers[name].reduce()
            torch.nn.utils.clip_grad_norm_(copies[name].parameters(), 1.0)
            optims[name].step()
            if step >= 2:  # warm-up
                seconds[name].append(time.perf_counter() - t0)
    ref = dict(copies["ddp"].named_parameters())
    diff = {n: max(float((p - ref[k]).abs().max()) for k, p in copies[n].named_parameters()) for n in names}
    params = sum(p.numel() * p.element_size() for p in copies["ddp"].parameters())
    out = {
        "rank": info.rank,
        "parameters": sum(p.numel() for p in copies["ddp"].parameters()),
        "seconds": seconds,
        "max_weight_diff_from_ddp": diff,
        # DDP all-reduces every bucket every step (find_unused_parameters fills unused ones with zeros)
        "bytes_per_step": {"ddp": params, **{n: r.reduced_bytes / args.steps for n, r in reducers.items()},
                           "local": 0},
    }
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def speed(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = _torchrun("-m", "bench.ddp", "--worker", "--out", tmp, "--steps", str(args.steps),
                        "--batch", str(args.batch), "--dim", str(args.dim), "--hidden", str(args.hidden))
        if res.returncode:
            raise RuntimeError(res.stderr[-4000:])
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1)]
    # a step takes as long as its slower rank
    seconds = {n: np.maximum(*(np.asarray(r["seconds"][n]) for r in ranks)) for n in ranks[0]["seconds"]}
    print(f"  {ranks[0]['parameters']:,} parameters, B = {args.batch} (2 ranks x {args.batch // 2}), "
          f"{args.steps - 2} timed steps, alternate directions")
    record = {"parameters": ranks[0]["parameters"], "batch": args.batch, "steps": args.steps,
              "contenders": {}}
    for n, s in seconds.items():
        ratio = C.Spread((s / seconds["ddp"]).tolist())
        got = {"s_per_step": C.Spread(s.tolist()).to_json(), "time_over_ddp": ratio.to_json(),
               "bytes_per_step": ranks[0]["bytes_per_step"][n],
               "max_weight_diff_from_ddp": max(r["max_weight_diff_from_ddp"][n] for r in ranks)}
        record["contenders"][n] = got
        print(f"  {n:8} s/step {C.Spread(s.tolist())}  time/ddp per step {ratio}  "
              f"all-reduced {got['bytes_per_step'] / 2**20:.1f} MiB/step  "
              f"max |w - w_ddp| {got['max_weight_diff_from_ddp']:.2e}")
    return record


# ---------------------------------------------------------------- accuracy


def accuracy(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="m3jepa-ddp-"))
    env = {"HF_HUB_OFFLINE": "1"}
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for wire in ("none", "bf16"):
            run = root / f"{wire}{seed}"
            sets = ["--set", f"encode.store_root={json.dumps(str(args.store_root))}", "--set",
                    f"train.seed={seed}", "--set", f"runtime.grad_compression={json.dumps(wire)}",
                    "--set", "train.num_threads=1"]
            t0 = time.perf_counter()
            res = _torchrun("-m", "m3jepa", "train-predictor", "--pipeline", args.pipeline, "--run-dir",
                            str(run), *sets, env=env)
            if res.returncode:
                raise RuntimeError(res.stderr[-4000:])
            ev = subprocess.run([sys.executable, "-m", "m3jepa", "evaluate", "--run", str(run), "--json"],
                                env={**os.environ, **env}, capture_output=True, text=True, check=True)
            metrics = json.loads(ev.stdout)
            state = json.loads((run / "checkpoints" / "latest" / "state.json").read_text())
            row[wire] = {"best_val_mean_r1": state["best_metric"], "steps": state["step"],
                         "test": {d: r["R@1"] for d, r in metrics["directions"].items()},
                         "seconds": time.perf_counter() - t0}
            print(f"  seed {seed} {wire:4}: best val mean R@1 {state['best_metric']:.2f} at step "
                  f"{state['best_step']}, test R@1 " + ", ".join(f"{d} {r:.2f}" for d, r in
                                                                 row[wire]["test"].items()))
        rows.append(row)
    gaps = [r["bf16"]["best_val_mean_r1"] - r["none"]["best_val_mean_r1"] for r in rows]
    print(f"  bf16 - fp32 best validation mean R@1 per seed: {', '.join(f'{g:+.2f}' for g in gaps)}")
    return {"pipeline": args.pipeline, "runs": rows, "val_gap_bf16_minus_fp32": gaps}


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--pipeline", default="tuxpaint")
    p.add_argument("--store-root", type=Path, default=Path("stores"))
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--out", default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    record = C.header("ddp: the gradient all-reduce of stage 2 under torchrun (2 gloo ranks)")
    record["result"] = accuracy(args) if args.accuracy else speed(args)
    record["load_1min_end"] = round(C.load_average(), 2)
    print(f"  load at the end: {record['load_1min_end']}")
    C.write_json(args.json, record)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
