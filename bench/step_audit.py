"""Operations and host syncs per training step of the paper's structure, counted on any device.

    python -m bench.step_audit                 # fp32 and bf16, grouped experts (a GPU's path) and the loop
    python -m bench.step_audit --json out.json

The paper's structure (12 experts, top-4, two tasks with their own gates, dropout 0.1, both directions
alternating) at narrow widths (the count does not depend on them): forward, backward and the optimizer
step (torch's fused AdamW, clipping 1.0 folded in) under `m3jepa.train.audit.StepAudit`, after two
warm-up steps, the mean of one step per direction. "compute" counts the operations that run a kernel;
"total" adds views, aliases and bare allocations. Syncs are the operations that would make the host wait
for a GPU. Under bf16 the plain model runs under CPU autocast: the GPU's code path, not the CPU fast path.
"""

from __future__ import annotations

import contextlib

import torch

from bench import _common as C
from m3jepa.config import LossConfig, ModelConfig, PipelineConfig
from m3jepa.core.device import Runtime
from m3jepa.core.objective import Objective
from m3jepa.train.audit import StepAudit
from m3jepa.train.optim import build_optimizer, optimizer_step

PAPER_NARROW = dict(dim=64, hidden=64, num_experts=12, top_k=4, dropout=0.1, gates="multi", cl_dim=32)
DIMS = {"image": 32, "text": 48}


def audit_steps(precision: str, product: str, batch: int = 32) -> dict:
    """{phase: counts per step} of `precision` ("fp32"/"bf16") with the experts run as `product`."""
    cfg = PipelineConfig()
    cfg.model = ModelConfig(**PAPER_NARROW)
    cfg.runtime.precision = precision
    torch.manual_seed(0)
    obj = Objective(cfg.model, LossConfig(), DIMS)
    obj.predictor.mixer.expert_product = product
    opt = build_optimizer(obj, cfg, Runtime(torch.device("cpu"), precision), cpu_fast_path=False)
    g = torch.Generator().manual_seed(1)
    batches = [("image->text", torch.randn(batch, 32, generator=g), torch.randn(batch, 48, generator=g)),
               ("text->image", torch.randn(batch, 48, generator=g), torch.randn(batch, 32, generator=g))]

    def step(i: int, audit: StepAudit | None) -> None:
        phase = audit.phase if audit else (lambda name: contextlib.nullcontext())
        direction, x, y = batches[i % 2]
        opt.zero_grad(set_to_none=True)
        with phase("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = obj(direction, x, y).total
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer_step(opt, obj, 1.0)

    step(0, None), step(1, None)
    with StepAudit() as audit:
        step(2, audit), step(3, audit)
    return {name: _per_step(counts, 2) for name, counts in audit.report().items()}


def _per_step(counts: dict, steps: int) -> dict:
    out = {k: v / steps for k, v in counts.items() if isinstance(v, int | float)}
    out["sync_ops"] = sorted(set(counts["sync_ops"]))
    return out


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    C.setup(args)
    record = {"benchmark": "step_audit", "torch": torch.__version__, "git": C.git_sha(), "results": []}
    print(f"{'precision':<10}{'experts':<9}{'phase':<11}{'compute':>8}{'total':>8}{'syncs':>7}")
    for precision in ("fp32", "bf16"):
        for product in ("grouped", "loop"):
            counts = audit_steps(precision, product)
            record["results"].append({"precision": precision, "experts": product, "per_step": counts})
            for phase in ("forward", "backward", "optimizer", "step"):
                c = counts[phase]
                print(f"{precision:<10}{product:<9}{phase:<11}{c['compute']:>8.0f}{c['total']:>8.0f}"
                      f"{c['syncs']:>7.0f}")
            if counts["step"]["sync_ops"]:
                print(f"{'':<19}syncs: {'; '.join(counts['step']['sync_ops'])}")
    C.write_json(args.json, record)


if __name__ == "__main__":
    main()
