"""The routing and training recipes of issue 14 on one pipeline, over seeds, selected on VALIDATION.

    python scripts/recipes.py --pipeline pipelines/tuxpaint.toml --seeds 0,1,2 \\
        --workdir /tmp/m3jepa-recipes [--variants default,lb,z] [--set train.num_threads=1]

Each variant is the pipeline plus the overrides in VARIANTS. The table reports, mean ± std over seeds, what
the run's early stopping chose on: the best validation mean R@1 (and each direction's R@1 at that step),
the R² of the predicted latents and the lowest normalised routing entropy of any gate at that validation
(all from metrics.jsonl); the test R@1 of the `best` checkpoint is printed beside them for reference, never
used to choose.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from _stats import mean_std

from m3jepa.config import load_pipeline
from m3jepa.runner import run_all

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "lb": ["model.load_balance_weight=0.01"],
    "lb0.1": ["model.load_balance_weight=0.1"],
    "z": ["model.router_z_loss_weight=0.001"],
    "std": ['loss.pred_target="standardized"'],
    "mixup": ["train.mixup=1.0"],
    "tau07": ["loss.temperature=0.07"],
    "learn_tau": ["loss.temperature=0.07", "loss.learn_temperature=true"],
    "learn_tau_mixup": ["loss.temperature=0.07", "loss.learn_temperature=true", "train.mixup=1.0"],
    "learn_tau_mixup_std": ["loss.temperature=0.07", "loss.learn_temperature=true", "train.mixup=1.0",
                            'loss.pred_target="standardized"'],
    "learn_tau_drop03": ["loss.temperature=0.07", "loss.learn_temperature=true", "model.dropout=0.3"],
    "learn_tau_wd05": ["loss.temperature=0.07", "loss.learn_temperature=true", "train.weight_decay=0.05"],
    "learn_tau_small": ["loss.temperature=0.07", "loss.learn_temperature=true", "model.dim=128",
                        "model.hidden=256"],
    "learn_tau_lb0.1": ["loss.temperature=0.07", "loss.learn_temperature=true",
                        "model.load_balance_weight=0.1"],
    "linear": ["model.predictor=linear"],
    "linear_mixup": ["model.predictor=linear", "train.mixup=1.0"],
    "all": ["model.load_balance_weight=0.01", 'loss.pred_target="standardized"', "train.mixup=1.0",
            "loss.temperature=0.07"],
}
DIRECTIONS = ("image->text", "text->image")


def run_one(pipeline: Path, workdir: Path, variant: str, seed: int, sets: list[str]) -> dict:
    name = f"{variant}-seed{seed}"
    cfg = load_pipeline(pipeline, [*sets, *VARIANTS[variant], f"train.seed={seed}", f'name="{name}"'])
    run_all(cfg, workdir=workdir)
    run = workdir / "runs" / name
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    val = [r for r in records if "val" in r]
    best = max(val, key=lambda r: r["mean_r1"])  # the first best, as the loop keeps it
    entropy = [h["entropy"] for gates in best.get("val_routing", {}).values() for h in gates.values()]
    test = json.loads((run / "metrics.json").read_text())
    return {
        "val_mean_r1": best["mean_r1"],
        "val_r1": {d: best["val"][d]["R@1"] for d in DIRECTIONS},
        "r2": best.get("r2", {}),
        "min_entropy": min(entropy) if entropy else float("nan"),
        "best_step": best["step"],
        "test_r1": {d: test["directions"][d]["R@1"] for d in DIRECTIONS},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", type=Path, default=Path("pipelines/tuxpaint.toml"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/m3jepa-recipes"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--set", dest="sets", action="append", default=[], help="a config override for every run")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| variant | val mean R@1 | val i→t R@1 | val t→i R@1 | R² i→t | R² t→i | min gate entropy "
          "| best step | test i→t R@1 | test t→i R@1 |")
    print("|---|" + "---:|" * 9)
    for v in args.variants.split(","):
        runs = [run_one(args.pipeline, args.workdir, v, s, args.sets) for s in seeds]
        cells = [
            mean_std(r["val_mean_r1"] for r in runs),
            *(mean_std(r["val_r1"][d] for r in runs) for d in DIRECTIONS),
            *(_r2(runs, d) for d in DIRECTIONS),
            f"{np.mean([r['min_entropy'] for r in runs]):.2f}",
            f"{np.mean([r['best_step'] for r in runs]):.0f}",
            *(mean_std(r["test_r1"][d] for r in runs) for d in DIRECTIONS),
        ]
        print(f"| {v} | " + " | ".join(cells) + " |", flush=True)


def _r2(runs: list[dict], d: str) -> str:
    v = [r["r2"][d] for r in runs if d in r["r2"]]
    return f"{np.mean(v):.2f}" if v else ""


if __name__ == "__main__":
    main()
