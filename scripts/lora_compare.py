"""Frozen encoders against LoRA on their last layers, over seeds: test recall and what each costs.

    python scripts/lora_compare.py --seeds 0,1,2 --workdir /tmp/m3jepa-lora --set train.num_threads=1

Runs pipelines/tuxpaint.toml (frozen) and pipelines/tuxpaint_lora.toml (3-layer LoRA) for each seed
through the real stages (encode once, cached; train; evaluate) and prints one markdown table: R@1/5/10
both ways as mean ± std, training seconds and samples/s, and the bytes of the stores each reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from _stats import mean_std

from m3jepa.config import load_pipeline
from m3jepa.core.directions import direction_modalities
from m3jepa.core.paired import modality_store
from m3jepa.encode.runner import run_encode
from m3jepa.eval.evaluate import evaluate_run
from m3jepa.runner import encode_config_for_run, resolve_paths
from m3jepa.train.loop import run_dir_of, train

MODES = {"frozen": Path("pipelines/tuxpaint.toml"), "lora3": Path("pipelines/tuxpaint_lora.toml")}


def run_one(pipeline: Path, seed: int, sets: list[str], workdir: Path) -> dict:
    name = f"{pipeline.stem}-seed{seed}"
    cfg = load_pipeline(pipeline, [*sets, f"train.seed={seed}", f'name="{name}"'])
    cfg = encode_config_for_run(resolve_paths(cfg, workdir))
    t0 = time.perf_counter()
    run_encode(cfg.encode)
    encode_s = time.perf_counter() - t0
    run_dir = run_dir_of(cfg)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: its time is the measurement
    result = train(cfg)
    metrics = evaluate_run(run_dir).to_json()
    return {
        "metrics": metrics,
        "train_s": result.seconds,
        "samples_per_s": result.samples_per_s,
        "steps": result.steps,
        "encode_s": encode_s,
        "store_bytes": store_bytes(cfg),
    }


def store_bytes(cfg) -> int:
    """Bytes on disk of every store the run reads (all its splits and modalities)."""
    total = 0
    for split in cfg.encode.splits:
        for m in direction_modalities(cfg.train.directions):
            path = modality_store(cfg, split, m)  # the store stage 2 reads
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


def table(results: dict[str, list[dict]]) -> str:
    dirs = list(next(iter(results.values()))[0]["metrics"]["directions"])
    head = "| mode | " + " | ".join(f"{d} R@{k}" for d in dirs for k in (1, 5, 10))
    head += " | train s | samples/s | stores MB |"
    lines = [head, "|---|" + "---:|" * (3 * len(dirs) + 3)]
    for mode, runs in results.items():
        recall = [[r["metrics"]["directions"][d][f"R@{k}"] for r in runs] for d in dirs for k in (1, 5, 10)]
        cells = [mean_std(values) for values in recall]
        cells += [mean_std([r["train_s"] for r in runs]), mean_std([r["samples_per_s"] for r in runs])]
        cells.append(f"{runs[0]['store_bytes'] / 1e6:.1f}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/m3jepa-lora"))
    p.add_argument("--set", dest="sets", action="append", default=[], help="a config override for every run")
    p.add_argument("--json", type=Path, default=None, help="also write every run's numbers here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {m: [run_one(pipe, s, args.sets, args.workdir) for s in seeds] for m, pipe in MODES.items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\nTux Paint test split, headline space; seeds {seeds}\n")
    print(table(results))


if __name__ == "__main__":
    main()
