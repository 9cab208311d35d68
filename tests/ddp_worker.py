"""The 2-process side of tests/test_ddp.py, in ONE torchrun launch (one gloo group, one interpreter per rank).

    torchrun --nproc_per_node=2 tests/ddp_worker.py SPEC.json

SPEC.json: {"runs": {name: [m3jepa arguments]}}. Each rank first checks the gradient reducer and the rank
generators on the real group, then runs every `m3jepa ...` command of the spec in turn through the real
CLI (`m3jepa.cli.app`), and writes <SPEC dir>/<name>.rank<r>.json: {"ok": bool, "error": ...}.
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from m3jepa import cli
from m3jepa.core.collectives import GradReducer
from m3jepa.distributed import env_info


def reducer_check(info) -> dict:
    """GradReducer against a by-hand mean: a parameter used on both ranks, on one rank only, on none."""
    torch.manual_seed(0)  # the same module on both ranks
    module = nn.ModuleDict({"both": nn.Linear(3, 2), "one": nn.Linear(3, 2), "none": nn.Linear(3, 2)})
    x = torch.full((4, 3), float(info.rank + 1))  # (4, 3): other values on each rank
    loss = module["both"](x).pow(2).sum() + (module["one"](x).sum() if info.rank == 1 else 0.0)
    loss.backward()
    local = {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()}
    everyone = info.gather(local)
    out = {}
    for compression in ("none", "bf16"):
        for n, p in module.named_parameters():
            p.grad = None if local[n] is None else local[n].clone()
        GradReducer(module, info, compression).reduce()
        worst = 0.0
        for n, p in module.named_parameters():
            grads = [g[n] for g in everyone]
            if all(g is None for g in grads):
                assert p.grad is None, f"{n}: no rank used it, yet it got a gradient"
                continue
            want = sum(g if g is not None else torch.zeros_like(p) for g in grads) / len(grads)
            worst = max(worst, float(((p.grad - want).abs() / want.abs().clamp_min(1e-6)).max()))
        out[compression] = worst
    return out


def ddp_check(info) -> float:
    """GradReducer against torch's DistributedDataParallel (find_unused_parameters=True, what the loop used
    before): 6 alternating-direction steps of the same objective on the same batches; the largest weight
    difference between the two copies."""
    from m3jepa.config import LossConfig, ModelConfig
    from m3jepa.core.objective import Objective

    dims = {"image": 12, "text": 10}
    copies = []
    for _ in range(2):
        torch.manual_seed(0)
        copies.append(Objective(ModelConfig(dim=16, hidden=32, num_experts=4, top_k=2, cl_dim=8, dropout=0.0),
                                LossConfig(), dims))
    wrapped = nn.parallel.DistributedDataParallel(copies[0], find_unused_parameters=True)
    reducer = GradReducer(copies[1], info)
    optims = [torch.optim.AdamW(c.parameters(), lr=1e-2) for c in copies]
    gen = torch.Generator().manual_seed(info.rank)
    for step in range(6):
        d = ("image->text", "text->image")[step % 2]
        src, tgt = d.split("->")
        x, y = torch.randn(8, dims[src], generator=gen), torch.randn(8, dims[tgt], generator=gen)
        for module, opt in ((wrapped, optims[0]), (copies[1], optims[1])):
            opt.zero_grad(set_to_none=True)
            module(d, x, y, info).total.backward()
            if module is copies[1]:
                reducer.reduce()
            opt.step()
    a, b = (dict(c.named_parameters()) for c in copies)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def generator_check(info) -> dict:
    """The loop's rank seeding: masks differ across ranks, rank 0 draws what one process draws, and a
    checkpoint's saved generators give each rank its own stream back."""
    from m3jepa.core import rankrng
    from m3jepa.core.checkpoint import Checkpoint, TrainState

    def draw() -> torch.Tensor:
        return nn.functional.dropout(torch.ones(4096), 0.5, training=True)  # (4096,) a dropout mask

    torch.manual_seed(7)
    shared = nn.Linear(8, 8)  # the shared initialisation: the same weights on every rank
    rankrng.seed_ranks(None, 7, info, torch.device("cpu"), 0)
    first = draw()
    torch.manual_seed(7)
    nn.Linear(8, 8)
    one_process = draw()  # what a one-process run draws after the same initialisation
    saved = rankrng.rng_states(shared, info)  # collective: every rank's generators
    after = draw()
    start = Checkpoint(path=Path("."), cfg=None, state=TrainState(step=3), weights={},
                       optimizer={"optimizer": {}, **saved})
    torch.manual_seed(12345)  # a fresh process would start elsewhere
    rankrng.seed_ranks(start, 7, info, torch.device("cpu"), 3)
    resumed = draw()
    masks = info.gather(first)
    return {
        "ranks_differ": not torch.equal(masks[0], masks[1]),
        "rank0_is_one_process": bool(torch.equal(masks[0], one_process)) if info.rank == 0 else None,
        "resume_restores": bool(torch.equal(after, resumed)),
        "saved_ranks": len(saved.get("rank_rng", [])),
    }


def main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    out = spec_path.parent
    dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    info = env_info()
    checks = {"reducer": reducer_check(info), "generators": generator_check(info), "ddp": ddp_check(info)}
    (out / f"checks.rank{info.rank}.json").write_text(json.dumps(checks))
    for name, args in spec["runs"].items():
        try:  # click returns the exit status of an `error: ...` line instead of exiting
            status = cli.app(args, standalone_mode=False)
            result = {"ok": not status, "error": f"exit status {status} (stderr has the line)"}
        except BaseException as e:  # recorded per run; the test names it
            result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                      "trace": traceback.format_exc()[-3000:]}
        (out / f"{name}.rank{info.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
