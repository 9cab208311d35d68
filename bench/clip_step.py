"""Gradient clipping folded into torch's fused AdamW against clip_grad_norm_ then the same fused AdamW.

    python -m bench.clip_step --rounds 5

The paper preset's parameters (140.6M, float32) with random gradients on the CPU; per round, one update of
each contender: `accel.clipped_step` (the global norm, then the fused kernel divides each gradient by the
clip factor) and `clip_grad_norm_` + `step()` (norm, then a scaling pass over every gradient, then the
update). Both clip (max_norm 1.0 is below the random gradients' norm). Timed in alternating rounds; the
ratio is taken per round. A GPU is "not measured" here: there the argument is the pass count (docs/
training.md, Gradient clipping).
"""

from __future__ import annotations

import torch

from bench import _common as C
from m3jepa import accel
from m3jepa.config import LossConfig
from m3jepa.core.objective import Objective
from m3jepa.model.predictor import PAPER_DIMS, paper_preset


def contender(seed: int) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(seed)
    obj = Objective(paper_preset(), LossConfig(), PAPER_DIMS)
    for p in obj.parameters():
        p.grad = torch.randn_like(p)  # norm ≈ sqrt(140M): every update clips
    return obj, torch.optim.AdamW(obj.parameters(), lr=1e-4, fused=True)


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    C.setup(args)
    record = C.header("clip_step: clipping folded into fused AdamW vs clip_grad_norm_ + fused AdamW")
    folded_obj, folded = contender(0)
    plain_obj, plain = contender(0)

    def run_folded() -> None:
        accel.clipped_step(folded, 1.0)

    def run_plain() -> None:
        torch.nn.utils.clip_grad_norm_(plain_obj.parameters(), 1.0)
        plain.step()

    for fn in (run_folded, run_plain):  # optimizer state, first-touch pages
        fn()
    times = C.interleaved({"clip_grad_norm_ + step": run_plain, "folded": run_folded}, args.rounds, {})
    speed = C.ratio(times["clip_grad_norm_ + step"], times["folded"])
    for name, spread in times.items():
        print(f"  {name:<24} ms per update {C.Spread([1000 * v for v in spread.values])}")
    print(f"  folded speed-up (per round) {speed}")
    record.update({name: [1000 * v for v in s.values] for name, s in times.items()})
    record["speedup"] = speed.to_json()
    record["load_1min_after"] = round(C.load_average(), 2)
    print(f"  load after: {record['load_1min_after']}")
    C.write_json(args.json, record)


if __name__ == "__main__":
    main()
