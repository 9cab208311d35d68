"""First contact with a GPU machine: install from carried wheels, then every GPU check in one run.

    python -m bench.kit_wheels                           # here, with a registry: wheels/ for Python 3.12
    python -m bench.gpu_kit --wheels wheels              # on the air-gapped GPU node (under 8 minutes)
    python -m bench.gpu_kit --device cpu --small --out /tmp/kit   # the CPU smoke test (tests/test_gpu_kit.py)

On the node (Python and torch, nothing else, no registry) it installs the kit's wheels and this checkout's
wheel (`pip install --no-index --find-links`; --no-install when they are there already), then, each part
under its own time budget, a failing part recorded and the rest still run:

1. stores   COCO-shaped synthetic stores (bench.synthetic_coco: 5 to 6 captions per image, zarr, float16) at
            narrow widths, written through the real StoreWriter.
2. recall   the GPU recipe (pipelines/coco_dinov2_llama3_gpu.toml at narrow widths) trained on --device
            and on the CPU from the same seed; the device's run evaluated on the device and on the CPU
            (the same checkpoint: recalls must agree) and the CPU's run on the CPU (a second training:
            the recalls of the two trainings are compared, not required to match).
3. audit    operations and host syncs per training step of the paper's structure (bench.step_audit).
4. mfu      bench.gpu's training part at the paper preset (140.6M parameters, COCO-shaped features on
            the device) at B = 128 and 4,096: samples/s, bf16 MFU against the datasheet and the measured
            peak, and the fast step's operations, syncs (torch's sync debug mode) and kernels (profiler).
5. lora     the LoRA mode for a few steps on --device: tiny random DINOv2- and Llama-shaped models built
            from transformers configs (no weights can be downloaded there), prefix stores written by the
            real `m3jepa encode` from a jsonl folder of generated images, then `m3jepa train-predictor`
            with pipelines/tuxpaint_lora.toml's LoRA settings (r = 4 on q and v of the last layer).
6. bench    `python -m bench.gpu --quick` on --device; on a GPU with `--compile default` (the step under
            runtime.compile timed beside the fast one, its kernels counted).

Writes --out/kit.json (every figure, the device's name, the errors) and --out/summary.txt (readable);
exits 1 when a part failed. `--small` shrinks every size so the whole run takes about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# Only the standard library and torch (the node has it) above this line: the rest is installed by part 0.
import torch

ROOT = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()
DIRECTIONS = ("image->text", "text->image")
# Recalls of one checkpoint scored on two devices: equal up to ties broken by float rounding (points)
SAME_CHECKPOINT_TOLERANCE = 0.5
HANG_S = 600  # a subprocess that runs this long has hung


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size of one kit run: the GPU's, or --small's (a CPU smoke test in about a minute)."""

    train: tuple[int, int]  # (images, captions)
    held: tuple[int, int]  # val and test, each
    dims: tuple[int, int]  # (image, text) feature widths
    width: int  # predictor d = h (the paper's structure: 12 experts, top-4, two gates)
    cl_dim: int
    batch: int
    steps: int
    mfu_batches: tuple[int, ...]
    mfu_rounds: int
    lora_pairs: int
    budget_s: dict[str, float]


GPU = Sizes(train=(20_000, 100_000), held=(1_000, 5_000), dims=(128, 256), width=256, cl_dim=128, batch=4096,
            steps=300, mfu_batches=(128, 4096), mfu_rounds=5, lora_pairs=48,
            budget_s={"install": 90, "stores": 30, "recall": 150, "audit": 20, "mfu": 120, "lora": 60,
                      "bench": 120})
SMALL = Sizes(train=(300, 1_500), held=(60, 300), dims=(32, 48), width=32, cl_dim=16, batch=128, steps=20,
              mfu_batches=(64, 128), mfu_rounds=2, lora_pairs=24,
              budget_s={"install": 90, "stores": 30, "recall": 60, "audit": 20, "mfu": 30, "lora": 90,
                        "bench": 120})


