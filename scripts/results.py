"""Train and score M3-JEPA against its ablations and a linear baseline over several seeds (docs/results.md).

    python scripts/results.py --pipeline pipelines/tuxpaint.toml --seeds 0,1,2 --workdir /tmp/m3jepa-results \
        [--set train.num_threads=1]

Every run goes through `m3jepa.runner.run_all` (stores are encoded once and reused), and the table of
test-split mean ± std is printed in markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from _stats import mean_std

from m3jepa.config import load_pipeline
from m3jepa.runner import run_all

VARIANTS: dict[str, list[str]] = {
    "M3-JEPA (MoE + AGD)": [],
    "MLP, no MoE (+ AGD)": ["model.predictor=mlp"],
    "MoE, joint (no AGD)": ["train.schedule=joint"],
    "linear connector (InfoNCE only)": ["model.predictor=linear"],
}
DIRECTIONS = ("image->text", "text->image")
KS = ("R@1", "R@5", "R@10")


def run_one(
    pipeline: Path, workdir: Path, variant: str, extra: list[str], seed: int, sets: list[str]
) -> dict:
    """One training run; returns its test metrics plus wall time and throughput."""
    slug = variant.split(" ")[0].lower().replace(",", "")
    name = f"{slug}-{'-'.join(x.split('=')[1] for x in extra) or 'default'}-seed{seed}"
    cfg = load_pipeline(pipeline, [*sets, *extra, f"train.seed={seed}", f'name="{name}"'])
    run_all(cfg, workdir=workdir)
    run = workdir / "runs" / name
    metrics = json.loads((run / "metrics.json").read_text())
    params = _trainable_parameters(run)
    return {"metrics": metrics, "params": params}


def _trainable_parameters(run: Path) -> int:
    """Trainable parameters of the run's predictor, rebuilt from its checkpoint on the meta device."""
    import torch

    from m3jepa.core.checkpoint import load_checkpoint
    from m3jepa.core.objective import Objective

    ck = load_checkpoint(run / "checkpoints" / "latest")
    with torch.device("meta"):
        objective = Objective(ck.cfg.model, ck.cfg.loss, ck.state.dims)
    return sum(p.numel() for p in objective.parameters() if p.requires_grad)


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: mean ± std over seeds of test R@k in the headline space, both directions."""
    head = (
        "| predictor | " + " | ".join(f"{d} {k}" for d in DIRECTIONS for k in KS) + " | parameters |"
    )
    lines = [head, "|---|" + "---:|" * (len(DIRECTIONS) * len(KS) + 1)]
    for variant, runs in results.items():
        cells = []
        for d in DIRECTIONS:
            for k in KS:
                cells.append(mean_std([r["metrics"]["directions"][d][k] for r in runs]))
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {runs[0]['params']:,} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", type=Path, default=Path("pipelines/tuxpaint.toml"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/m3jepa-results"))
    p.add_argument("--set", dest="sets", action="append", default=[], help="a config override for every run")
    p.add_argument(
        "--variants",
        default=",".join(str(i) for i in range(len(VARIANTS))),
        help="indices into the variant list (default: all)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [list(VARIANTS.items())[int(i)] for i in args.variants.split(",")]
    results: dict[str, list[dict]] = {}
    for variant, extra in chosen:
        results[variant] = [run_one(args.pipeline, args.workdir, variant, extra, s, args.sets) for s in seeds]
        print(f"done: {variant}", flush=True)
    sizes = next(iter(results.values()))[0]["metrics"]["gallery"]
    print(f"\ntest split; gallery {json.dumps(sizes)}; seeds {seeds}\n")
    print(table(results))


if __name__ == "__main__":
    main()
