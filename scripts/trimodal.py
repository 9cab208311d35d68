"""One predictor over image, text and audio against three two-modality predictors (docs/results.md).

    python scripts/trimodal.py --seeds 0,1,2 --workdir /tmp/m3jepa-trimodal --set train.num_threads=1

Both arms use pipelines/tuxpaint_trimodal.toml, the same stores and splits, and the same number of
updates per direction (the trimodal run round-robins six directions over 300 steps; each pairwise run
alternates its two directions over 100 steps).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from _stats import mean_std

from m3jepa.config import load_pipeline
from m3jepa.runner import run_all

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "tuxpaint_trimodal.toml"
PAIRS = {"image-text": ("image", "text"), "audio-text": ("audio", "text"), "image-audio": ("image", "audio")}
KS = ("R@1", "R@5")


def _run(name: str, sets: list[str], workdir: Path) -> dict:
    cfg = load_pipeline(PIPELINE, [*sets, f'name="{name}"'])
    run_all(cfg, workdir=workdir)
    return json.loads((workdir / "runs" / name / "metrics.json").read_text())["directions"]


def trimodal(seed: int, sets: list[str], workdir: Path) -> dict:
    return _run(f"trimodal-seed{seed}", [*sets, f"train.seed={seed}"], workdir)


def pairwise(seed: int, sets: list[str], workdir: Path) -> dict:
    """The six directions' recalls from three separate two-modality predictors."""
    out = {}
    for pair, (a, b) in PAIRS.items():
        directions = json.dumps([f"{a}->{b}", f"{b}->{a}"])
        out |= _run(
            f"{pair}-seed{seed}",
            [
                *sets,
                f"train.seed={seed}",
                f"train.directions={directions}",
                "train.max_steps=100",
                "train.eval_every=10",
                "train.checkpoint_every=10",
            ],
            workdir,
        )
    return out


def table(tri: list[dict], pair: list[dict]) -> str:
    """Markdown: per direction, mean ± std over seeds of test R@k for both arms."""
    head = "| direction | " + " | ".join(f"trimodal {k} | pairwise {k}" for k in KS) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(KS))]
    for d in tri[0]:
        cells = []
        for k in KS:
            for arm in (tri, pair):
                cells.append(mean_std([r[d][k] for r in arm]))
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/m3jepa-trimodal"))
    p.add_argument("--set", dest="sets", action="append", default=[], help="a config override for every run")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    tri = [trimodal(s, args.sets, args.workdir) for s in seeds]
    pair = [pairwise(s, args.sets, args.workdir) for s in seeds]
    print(f"\ntest split of tuxpaint-trimodal; seeds {seeds}\n")
    print(table(tri, pair))


if __name__ == "__main__":
    main()