def log(msg: str) -> None:
    print(f"[kit {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command, its output kept; RuntimeError with its stderr's tail when it fails. The budgets steer
    the timed rounds; a command is only stopped when it hangs (HANG_S)."""
    log("+ " + " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, cwd=ROOT,
                         env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} … exited {res.returncode}: {res.stderr[-2000:]}")
    return res


# ---------------------------------------------------------------- 0. install from the carried wheels


def install_commands(wheels: Path, pip_args: list[str]) -> list[list[str]]:
    """The kit's requirements, then this checkout's wheel without its (full) dependencies: no registry."""
    projects = sorted(wheels.glob("m3jepa-*.whl"))
    if not (wheels / "requirements.txt").is_file() or not projects:
        raise FileNotFoundError(f"{wheels} holds no requirements.txt and m3jepa wheel; run "
                                "`python -m bench.kit_wheels --dest {wheels}` where a registry is reachable")
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *pip_args]
    return [[*pip, "-r", str(wheels / "requirements.txt")], [*pip, "--no-deps", str(projects[-1])]]


def install_part(args, budget: float) -> dict:
    commands = install_commands(args.wheels, args.pip_arg)
    for cmd in commands:
        sh(cmd)
    return {"commands": [" ".join(c) for c in commands]}


# ---------------------------------------------------------------- 1. stores


def stores_part(args, sz: Sizes, budget: float) -> dict:
    from bench import synthetic_coco

    root = args.out / "stores"
    splits = {"train": sz.train, "val": sz.held, "test": sz.held}
    synthetic_coco.write_stores(root, splits, sz.dims)
    return {"root": str(root), "splits": {k: list(v) for k, v in splits.items()}, "dims": list(sz.dims)}


# ---------------------------------------------------------------- 2. train -> evaluate on two devices


def recipe_config(args, sz: Sizes, device: str, name: str):
    """The GPU recipe's pipeline at narrow widths on the kit's stores, trained on `device`."""
    from bench import synthetic_coco
    from m3jepa.config import load_pipeline
    from m3jepa.pipelines import shipped_file

    every = max(1, sz.steps // 2)
    sets = [*synthetic_coco.overrides(args.out / "stores"), f'name="{name}"',
            f'run_dir="{args.out / "runs" / name}"', f"model.dim={sz.width}", f"model.hidden={sz.width}",
            f"model.cl_dim={sz.cl_dim}", f"train.batch_size={sz.batch}", f"train.max_steps={sz.steps}",
            f"train.eval_every={every}", f"train.checkpoint_every={every}", f"train.log_every={every}",
            "train.patience=0", 'train.tensorboard="off"', f'runtime.device="{device}"']
    return load_pipeline(shipped_file("coco_dinov2_llama3_gpu"), sets)


def recalls(metrics) -> dict:
    out = metrics.to_json()["directions"]
    return {d: {k: out[d][k] for k in ("R@1", "R@5", "R@10")} for d in DIRECTIONS}


def largest_gap(a: dict, b: dict) -> float:
    return max(abs(a[d][k] - b[d][k]) for d in DIRECTIONS for k in a[d])


def recall_part(args, sz: Sizes, budget: float) -> dict:
    from m3jepa.eval.evaluate import evaluate_run
    from m3jepa.train.loop import train

    out: dict = {"device": args.device, "steps": sz.steps, "batch": sz.batch, "trained": {}}
    runs = {}
    for device in dict.fromkeys([args.device, "cpu"]):  # the device, then the CPU (once when they are one)
        cfg = recipe_config(args, sz, device, f"recipe-{device.replace(':', '')}")
        began = time.perf_counter()
        result = train(cfg)
        runs[device] = Path(cfg.run_dir)
        out["trained"][device] = {"seconds": time.perf_counter() - began,
                                  "samples_per_s": result.samples_per_s, "precision": cfg.runtime.precision}
    wanted = {  # (run, device) pairs; with --device cpu the three are one evaluation, scored once
        "device-trained, scored on the device": (args.device, args.device),
        "device-trained, scored on the CPU": (args.device, "cpu"),
        "CPU-trained, scored on the CPU": ("cpu", "cpu"),
    }
    done: dict[tuple[str, str], dict] = {}
    for trained_on, scored_on in wanted.values():
        if (trained_on, scored_on) not in done:
            done[trained_on, scored_on] = recalls(evaluate_run(runs[trained_on], device=scored_on))
    scored = {name: done[key] for name, key in wanted.items()}
    keys = list(scored)
    same = largest_gap(scored[keys[0]], scored[keys[1]])
    out.update(
        recalls=scored,
        same_checkpoint_gap_points=same,
        same_checkpoint_agrees=same <= SAME_CHECKPOINT_TOLERANCE,
        two_trainings_gap_points=largest_gap(scored[keys[0]], scored[keys[2]]),
    )
    if not out["same_checkpoint_agrees"]:
        raise AssertionError(f"one checkpoint scored on {args.device} and on the CPU differs by {same:.2f} "
                             f"recall points (> {SAME_CHECKPOINT_TOLERANCE}): {scored}")
    return out


# ---------------------------------------------------------------- 3. operations and syncs per step


def audit_part(args, sz: Sizes, budget: float) -> dict:
    from bench.step_audit import audit_steps

    counts = audit_steps("bf16", "grouped")["step"]
    return {"what": "paper structure at narrow widths, bf16, grouped experts, CPU dispatch",
            "compute_ops": counts["compute"], "total_ops": counts["total"], "syncs": counts["syncs"],
            "sync_ops": counts["sync_ops"]}


# ---------------------------------------------------------------- 4. MFU at two batch sizes


def mfu_part(args, sz: Sizes, budget: float) -> dict:
    from bench import gpu

    device = torch.device(args.device)
    base = gpu.QUICK if args.small else gpu.FULL
    shapes = dataclasses.replace(base, batches=sz.mfu_batches, rounds=sz.mfu_rounds)
    peak = gpu.peak_part(shapes, device, gpu.Budget(min(20.0, budget / 4)))
    data = gpu.coco_split(shapes, device)
    results = []
    for i, batch in enumerate(shapes.batches):
        left = budget - (time.perf_counter() - began_at[0])
        results.append(gpu.train_batch(shapes, data, batch, peak, device,
                                       gpu.Budget(left / (len(shapes.batches) - i))))
        gpu.free_device_memory(device)
    keep = ("batch", "samples_per_s", "speedup", "mfu_bf16_datasheet", "mfu_bf16_measured_peak", "fast_step",
            "complete", "losses_finite")
    return {"peak": peak, "model": "paper preset" if not args.small else "bench.gpu QUICK (narrow)",
            "results": [{k: r[k] for k in keep} for r in results]}


began_at = [0.0]  # when the running part started (mfu shares its budget between the batch sizes)


# ---------------------------------------------------------------- 5. LoRA on tiny random encoders


def tiny_encoders(dest: Path) -> tuple[Path, Path]:
    """A DINOv2-shaped image model and a Llama-shaped text model (grouped key/value heads, as Llama 3) with
    random weights and a word-level BERT tokenizer written from a vocabulary: nothing is downloaded."""
    from transformers import BertTokenizerFast, Dinov2Config, Dinov2Model, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    image, text = dest / "dinov2-tiny", dest / "llama-tiny"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=224, patch_size=14)).save_pretrained(image)
    words = [f"w{i}" for i in range(200)]
    vocab = dest / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(text)
    LlamaModel(LlamaConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
               ).save_pretrained(text)
    return image, text


def jsonl_folder(dest: Path, pairs: int) -> Path:
    """`pairs` generated 32 px images with two captions each; a fixed train/val/test assignment."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (dest / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(pairs):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(dest / "img" / f"{i}.png")
        split = "train" if i < pairs // 2 else ("val" if i < 3 * pairs // 4 else "test")
        caps = [" ".join(f"w{j}" for j in rng.integers(0, 200, 6)) for _ in range(2)]
        lines.append(json.dumps({"id": f"p{i}", "image": f"img/{i}.png", "caption": caps, "split": split}))
    (dest / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return dest


def lora_part(args, sz: Sizes, budget: float) -> dict:
    work = args.out / "lora"
    image, text = tiny_encoders(work / "models")
    data = jsonl_folder(work / "data", sz.lora_pairs)
    stores = work / "stores"
    py = [sys.executable, "-m", "m3jepa"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    sh([*py, "encode", "--dataset", "jsonl", "--root", str(data), "--split", "train,val,test",
        "--modality", "image,text", "--image-encoder", f"hf:{image}", "--text-encoder", f"hf:{text}",
        "--kind", "prefix", "--tunable-layers", "1", "--store-root", str(stores), "--workers", "0",
        "--device", args.device], env)
    run = args.out / "runs" / "lora"
    sets = {"encode.dataset": '"jsonl"', "encode.root": json.dumps(str(data)),
            "encode.store_root": json.dumps(str(stores)), "encode.image_encoder": json.dumps(f"hf:{image}"),
            "encode.text_encoder": json.dumps(f"hf:{text}"), "encode.tunable_layers": 1, "lora.layers": 1,
            "model.dim": 32, "model.hidden": 32, "model.cl_dim": 16, "train.batch_size": 8,
            "train.max_steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2, "train.patience": 0,
            "train.tensorboard": '"off"', "runtime.device": f'"{args.device}"'}
    cmd = [*py, "train-predictor", "--pipeline", "tuxpaint_lora", "--run", str(run)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    began = time.perf_counter()
    sh(cmd, env)
    report = json.loads((run / "trainable.json").read_text())
    tuned = sorted({n.split(".")[1] for n in report["parameters"] if n.startswith("encoders.")})
    metrics = json.loads(sh([*py, "evaluate", "--run", str(run), "--json", "--device", args.device],
                            env).stdout)
    return {"steps": 4, "tuned_modalities": tuned, "trainable_parts": report["parts"],
            "train_seconds": time.perf_counter() - began,
            "recall": {d: metrics["directions"][d]["R@1"] for d in DIRECTIONS}}


# ---------------------------------------------------------------- 6. bench.gpu --quick


def bench_part(args, sz: Sizes, budget: float) -> dict:
    # on a GPU also the compiled step (runtime.compile = "default") beside the fast one: its kernels and
    # speed-up are what the first GPU session should bring back; a CPU smoke test leaves the compile out
    mode = "off" if args.device == "cpu" else "default"
    res = sh([sys.executable, "-m", "bench.gpu", "--quick", "--device", args.device, "--compile", mode])
    record = json.loads(res.stdout)
    return {"errors": record["errors"], "device": record["device"], "seconds": record["seconds_total"],
            "train": [{k: r.get(k) for k in ("batch", "speedup", "mfu_bf16_datasheet", "compiled_step")}
                      for r in record["train"].get("results", [])]}


# ---------------------------------------------------------------- the run


def run_part(name: str, fn: Callable[[float], dict], sz: Sizes, errors: list[str]) -> dict:
    budget = sz.budget_s[name]
    log(f"{name}: start (budget {budget:.0f}s)")
    began_at[0] = time.perf_counter()
    try:
        out = fn(budget)
    except Exception as e:  # one part's failure must not lose the others' figures
        traceback.print_exc(file=sys.stderr)
        errors.append(name)
        out = {"error": f"{type(e).__name__}: {e}"[:3000]}
    out["seconds"] = time.perf_counter() - began_at[0]
    log(f"{name}: {'FAILED' if name in errors else 'done'} in {out['seconds']:.1f}s")
    return out


def machine(device: str) -> dict:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"device": device, "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "cpus": os.cpu_count()}


def pct(x: float | None) -> str:
    return "not measured" if x is None else f"{100 * x:.1f}%"


def count(x: float | None) -> str:
    """A per-step count, or "not measured" (a CPU has no CUDA sync debug mode and no CUDA kernels)."""
    return "not measured" if x is None else f"{x:g}"


def summary(record: dict) -> str:
    """The readable page: one line per figure, "not measured" where a part did not give it."""
    m, lines = record["machine"], []
    lines.append(f"GPU kit on {m['device_name']} ({m['device']}), torch {m['torch']}, "
                 f"CUDA {m['cuda']}, Python {m['python']}; {record['seconds_total']:.0f}s; failed parts: "
                 f"{', '.join(record['errors']) or 'none'}")
    rec = record.get("recall", {})
    for name, r in rec.get("recalls", {}).items():
        lines.append(f"recall  {name:<38}" + "  ".join(f"{d} R@1 {r[d]['R@1']:5.2f}" for d in DIRECTIONS))
    if "same_checkpoint_gap_points" in rec:
        lines.append(f"recall  same checkpoint on two devices: largest gap "
                     f"{rec['same_checkpoint_gap_points']:.2f} points "
                     f"(tolerance {SAME_CHECKPOINT_TOLERANCE}); two trainings: "
                     f"{rec['two_trainings_gap_points']:.2f} points")
    for device, t in rec.get("trained", {}).items():
        lines.append(f"train   {device}: {t['samples_per_s']:.0f} samples/s ({t['precision']}, "
                     f"B={rec['batch']})")
    a = record.get("audit", {})
    if "compute_ops" in a:
        lines.append(f"audit   {a['compute_ops']:.0f} operations, {a['syncs']:.0f} host syncs per step "
                     f"({a['what']})")
    for r in record.get("mfu", {}).get("results", []):
        fs = r["fast_step"]
        syncs = fs["syncs_per_step"]["cuda_sync_debug_mode"]
        lines.append(f"mfu     B={r['batch']:>5}: {r['samples_per_s']['fast']['median']:.0f} samples/s, "
                     f"bf16 MFU {pct(r['mfu_bf16_datasheet'])} of the datasheet peak, "
                     f"{pct(r['mfu_bf16_measured_peak'])} of the measured; "
                     f"CUDA syncs per step (debug mode) {count(syncs)}, "
                     f"kernels per step {count(fs['kernels_per_step'])}; speed-up over the TF32 reference "
                     f"{r['speedup']['median']:.1f}x")
    lo = record.get("lora", {})
    if "recall" in lo:
        lines.append(f"lora    {lo['steps']} steps, tuned {', '.join(lo['tuned_modalities'])}; "
                     + ", ".join(f"{d} R@1 {r:.2f}" for d, r in lo["recall"].items()))
    b = record.get("bench", {})
    if "errors" in b:
        lines.append(f"bench   bench.gpu --quick: {b['seconds']:.0f}s, errors {b['errors'] or 'none'}")
    for part in ("install", "stores", "recall", "audit", "mfu", "lora", "bench"):
        if "error" in record.get(part, {}):
            lines.append(f"ERROR   {part}: {record[part]['error'].splitlines()[0][:300]}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="the device to check: cuda, cuda:N (cpu: smoke test)")
    p.add_argument("--out", type=Path, default=Path("gpu-kit"), help="kit.json, summary.txt, stores, runs")
    p.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="what bench.kit_wheels downloaded")
    p.add_argument("--no-install", action="store_true", help="the packages are installed already")
    p.add_argument("--pip-arg", action="append", default=[],
                   help="passed to pip install, e.g. --pip-arg=--user or --pip-arg=--break-system-packages")
    p.add_argument("--small", action="store_true", help="tiny sizes: the CPU smoke test, about a minute")
    p.add_argument("--skip", action="append", default=[], help="leave a part out (repeatable)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.exit(2, f"gpu_kit: torch {torch.__version__} sees no CUDA device; run it on a GPU or pass "
               "--device cpu\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    sz = SMALL if args.small else GPU
    errors: list[str] = []
    record: dict = {"kit": "bench.gpu_kit", "machine": machine(args.device), "small": args.small}
    parts: dict[str, Callable[[float], dict]] = {
        "install": lambda b: install_part(args, b),
        "stores": lambda b: stores_part(args, sz, b),
        "recall": lambda b: recall_part(args, sz, b),
        "audit": lambda b: audit_part(args, sz, b),
        "mfu": lambda b: mfu_part(args, sz, b),
        "lora": lambda b: lora_part(args, sz, b),
        "bench": lambda b: bench_part(args, sz, b),
    }
    skip = set(args.skip) | ({"install"} if args.no_install else set())
    with contextlib.redirect_stdout(sys.stderr):
        for name, fn in parts.items():
            record[name] = {"skipped": True} if name in skip else run_part(name, fn, sz, errors)
    record["errors"] = errors
    record["seconds_total"] = time.perf_counter() - T0
    (args.out / "kit.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    text = summary(record)
    (args.out / "summary.txt").write_text(text)
    print(text, end="")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
