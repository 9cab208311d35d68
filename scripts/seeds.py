"""Run one pipeline over several seeds and print each direction's test metrics as mean ± std.

    python scripts/seeds.py pipelines/tuxpaint_audio.toml --seeds 0,1,2 --workdir /tmp/m3jepa-seeds \\
        [--set train.num_threads=1]

Retrieval directions report R@1/5/10 in the headline space; directions into `label` also report
classification accuracy and macro F1 (docs/classification.md), directions into `answer` VQA accuracy
(docs/vqa.md).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from _stats import mean_std

from m3jepa.config import load_pipeline
from m3jepa.runner import run_all


def run_seed(pipeline: Path, seed: int, sets: list[str], workdir: Path) -> dict:
    name = f"{pipeline.stem}-seed{seed}"
    run_all(load_pipeline(pipeline, [*sets, f"train.seed={seed}", f'name="{name}"']), workdir=workdir)
    return json.loads((workdir / "runs" / name / "metrics.json").read_text())


def table(runs: list[dict]) -> str:
    """Markdown: one row per direction."""
    lines = [
        "| direction | R@1 | R@5 | R@10 | accuracy | macro F1 | queries × gallery |",
        "|---|" + "---:|" * 6,
    ]
    for d in runs[0]["directions"]:
        cells = [mean_std([r["directions"][d][k] for r in runs]) for k in ("R@1", "R@5", "R@10")]
        cls = [r.get("classification", {}).get(d) for r in runs]
        vqa = [r.get("vqa", {}).get(d) for r in runs]
        scored = cls if all(cls) else vqa  # classification, or VQA accuracy for directions into answers
        cells.append(mean_std([c["accuracy"] for c in scored]) if all(scored) else "")
        cells.append(mean_std([c["macro_f1"] for c in cls]) if all(cls) else "")
        g = runs[0]["gallery"][d]
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {g['queries']} × {g['gallery']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pipeline", type=Path)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/m3jepa-seeds"))
    p.add_argument("--set", dest="sets", action="append", default=[], help="a config override for every run")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [run_seed(args.pipeline, s, args.sets, args.workdir) for s in seeds]
    print(
        f"\n{args.pipeline} on the {runs[0]['split']} split; headline space {runs[0]['headline_space']}; "
        f"seeds {seeds}\n"
    )
    print(table(runs))


if __name__ == "__main__":
    main()
