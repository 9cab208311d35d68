"""Stage-2 training throughput: the fast path against the official-release-style reference, side by side.

    python -m bench.train_step --batch 128 512

Both contenders run the real `m3jepa.train.loop._train_step` (AGD: image->text, then text->image) on
in-memory float16 features of the paper's dims (DINOv2-L 1024, Llama-3-8B 4096) with the paper preset:
  reference  every expert on every row (dense), float32, default AdamW (for-loop on CPU)
  fast       the real training path with runtime.precision = "bf16" on the CPU, i.e. the m3jepa.accel
             fast path: sparse dispatch of both tasks at once (MultiGateMoE.forward_tasks), bf16
             autocast over float32 master weights with the optimizer's bf16 weight shadows
             (accel.install -> Bf16Linear, Bf16Dropout, 16-row expert buckets), float32 routing,
             fused AdamW with the gradient clipping folded in (`build_optimizer` -> accel.ShadowAdamW)
Before timing, both start from the same weights and are compared in eval mode on the same batch:
routing decisions, losses and outputs.
"""

from __future__ import annotations

import argparse

import torch

from bench import _common as C
from m3jepa.config import LossConfig
from m3jepa.core.checkpoint import TrainState
from m3jepa.core.device import Runtime
from m3jepa.core.objective import Objective
from m3jepa.distributed import DistInfo
from m3jepa.model.predictor import PAPER_DIMS, paper_preset
from m3jepa.train.loop import _batch, _train_step
from m3jepa.train.optim import build_optimizer

DIRECTIONS = ["image->text", "text->image"]
FAST = Runtime(torch.device("cpu"), "bf16")  # the CPU fast path (m3jepa.accel)


