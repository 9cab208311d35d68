"""The COCO recipe's batch, learning rate and temperature, swept on COCO-shaped synthetic data.

    python scripts/gpu_recipe.py --workdir /tmp/m3jepa-gpu-recipe --scale 8 --batch 512 \\
        --lr 1e-4,3e-4,1e-3,3e-3 --temperature 0.03        # the CPU proxy of B = 4,096 (docs/training.md)
    python scripts/gpu_recipe.py --workdir /tmp/r --scale 1 --dims 1024,4096 --paper --batch 4096 \\
        --lr 1e-4,5e-4 --device cuda                        # the real shapes, on a GPU

Each run is the shipped `coco_dinov2_llama3` pipeline with the overrides below, trained by the real loop on
`bench.synthetic_coco` stores (built once under --workdir/stores): train = COCO's train split divided by
--scale (images and captions, 5 to 6 per image), val and test at COCO-5K's size (5,000 images x 25,000
captions) whatever the scale. --scale s with --batch B keeps COCO's structure at batch s·B: the same steps
per epoch and, with the pipeline's 20 epochs, the same steps in all. Validation every epoch (patience 5
epochs), test recall of the `best` checkpoint. Without --paper the predictor keeps the paper's structure
(12 experts, top-4, two gates) at the reduced widths --width (d = h) and --cl-dim.

Results go to --workdir/results.jsonl, one line per run; a run already there is not run again. The table
ranks by best validation mean R@1 (what early stopping picks on); test is printed beside it, never used to
choose.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, beside m3jepa, when run as a file

from m3jepa.config import load_pipeline
from m3jepa.eval.evaluate import evaluate_run
from m3jepa.pipelines import shipped_file
from m3jepa.train.loop import train

DIRECTIONS = ("image->text", "text->image")
COCO_TRAIN = (113_287, 566_747)
COCO_5K = (5_000, 25_000)


def stores(workdir: Path, scale: int, dims: tuple[int, int]) -> Path:
    """The synthetic COCO stores for this scale and widths (written once, reused)."""
    from bench import synthetic_coco

    root = workdir / f"stores-s{scale}-{dims[0]}x{dims[1]}"
    done = root / "done"
    if not done.exists():
        images = COCO_TRAIN[0] // scale
        captions = 5 * images + (COCO_TRAIN[1] - 5 * COCO_TRAIN[0]) // scale
        synthetic_coco.write_stores(root, {"train": (images, captions), "val": COCO_5K, "test": COCO_5K},
                                    dims)
        done.write_text("ok\n")
    return root


def run_name(batch: int, lr: float, temperature: float, learn: bool, seed: int) -> str:
    return f"b{batch}-lr{lr:g}-t{temperature:g}{'-learned' if learn else ''}-s{seed}"


def steps_per_epoch(workdir_root: Path, batch: int) -> int:
    rows = json.loads((workdir_root / "synthetic-coco" / "train" / "text" / "syn-text" / "manifest.json")
                      .read_text())["rows"]
    return max(1, rows // batch)


def one_run(args, root: Path, batch: int, lr: float, temperature: float, learn: bool, seed: int) -> dict:
    from bench import synthetic_coco

    name = run_name(batch, lr, temperature, learn, seed)
    epoch = steps_per_epoch(root, batch)
    sets = [
        *synthetic_coco.overrides(root), f'name="{name}"', f'run_dir="{args.workdir / "runs" / name}"',
        f"train.batch_size={batch}", f"train.lr={lr}", f"loss.temperature={temperature}",
        f"loss.learn_temperature={'true' if learn else 'false'}", f"train.seed={seed}",
        f"train.eval_every={epoch}", f"train.checkpoint_every={epoch}", "train.patience=5",
        f"train.log_every={max(1, epoch // 2)}", 'train.tensorboard="off"', f'runtime.device="{args.device}"',
        f'runtime.precision="{args.precision}"',
    ]
    if not args.paper:
        sets += [f"model.dim={args.width}", f"model.hidden={args.width}", f"model.cl_dim={args.cl_dim}"]
    if args.threads:
        sets.append(f"train.num_threads={args.threads}")
    cfg = load_pipeline(shipped_file("coco_dinov2_llama3"), [*sets, *args.set])
    began = time.perf_counter()
    result = train(cfg)
    metrics = evaluate_run(Path(cfg.run_dir), split="test").to_json()
    test = {d: metrics["directions"][d] for d in DIRECTIONS}
    return {
        "name": name, "batch": batch, "lr": lr, "temperature": temperature, "learned_temperature": learn,
        "seed": seed, "scale": args.scale, "dims": list(args.dims), "paper_widths": args.paper,
        "width": None if args.paper else args.width, "cl_dim": cfg.model.cl_dim, "steps": result.steps,
        "steps_per_epoch": epoch, "best_step": result.best_step, "best_val_mean_r1": result.best_metric,
        "stopped_early": result.stopped_early, "test": test,
        "test_mean_r1": sum(t["R@1"] for t in test.values()) / len(test),
        "seconds": time.perf_counter() - began, "samples_per_s": result.samples_per_s,
        "device": args.device, "precision": args.precision,
    }


def table(rows: list[dict]) -> str:
    head = (f"{'run':<34}{'steps':>7}{'best@':>7}{'val mR@1':>10}{'test i2t R@1':>14}{'t2i R@1':>9}"
            f"{'mean':>7}{'s':>7}")
    lines = [head]
    for r in sorted(rows, key=lambda r: -r["best_val_mean_r1"]):
        t = r["test"]
        lines.append(f"{r['name']:<34}{r['steps']:>7}{r['best_step']:>7}{r['best_val_mean_r1']:>10.2f}"
                     f"{t['image->text']['R@1']:>14.2f}{t['text->image']['R@1']:>9.2f}"
                     f"{r['test_mean_r1']:>7.2f}{r['seconds']:>7.0f}")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--scale", type=int, default=8, help="COCO's train split divided by this (1: full size)")
    p.add_argument("--dims", default="128,256", help="image,text feature widths (COCO's: 1024,4096)")
    p.add_argument("--batch", default="512", help="batch sizes, comma-separated")
    p.add_argument("--lr", default="1e-4", help="learning rates, comma-separated")
    p.add_argument("--temperature", default="0.03", help="InfoNCE temperatures, comma-separated")
    p.add_argument("--learned", action="store_true", help="learn the temperature (starting at each value)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--width", type=int, default=128, help="d = h of the reduced predictor (without --paper)")
    p.add_argument("--cl-dim", type=int, default=64)
    p.add_argument("--paper", action="store_true", help="the pipeline's own widths (d = h = cl = 2048)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", action="append", default=[], help="any other key=value override")
    args = p.parse_args()
    args.dims = tuple(int(x) for x in args.dims.split(","))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = stores(args.workdir, args.scale, args.dims)
    results = args.workdir / "results.jsonl"
    done = {json.loads(x)["name"]: json.loads(x) for x in results.read_text().splitlines()} \
        if results.exists() else {}
    for batch in (int(b) for b in args.batch.split(",")):
        for lr in _floats(args.lr):
            for t in _floats(args.temperature):
                for seed in (int(s) for s in args.seeds.split(",")):
                    name = run_name(batch, lr, t, args.learned, seed)
                    if name in done:
                        continue
                    row = one_run(args, root, batch, lr, t, args.learned, seed)
                    done[name] = row
                    with results.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{name}: val mean R@1 {row['best_val_mean_r1']:.2f}, test mean R@1 "
                          f"{row['test_mean_r1']:.2f}, {row['steps']} steps, {row['seconds']:.0f}s",
                          flush=True)
    print(table(list(done.values())))


if __name__ == "__main__":
    main()