def default_adamw(objective: Objective, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The reference optimizer: the loop's parameter groups, torch's default AdamW implementation."""
    decay = [p for p in objective.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in objective.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


class Contender:
    """One model + optimizer + config, stepping through the real loop's `_train_step`."""

    def __init__(self, name: str, objective: Objective, optimizer, cfg, data) -> None:
        self.name, self.objective, self.optimizer, self.cfg, self.data = name, objective, optimizer, cfg, data
        self.runtime = Runtime(torch.device("cpu"), cfg.runtime.precision)
        self.state = TrainState(dims=data.dims(), directions=list(cfg.train.directions), stores={})
        self.step_no = 0

    def step(self) -> None:
        _train_step(
            self.objective, self.optimizer, self.cfg, self.data, self.state, self.step_no, 10**9, DistInfo(),
            self.runtime,
        )
        self.step_no += 1


def build(batch: int, rows: int) -> tuple[Contender, Contender]:
    torch.manual_seed(0)
    data = C.memory_split(PAPER_DIMS, rows)
    fast_cfg = C.pipeline(paper_preset(), batch, bf16=True, directions=DIRECTIONS)
    ref_cfg = C.pipeline(paper_preset(), batch, bf16=False, directions=DIRECTIONS)
    fast = Objective(fast_cfg.model, LossConfig(), PAPER_DIMS)
    ref = Objective(ref_cfg.model, LossConfig(), PAPER_DIMS)
    ref.load_state_dict(fast.state_dict())
    C.make_dense(ref.predictor)
    t = ref_cfg.train
    return (
        Contender("reference", ref, default_adamw(ref, t.lr, t.weight_decay), ref_cfg, data),
        Contender("fast", fast, build_optimizer(fast, fast_cfg, FAST), fast_cfg, data),
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@torch.no_grad()
def agreement(ref: Contender, fast: Contender, batch: int) -> dict:
    """Same weights, same batch, eval mode: routing, losses and outputs of fast against reference."""
    out: dict = {}
    ref.objective.eval()
    fast.objective.eval()
    for d in DIRECTIONS:
        x, y = _batch(ref.data, d, batch, 0, 0, DistInfo())
        src, tgt = (s.strip() for s in d.split("->"))
        lr_ = ref.objective(d, x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lf = fast.objective(d, x, y)
        rp, fp = ref.objective.predictor, fast.objective.predictor
        z_ref = rp.embed(src, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z_fast = fp.embed(src, x)
        rec = {}
        for task in ("pred", "cl"):
            u_ref, u_fast = z_ref + rp.task_emb[task], z_fast + fp.task_emb[task]
            e_ref = rp.mixer.route_rows(u_ref, task).experts.sort(dim=-1).values  # (B, k)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                e_fast = fp.mixer.route_rows(u_fast, task).experts.sort(dim=-1).values
                # The MoE alone, fed the reference's own input: routing must then be identical.
                e_same_in = fp.mixer.route_rows(u_ref, task).experts.sort(dim=-1).values
                y_fast = fp.mixer.forward_tasks({task: u_ref})[task].y
            y_ref = rp.mixer(u_ref, task).y
            rec[task] = {
                "rows_same_topk_end_to_end": float((e_ref == e_fast).all(-1).float().mean()),
                "rows_same_topk_same_input": float((e_ref == e_same_in).all(-1).float().mean()),
                "moe_output_rel_err_same_input": _rel(y_fast, y_ref),
            }
        rec["loss_total"] = [float(lr_.total), float(lf.total)]
        rec["loss_pred"] = [float(lr_.pred), float(lf.pred)]
        rec["loss_cl"] = [float(lr_.cl), float(lf.cl)]
        out[d] = rec
    ref.objective.train()
    fast.objective.train()
    return out


def run_batch(args: argparse.Namespace, batch: int, peak: C.Peak) -> dict:
    ref, fast = build(batch, max(4 * batch, 2048))
    agree = agreement(ref, fast, batch)
    for d, rec in agree.items():
        print(
            f"  B={batch} {d}: losses ref/fast total {rec['loss_total'][0]:.5f}/{rec['loss_total'][1]:.5f}"
            f"  pred {rec['loss_pred'][0]:.5f}/{rec['loss_pred'][1]:.5f}"
            f"  cl {rec['loss_cl'][0]:.5f}/{rec['loss_cl'][1]:.5f}"
        )
        for task in ("pred", "cl"):
            r = rec[task]
            print(
                f"    {task}: same top-k rows end to end {100 * r['rows_same_topk_end_to_end']:.2f}%,"
                f" with the same MoE input {100 * r['rows_same_topk_same_input']:.2f}%,"
                f" MoE output rel. err {r['moe_output_rel_err_same_input']:.2e}"
            )
    for c in (ref, fast):
        for _ in range(2):  # warm-up: one step per direction (allocations, optimizer state)
            c.step()
    # Per round: 2 reference steps (one per direction) and 2·m fast steps.
    m = args.fast_steps
    times = C.interleaved(
        {"reference": ref.step, "fast": fast.step}, args.rounds, {"reference": 2, "fast": 2 * m}
    )
    speed = C.ratio(times["reference"], times["fast"])
    sps = {k: C.Spread([batch / s for s in v.values]) for k, v in times.items()}
    flops = sum(C.train_flops_per_sample(paper_preset(), PAPER_DIMS, d) for d in DIRECTIONS) / len(DIRECTIONS)
    mfu_fast = sps["fast"].median * flops / (peak.bf16 * 1e9)
    mfu_ref_sparse_flops = sps["reference"].median * flops / (peak.fp32 * 1e9)
    print(f"  B={batch} samples/s  reference {sps['reference']}   fast {sps['fast']}")
    print(f"  B={batch} speed-up fast/reference (per round) {speed}")
    print(
        f"  B={batch} model FLOPs/sample {flops / 1e9:.3f} GFLOP (top-{paper_preset().top_k});"
        f" fast MFU {100 * mfu_fast:.1f}% of the bf16 peak;"
        f" reference {100 * mfu_ref_sparse_flops:.1f}% of the fp32 peak (counting top-k FLOPs only)"
    )
    return {
        "batch": batch,
        "agreement": agree,
        "samples_per_s": {k: v.to_json() for k, v in sps.items()},
        "speedup": speed.to_json(),
        "gflop_per_sample": flops / 1e9,
        "mfu_fast_vs_bf16_peak": mfu_fast,
    }


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fast-steps", type=int, default=2, help="fast steps per direction per round")
    args = p.parse_args()
    C.setup(args)
    peak = C.measure_peak()
    record = C.header("train_step: fast path vs official-release-style reference", peak)
    record["results"] = [run_batch(args, b, peak) for b in args.batch]
    record["load_1min_after"] = round(C.load_average(), 2)
    print(f"  load after: {record['load_1min_after']}")
    C.write_json(args.json, record)


if __name__ == "__main__":
    main()
