"""GPU benchmark at COCO's size in one short run: training MFU and speed-up, COCO-5K recall, stage-1 encoders.

    python -m bench.gpu > gpu.json             # one GPU, under 8 minutes; progress on stderr
    python -m bench.gpu --device cpu --quick   # tiny shapes: the smoke test (tests/test_bench_gpu.py)

Nothing is read from or written to disk: the stores are synthetic, built on the device as ModalityFeatures /
PairedSplit objects of COCO's shape (113,287 images x 1,024 and 566,747 captions x 4,096, float16, group
ids linking each caption to its image; 4.9 GB on the GPU, none of it in host RAM).

1. Training, paper preset (140.6M parameters), B = 1,024 and 4,096, feed "device", both contenders through
   the real `m3jepa.train.loop._train_step` (AGD: image->text on even steps, text->image on odd ones):
     fast       runtime.precision = "bf16": the GPU's code path (the plain model under bf16 autocast, the
                experts as one grouped product where the card has a sync-free kernel, torch's fused AdamW
                with clipping folded in: `build_optimizer(..., cpu_fast_path=False)`), clipping 1.0,
                dropout 0.1. With --device cpu --quick the same path, the grouped product forced: never
                the CPU fast path of m3jepa.accel.
     reference  the official release's style: every expert on every row (`_common.make_dense`), float32
                with TF32 matmuls (runtime.matmul_precision "auto" = "high" on a GPU: what a fair official-
                style run gets), torch.optim.AdamW with no implementation flags (`train_step.default_adamw`)
   Timed in alternating rounds, torch.cuda.synchronize() around a fixed number of steps; medians of rounds.
   Model FLOPs per sample: `m3jepa.model.flops.train_flops` (top-k experts, forward + backward, inputs'
   gradients skipped; what `m3jepa model-info` prints), averaged over both directions; MFU against the
   card's datasheet bf16 peak (`gpu_step.DATASHEETS`, with sources) and against the bf16 matmul rate
   measured in the same run (8192^3, best of several). `*_with_logits` adds the InfoNCE logits.
   Per step of the fast contender (`gpu_step.account`): aten operations and host syncs (the dispatch audit
   of m3jepa.train.audit, on any device), syncs torch reports (`torch.cuda.set_sync_debug_mode`) and
   kernels (`torch.profiler`) on a GPU.
2. COCO-5K exact recall: 25,000 captions x 5,000 images in the contrastive space (d = cl_dim = 2048) on the
   device, `device_retrieval_metrics` text->image and image->text, timed together; on a subset of queries
   the ranks and recalls must equal a float64 reference on the CPU (a stable sort of the full scores).
3. Stage 1, bare forward pass in bf16 under inference_mode, random weights built on the device: a
   DINOv2-Large-shaped Dinov2Model (facebook/dinov2-large's config: image_size 518, so 224^2 inputs
   interpolate the position embeddings as the real checkpoint does) and a Llama-3-8B-shaped LlamaModel
   (no LM head, as AutoModel loads it for stage 1) on 32-token captions.
4. 20 epochs of COCO projected from the fast samples/s at B = 4,096 (`total_steps` of the real loop).
5. One JSON summary on stdout with the issue's targets and whether each was met. Each part has a time
   budget and reports what it finished; a part that fails records its error and the run exits 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import _common as C
from bench import gpu_step
from bench.train_step import default_adamw
from m3jepa.config import LossConfig, ModelConfig, PipelineConfig
from m3jepa.core.checkpoint import TrainState
from m3jepa.core.compiled import compiled
from m3jepa.core.device import Runtime, resolve
from m3jepa.core.objective import Objective
from m3jepa.core.order import batch_indices
from m3jepa.core.paired import ModalityFeatures, PairedSplit, pair_rows
from m3jepa.distributed import DistInfo
from m3jepa.eval.device_ranks import best_correct_ranks, device_retrieval_metrics
from m3jepa.eval.retrieval import group_codes
from m3jepa.model import flops
from m3jepa.model.predictor import paper_preset
from m3jepa.train.loop import _train_step, total_steps
from m3jepa.train.optim import build_optimizer

DIRECTIONS = ["image->text", "text->image"]
KS = (1, 5, 10)
PAPER_PARAMS_M = 140.6
EPOCHS = 20
# Llama-3-8B without its LM head: 7.5B parameters, 15 GB in bf16, plus activations at B = 256 x 32 tokens
LLAMA_NEEDS_BYTES = 20e9
# Issue #12's targets: (JSON key, what, the target, True when higher is better)
TARGETS = (
    ("mfu_bf16_at_target_batch", "bf16 MFU (datasheet peak) of the fast step at B = 4,096", 0.40, True),
    ("syncs_per_step_at_target_batch", "host syncs per fast step at B = 4,096", 0.0, False),
    ("speedup_at_target_batch", "fast / reference samples per second at B = 4,096", 20.0, True),
    ("seconds_20_epochs", "20 epochs of COCO at B = 4,096, seconds", 300.0, False),
    ("coco5k_both_ways_ms", "COCO-5K exact recall both ways, ms", 50.0, False),
)


@dataclass(frozen=True)
class Shapes:
    """Every size of one run: COCO's and the paper's (full), or tiny ones (--quick, a CPU smoke test)."""

    images: int
    captions: int
    dims: dict[str, int]
    model: ModelConfig
    batches: tuple[int, ...]  # the last one is the targets' batch
    warmup_steps: int  # per contender: even, so both directions warm up
    rounds: int
    fast_steps: int  # fast steps per direction per round (the reference takes one per direction)
    coco5k_images: int
    check_queries: int  # queries checked against the CPU float64 reference, per direction
    retrieval_rounds: int
    peak_n: int
    dinov2: dict = field(default_factory=dict)
    llama: dict = field(default_factory=dict)
    image_size: int = 224
    tokens: int = 32
    encoder_batch: int = 256
    encoder_rounds: int = 5
    # seconds per part; the whole run stops starting parts after `total_s`
    budget_s: dict = field(default_factory=dict)
    total_s: float = 450.0


DINOV2_LARGE = dict(  # facebook/dinov2-large's config.json
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
    image_size=518, qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, hidden_act="gelu",
    layer_norm_eps=1e-6,
)
LLAMA3_8B = dict(  # meta-llama/Meta-Llama-3-8B's config.json
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
    bos_token_id=128000, eos_token_id=128001, use_cache=False,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)

FULL = Shapes(
    images=113_287, captions=566_747, dims={"image": 1024, "text": 4096}, model=paper_preset(),
    batches=(1024, 4096), warmup_steps=4, rounds=10, fast_steps=5, coco5k_images=5000, check_queries=1000,
    retrieval_rounds=7, peak_n=8192, dinov2=DINOV2_LARGE, llama=LLAMA3_8B,
    budget_s={"peak": 20, "train": 200, "retrieval": 60, "dinov2": 40, "llama": 110},
)
QUICK = Shapes(
    images=600, captions=3010, dims={"image": 32, "text": 64},
    # the paper's structure (12 experts, top-4, two gates) at narrow widths: the same operations per step
    model=ModelConfig(predictor="moe", dim=64, hidden=64, num_experts=12, top_k=4, dropout=0.1, gates="multi",
                      routing="topk_softmax", cl_dim=32),
    batches=(64, 256), warmup_steps=2, rounds=2, fast_steps=1, coco5k_images=200, check_queries=100,
    retrieval_rounds=2, peak_n=256,
    dinov2=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                image_size=56),
    llama=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, use_cache=False),
    image_size=56, tokens=8, encoder_batch=4, encoder_rounds=2,
    budget_s={"peak": 10, "train": 30, "retrieval": 10, "dinov2": 10, "llama": 10}, total_s=90.0,
)


# ---------------------------------------------------------------- clock, progress and budgets

T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr with the seconds since start (stdout carries only the JSON)."""
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Budget:
    """A part's deadline: rounds stop when the next one would not fit."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def fits(self, seconds: float) -> bool:
        return self.left() > seconds


def synchronizer(device: torch.device) -> Callable[[], None]:
    """torch.cuda.synchronize on a GPU (kernels are asynchronous), a no-op on the CPU."""
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    return lambda: None


def timed_rounds(
    fns: dict[str, Callable[[], None]], per_round: dict[str, int], rounds: int, budget: Budget,
    sync: Callable[[], None],
) -> dict[str, C.Spread]:
    """Seconds per call of each fn in alternating rounds (A B A B ...), synchronised around each batch of
    calls; stops early, keeping the finished rounds, when the next round would overrun `budget`."""
    out = {name: C.Spread() for name in fns}
    last = 0.0
    for _ in range(rounds):
        if out[next(iter(fns))].values and not budget.fits(1.5 * last):
            break
        began = time.perf_counter()
        for name, fn in fns.items():
            n = per_round.get(name, 1)
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            out[name].values.append((time.perf_counter() - t0) / n)
        last = time.perf_counter() - began
    return out


def gpu_mem_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def free_device_memory(device: torch.device) -> None:
    """Drop what the finished part left behind, so the next one starts with the GPU's memory free."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- matmul peak


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, per_rep: int, reps: int) -> float:
    """Best-of-`reps` TFLOP/s of `per_rep` synchronised (n, n) @ (n, n) products: the attainable peak."""
    sync = synchronizer(device)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # (n, n) each
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    best = math.inf
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(per_rep):
            torch.matmul(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - t0) / per_rep)
    return 2.0 * n**3 / best / 1e12


def peak_part(sh: Shapes, device: torch.device, budget: Budget) -> dict:
    bf16 = matmul_tflops(device, torch.bfloat16, sh.peak_n, per_rep=10, reps=5)
    fp32 = matmul_tflops(device, torch.float32, sh.peak_n, per_rep=3, reps=3)
    sheet = gpu_step.datasheet_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    log(f"matmul peak {sh.peak_n}^3: bf16 {bf16:.4g} TFLOP/s, float32 {fp32:.4g} TFLOP/s "
        f"(float32 matmul precision {torch.get_float32_matmul_precision()!r}); datasheet bf16 "
        + (f"{sheet.bf16_tflops} TFLOP/s ({sheet.card})" if sheet else "not in the table"))
    return {"bf16_tflops": bf16, "fp32_tflops": fp32, "n": sh.peak_n,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "datasheet_bf16_tflops": sheet.bf16_tflops if sheet else None,
            "datasheet_card": sheet.card if sheet else None,
            "datasheet_source": sheet.source if sheet else None}


# ---------------------------------------------------------------- synthetic COCO, resident on the device


def coco_groups(images: int, captions: int) -> tuple[np.ndarray, np.ndarray]:
    """(image groups (I,), caption groups (T,)): 5 captions per image, a 6th for the first T - 5·I images.

    COCO's train split has 566,747 captions for 113,287 images: 5 each, and 312 images with a 6th.
    """
    ids = np.arange(images)
    extra = captions - 5 * images
    if not 0 <= extra <= images:
        raise ValueError(f"{captions} captions for {images} images is not 5 or 6 per image")
    return ids, np.concatenate([np.repeat(ids, 5), ids[:extra]])


def _modality(name: str, groups: np.ndarray, dim: int, gen: torch.Generator, device: torch.device):
    rows = len(groups)
    # (rows, dim) float16, drawn on the device: COCO's 4.6 GB of captions never pass through host memory.
    # Drawn in chunks: one random kernel over more than 2**31 elements is a risk not worth taking here.
    feats = torch.empty(rows, dim, device=device, dtype=torch.float16)
    chunk = max(1, 2**28 // dim)
    for lo in range(0, rows, chunk):
        feats[lo : lo + chunk].normal_(generator=gen)
    return ModalityFeatures(
        modality=name, store=Path("synthetic"), features=feats, group_ids=groups.astype(object),
        valid=np.ones(rows, dtype=bool), texts=[None] * rows, encoder="random", revision="0",
    )


def coco_split(sh: Shapes, device: torch.device) -> PairedSplit:
    """COCO's train split in shape: features on `device` (feed "device"), pairs joined by group id."""
    gen = torch.Generator(device=device).manual_seed(0)
    image_groups, caption_groups = coco_groups(sh.images, sh.captions)
    mods = {
        "image": _modality("image", image_groups, sh.dims["image"], gen, device),
        "text": _modality("text", caption_groups, sh.dims["text"], gen, device),
    }
    pairs = {}
    for d in DIRECTIONS:
        src, tgt = (s.strip() for s in d.split("->"))
        pairs[d] = pair_rows(mods[src], mods[tgt])  # the loop's own join: one pair per caption
    return PairedSplit(split="synthetic-coco", modalities=mods, pairs=pairs, feed="device", device=device)


# ---------------------------------------------------------------- training


@dataclass
class Trainer:
    """One objective + optimizer + config stepping through the real loop's `_train_step`."""

    objective: Objective
    optimizer: torch.optim.Optimizer
    cfg: PipelineConfig
    runtime: Runtime
    data: PairedSplit
    state: TrainState
    step_no: int = 0
    last_loss: torch.Tensor | None = None
    stepper: torch.nn.Module | None = None  # what the step calls: the objective, or its compiled wrapper

    def step(self) -> None:
        model = self.objective if self.stepper is None else self.stepper
        parts = _train_step(model, self.optimizer, self.cfg, self.data, self.state, self.step_no, 10**9,
                            DistInfo(), self.runtime)
        self.last_loss = parts["loss"]
        self.step_no += 1


def train_config(sh: Shapes, batch: int, bf16: bool, device: torch.device) -> PipelineConfig:
    cfg = C.pipeline(sh.model, batch, bf16=bf16, directions=DIRECTIONS)
    cfg.runtime.device = str(device)
    cfg.train.feed = "device" if device.type == "cuda" else "memory"
    cfg.train.epochs = EPOCHS
    return cfg


def contenders(sh: Shapes, data: PairedSplit, batch: int, device: torch.device,
               compile_mode: str = "off") -> dict[str, Trainer]:
    """The GPU's code path and the official-release-style reference, from the same initial weights; with
    `compile_mode` also "compiled": the fast contender's step under torch.compile in that mode
    (runtime.compile, m3jepa.core.compiled), its own copy of the same weights.

    fast: the plain model under bf16 autocast and torch's fused AdamW (`cpu_fast_path=False`: on a CPU too,
    never m3jepa.accel); on a CPU the grouped expert product is forced, so --quick runs what a GPU runs.
    reference: dense, float32 at the runtime's matmul precision (TF32 on a GPU), torch's default AdamW.
    """
    torch.manual_seed(0)
    out = {}
    for name, bf16 in (("fast", True), ("reference", False)):
        cfg = train_config(sh, batch, bf16, device)
        runtime = resolve(cfg.runtime)
        with device:  # parameters are created where they train, as the loop does
            objective = Objective(cfg.model, LossConfig(), data.dims())
        if name == "fast":
            if device.type == "cpu":
                objective.predictor.mixer.expert_product = "grouped"
            optimizer = build_optimizer(objective, cfg, runtime, cpu_fast_path=False)
        else:
            objective.load_state_dict(out["fast"].objective.state_dict())
            C.make_dense(objective.predictor)
            optimizer = default_adamw(objective, cfg.train.lr, cfg.train.weight_decay)
        state = TrainState(dims=data.dims(), directions=list(DIRECTIONS), stores={})
        out[name] = Trainer(objective, optimizer, cfg, runtime, data, state)
    if compile_mode != "off":
        out["compiled"] = compiled_contender(out["fast"], data, compile_mode)
    return out


def compiled_contender(fast: Trainer, data: PairedSplit, mode: str) -> Trainer:
    """The fast contender's twin whose step runs through torch.compile in `mode`. Its runtime is the fast
    one's with the mode set directly: the bench runs the plain path on a CPU too (never the CPU fast
    path that `resolve` refuses to compile), so --quick compiles what a GPU compiles."""
    cfg = dataclasses.replace(fast.cfg, runtime=dataclasses.replace(fast.cfg.runtime, compile=mode))
    runtime = dataclasses.replace(fast.runtime, compile=mode)
    with runtime.device:
        objective = Objective(cfg.model, LossConfig(), data.dims())
    objective.load_state_dict(fast.objective.state_dict())
    objective.predictor.mixer.expert_product = fast.objective.predictor.mixer.expert_product
    optimizer = build_optimizer(objective, cfg, runtime, cpu_fast_path=False)
    state = TrainState(dims=data.dims(), directions=list(DIRECTIONS), stores={})
    return Trainer(objective, optimizer, cfg, runtime, data, state, stepper=compiled(objective, runtime))


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """e.g. "AdamW(fused)": which update the step runs (the GPU path: torch's fused AdamW)."""
    impl = next((k for k in ("fused", "foreach") if optimizer.defaults.get(k)), "for-loop")
    return f"{type(optimizer).__name__}({impl})"


def expert_path(trainer: Trainer) -> str:
    """How the trainer's MoE runs its experts on this device and precision ("grouped", "loop", ...)."""
    rt = trainer.runtime
    dtype = torch.bfloat16 if rt.bf16 else torch.float32
    return trainer.objective.predictor.mixer.expert_path(torch.empty(0, 1, device=rt.device, dtype=dtype))


def host_order_ms(n_pairs: int, batch: int, steps: int = 5) -> float:
    """Median ms of the real `batch_indices` on the host over the steps after the epoch's first (the
    epoch permutation is drawn once, then cached: m3jepa.core.order)."""
    batch_indices(n_pairs, batch, 0, 0)
    times = []
    for s in range(1, steps + 1):
        t0 = time.perf_counter()
        batch_indices(n_pairs, batch, 0, s)
        times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times))


def flops_per_sample(model: ModelConfig, dims: dict[str, int]) -> float:
    """`m3jepa model-info`'s count: model FLOPs of one training sample, averaged over both directions."""
    return sum(flops.train_flops(model, dims, d) for d in DIRECTIONS) / len(DIRECTIONS)


def train_batch(sh: Shapes, data: PairedSplit, batch: int, peak: dict, device: torch.device,
                budget: Budget, compile_mode: str = "off") -> dict:
    """Samples/s of fast and reference (and compiled, with `compile_mode`) at one batch size, in alternating
    rounds; MFU against the datasheet and the measured peak; the fast step's operations, syncs and kernels."""
    sync = synchronizer(device)
    c = contenders(sh, data, batch, device, compile_mode)
    fast, ref = c["fast"], c["reference"]

    began = time.perf_counter()
    for trainer in c.values():
        for _ in range(sh.warmup_steps):  # allocations, cuBLAS handles, optimizer state; compiles
            trainer.step()
    sync()
    log(f"B={batch}: warm-up of {', '.join(c)} took {time.perf_counter() - began:.1f}s")
    counts = gpu_step.account(fast.step, device, steps=2)  # one step per direction
    log(f"B={batch}: fast step ({expert_path(fast)} experts): {counts['ops_per_step']['compute']:.0f} "
        f"operations (compute), {counts['syncs_per_step']} host syncs, {counts['kernels_per_step']} kernels")
    compiled_counts = None
    if "compiled" in c:
        compiled_counts = gpu_step.account(c["compiled"].step, device, steps=2, dispatch=False)
        log(f"B={batch}: compiled step ({compile_mode}): {compiled_counts['syncs_per_step']} host syncs, "
            f"{compiled_counts['kernels_per_step']} kernels")
    log(f"B={batch}: warmed up; timing up to {sh.rounds} rounds ({budget.left():.0f}s left)")
    m = sh.fast_steps
    steps = {"reference": 2, "fast": 2 * m, **({"compiled": 2 * m} if "compiled" in c else {})}
    times = timed_rounds({k: t.step for k, t in c.items()}, steps, sh.rounds, budget, sync)
    sps = {k: C.Spread([batch / s for s in v.values]) for k, v in times.items()}
    speedup = C.ratio(times["reference"], times["fast"])
    model_flops = flops_per_sample(sh.model, sh.dims)
    with_logits = model_flops + flops.logits_flops(sh.model, batch)
    fast_sps, sheet = sps["fast"].median, peak.get("datasheet_bf16_tflops")
    mfu = {
        "mfu_bf16_datasheet": gpu_step.mfu(fast_sps, model_flops, sheet),
        "mfu_bf16_measured_peak": gpu_step.mfu(fast_sps, model_flops, peak.get("bf16_tflops")),
        "mfu_bf16_datasheet_with_logits": gpu_step.mfu(fast_sps, with_logits, sheet),
        "mfu_bf16_measured_peak_with_logits": gpu_step.mfu(fast_sps, with_logits, peak.get("bf16_tflops")),
    }
    losses_finite = all(bool(torch.isfinite(t.last_loss)) for t in c.values())
    log(f"B={batch}: samples/s fast {sps['fast']}  reference {sps['reference']}; speed-up {speedup}; "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in mfu.items() if v is not None))
    compiled_record = None
    if compiled_counts is not None:
        over_fast = C.ratio(times["fast"], times["compiled"])
        compiled_record = {"mode": compile_mode, "speedup_over_fast": over_fast.to_json(),
                           "mfu_bf16_datasheet": gpu_step.mfu(sps["compiled"].median, model_flops, sheet),
                           **compiled_counts}
        log(f"B={batch}: compiled ({compile_mode}) samples/s {sps['compiled']}; over fast {over_fast}")
    return {
        "batch": batch,
        "samples_per_s": {k: v.to_json() for k, v in sps.items()},
        "step_ms": {k: 1000 * v.median for k, v in times.items()},
        "speedup": speedup.to_json(),
        **mfu,
        "fast_step": {"expert_path": expert_path(fast), "optimizer": optimizer_name(fast.optimizer),
                      **counts},
        "reference_matmul_precision": ref.runtime.matmul_precision,
        "host_batch_order_ms": host_order_ms(data.num_pairs(DIRECTIONS[0]), batch),
        "rounds": len(speedup.values),
        "complete": len(speedup.values) == sh.rounds,
        "losses_finite": losses_finite,
        "gpu_peak_mem_gb": gpu_mem_gb(device),
        "compiled_step": compiled_record,
    }


def projection(sh: Shapes, data: PairedSplit, batch: int, samples_per_s: float) -> dict:
    """Seconds of 20 epochs at `samples_per_s`, with the real loop's definition of an epoch."""
    cfg = train_config(sh, batch, True, data.device)
    steps = total_steps(cfg, data)
    return {
        "epoch_definition": (
            "m3jepa.train.loop.total_steps: epochs x (the largest direction's pairs // batch) steps of one "
            "direction each (AGD alternates), i.e. an epoch draws as many rows as one direction has pairs"
        ),
        "epochs": EPOCHS, "pairs_per_direction": data.num_pairs(DIRECTIONS[0]), "batch": batch,
        "steps": steps, "samples": steps * batch, "samples_per_s": samples_per_s,
        "seconds_20_epochs": steps * batch / samples_per_s,
        "excludes": "validation, checkpoints and the one-off load of the stores",
    }


def train_part(sh: Shapes, device: torch.device, peak: dict, budget: Budget,
               compile_mode: str = "off") -> dict:
    data = coco_split(sh, device)
    log(f"synthetic COCO on {device}: image {tuple(data.modalities['image'].features.shape)}, text "
        f"{tuple(data.modalities['text'].features.shape)} float16; pairs per direction "
        f"{data.num_pairs(DIRECTIONS[0])}")
    with torch.device("meta"):
        params = sum(p.numel() for p in Objective(sh.model, LossConfig(), sh.dims).parameters())
    log(f"predictor: {params:,} parameters ({params / 1e6:.1f}M; the paper's preset is {PAPER_PARAMS_M}M)")
    out: dict = {
        "params": params, "params_millions": round(params / 1e6, 1),
        "gflop_per_sample": flops_per_sample(sh.model, sh.dims) / 1e9,
        "flops_count": "m3jepa.model.flops.train_flops (top-k experts, forward + backward, no input "
                       "gradients; what `m3jepa model-info` prints), mean of both directions; InfoNCE logits "
                       "apart (m3jepa.model.flops.logits_flops, in the *_with_logits figures)",
        "results": [],
    }
    for i, batch in enumerate(sh.batches):
        share = Budget(budget.left() / (len(sh.batches) - i))
        out["results"].append(train_batch(sh, data, batch, peak, device, share, compile_mode))
        free_device_memory(device)
    last = out["results"][-1]
    out["projection"] = projection(sh, data, last["batch"], last["samples_per_s"]["fast"]["median"])
    log(f"20 epochs at B={last['batch']}: {out['projection']['steps']} steps, "
        f"{out['projection']['seconds_20_epochs']:.0f}s")
    return out


# ---------------------------------------------------------------- COCO-5K exact recall


def coco5k_latents(images: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(captions (5·I, d), images (I, d)) L2-normalised float32 on `device`; caption = image + noise.

    The noise puts a caption's cosine with its image about 2.25 sigma above random pairs (sigma =
    1/sqrt(d)), so R@1 is neither 0 nor 100% and the ranks are worth checking.
    """
    gen = torch.Generator(device=device).manual_seed(1)
    img = F.normalize(torch.randn(images, d, generator=gen, device=device), dim=1)  # (I, d)
    noise = F.normalize(torch.randn(5 * images, d, generator=gen, device=device), dim=1)  # (5I, d)
    cap = F.normalize(img.repeat_interleave(5, dim=0) + (math.sqrt(d) / 2.25) * noise, dim=1)  # (5I, d)
    return cap, img


def cpu_reference_ranks(
    q: np.ndarray, g: np.ndarray, q_groups: np.ndarray, g_groups: np.ndarray
) -> np.ndarray:
    """(n,) 0-based position of each query's first correct item in a stable descending sort of its
    float64 scores (equal scores keep the lower gallery index first), independent of device_ranks."""
    s = q @ g.T  # (n, G) float64
    order = np.argsort(-s, axis=1, kind="stable")  # (n, G)
    return (g_groups[order] == q_groups[:, None]).argmax(axis=1)  # (n,)


def check_exact(queries: torch.Tensor, gallery: torch.Tensor, q_groups: np.ndarray, g_groups: np.ndarray,
                n: int) -> dict:
    """Ranks and recalls of `n` strided queries on the device against the CPU float64 reference."""
    pick = np.linspace(0, len(q_groups) - 1, n).astype(np.int64)
    q_sub = queries[torch.from_numpy(pick).to(queries.device)]  # (n, d)
    qc, gc_ = group_codes(q_groups[pick], g_groups)
    dev = best_correct_ranks(q_sub, gallery, torch.from_numpy(qc).to(queries.device),
                             torch.from_numpy(gc_).to(queries.device)).cpu().numpy()  # (n,)
    ref = cpu_reference_ranks(q_sub.double().cpu().numpy(), gallery.double().cpu().numpy(), q_groups[pick],
                              g_groups)
    dev_recalls = device_retrieval_metrics(q_sub, gallery, q_groups[pick], g_groups, KS).recalls
    ref_recalls = {f"R@{k}": 100.0 * float((ref < k).sum()) / n for k in KS}
    return {"queries": n, "ranks_equal": bool(np.array_equal(dev, ref)),
            "recalls_equal": dev_recalls == ref_recalls, "recalls": ref_recalls}


def retrieval_part(sh: Shapes, device: torch.device, budget: Budget) -> dict:
    d = sh.model.cl_dim
    cap, img = coco5k_latents(sh.coco5k_images, d, device)
    cap_g, img_g = np.repeat(np.arange(sh.coco5k_images), 5), np.arange(sh.coco5k_images)
    sync = synchronizer(device)
    state: dict = {}

    def t2i() -> None:
        state["t2i"] = device_retrieval_metrics(cap, img, cap_g, img_g, KS)

    def i2t() -> None:
        state["i2t"] = device_retrieval_metrics(img, cap, img_g, cap_g, KS)

    t2i(), i2t()  # warm-up: kernels and the blocked float64 workspace
    times = timed_rounds({"t2i": t2i, "i2t": i2t}, {}, sh.retrieval_rounds, budget, sync)
    both = C.Spread([1000 * (a + b) for a, b in zip(times["t2i"].values, times["i2t"].values, strict=True)])
    log(f"COCO-5K ({len(cap)} captions x {len(img)} images, d={d}) both ways, ms: {both}; "
        f"t2i {state['t2i'].recalls} i2t {state['i2t'].recalls}")
    checks = {
        "t2i": check_exact(cap, img, cap_g, img_g, min(sh.check_queries, len(cap))),
        "i2t": check_exact(img, cap, img_g, cap_g, min(sh.check_queries, len(img))),
    }
    exact = all(c["ranks_equal"] and c["recalls_equal"] for c in checks.values())
    log(f"COCO-5K ranks equal the CPU float64 reference's ({sh.check_queries} queries a direction): {exact}")
    return {
        "captions": len(cap), "images": len(img), "dim": d,
        "ms_both": both.to_json(),
        "ms_t2i": 1000 * times["t2i"].median, "ms_i2t": 1000 * times["i2t"].median,
        "recalls_t2i": state["t2i"].recalls, "recalls_i2t": state["i2t"].recalls,
        "exact": exact, "checks": checks, "rounds": len(both.values),
    }


# ---------------------------------------------------------------- stage 1: bare forward passes


def build_encoder(kind: str, config_kwargs: dict, device: torch.device) -> torch.nn.Module:
    """A random-weight Dinov2Model or LlamaModel built directly on `device` in bf16, SDPA attention."""
    from transformers import AutoModel, Dinov2Config, LlamaConfig

    config = (Dinov2Config if kind == "dinov2" else LlamaConfig)(**config_kwargs)
    with device:  # an 8B model initialised on the CPU would take minutes; on the GPU, seconds
        try:
            model = AutoModel.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        except TypeError:  # transformers before 4.56 names the argument torch_dtype
            model = AutoModel.from_config(config, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.requires_grad_(False).eval()


def encoder_inputs(kind: str, sh: Shapes, device: torch.device) -> dict[str, torch.Tensor]:
    b = sh.encoder_batch
    if kind == "dinov2":
        # (B, 3, 224, 224) bf16: the preprocessed crops stage 1 feeds DINOv2
        return {"pixel_values": torch.randn(b, 3, sh.image_size, sh.image_size, device=device,
                                            dtype=torch.bfloat16)}
    ids = torch.randint(0, sh.llama["vocab_size"], (b, sh.tokens), device=device)  # (B, T) token ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # (B, T)


def encoder_part(kind: str, sh: Shapes, device: torch.device, budget: Budget) -> dict:
    """Rows/s of one encoder's bare bf16 forward pass (last_hidden_state), random weights."""
    sync = synchronizer(device)
    began = time.perf_counter()
    model = build_encoder(kind, sh.dinov2 if kind == "dinov2" else sh.llama, device)
    sync()
    built_s = time.perf_counter() - began
    params = sum(p.numel() for p in model.parameters())
    log(f"{kind}: {params / 1e6:.1f}M parameters built on {device} in {built_s:.1f}s")
    inputs = encoder_inputs(kind, sh, device)

    @torch.inference_mode()
    def forward() -> None:
        model(**inputs)  # .last_hidden_state (B, T, D)

    forward()  # warm-up: kernels, SDPA backend selection
    times = timed_rounds({"forward": forward}, {"forward": 2}, sh.encoder_rounds, budget, sync)
    rows = C.Spread([sh.encoder_batch / s for s in times["forward"].values])
    log(f"{kind}: {rows} rows/s at batch {sh.encoder_batch}")
    out = {"params": params, "batch": sh.encoder_batch, "build_s": built_s, "rows_per_s": rows.to_json(),
           "rounds": len(rows.values), "gpu_peak_mem_gb": gpu_mem_gb(device)}
    out.update({"image_size": sh.image_size} if kind == "dinov2" else {"tokens": sh.tokens})
    return out


def llama_part(sh: Shapes, device: torch.device, budget: Budget) -> dict:
    """The 8B forward pass, unless the GPU lacks room for its 16 GB of bf16 weights."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if free < LLAMA_NEEDS_BYTES:
            return {"skipped": f"{free / 1e9:.1f} GB free on {device}; the 8B model needs about "
                               f"{LLAMA_NEEDS_BYTES / 1e9:.0f} GB"}
    return encoder_part("llama", sh, device, budget)


# ---------------------------------------------------------------- summary


def targets(record: dict, sh: Shapes) -> dict:
    """Each target of the issue with the measured figure and whether it was met (None: not measured)."""
    measured = {}
    train, retrieval = record.get("train", {}), record.get("retrieval", {})
    if train.get("results"):
        last = train["results"][-1]
        measured["mfu_bf16_at_target_batch"] = last["mfu_bf16_datasheet"]  # None off the datasheet table
        syncs = [v for v in last["fast_step"]["syncs_per_step"].values() if v is not None]
        measured["syncs_per_step_at_target_batch"] = max(syncs) if syncs else None
        measured["speedup_at_target_batch"] = last["speedup"]["median"]
        measured["seconds_20_epochs"] = train["projection"]["seconds_20_epochs"]
    if "ms_both" in retrieval:
        measured["coco5k_both_ways_ms"] = retrieval["ms_both"]["median"]
    out = {}
    for key, what, target, higher in TARGETS:
        m = measured.get(key)
        met = None if m is None else (m >= target if higher else m <= target)
        out[key] = {"what": what, "target": target, "measured": m, "met": met,
                    "at_issue_shapes": sh is FULL}
    return out


def finite(obj):
    """obj with every NaN or infinite float replaced by None: strict JSON, no number that was not measured."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run_part(name: str, fn: Callable[[Budget], dict], sh: Shapes, errors: list[str]) -> dict:
    """Run one part under its budget; an exception is recorded (and the run will exit 1), not raised."""
    left = sh.total_s - (time.perf_counter() - T0)
    seconds = min(sh.budget_s[name], left)
    if seconds <= 0:
        log(f"{name}: skipped, the run's {sh.total_s:.0f}s are spent")
        return {"skipped": "out of time"}
    log(f"{name}: start (budget {seconds:.0f}s)")
    began = time.perf_counter()
    try:
        out = fn(Budget(seconds))
    except Exception as e:  # one part's failure must not lose the others' figures
        traceback.print_exc(file=sys.stderr)
        errors.append(name)
        out = {"error": f"{type(e).__name__}: {e}"}
    out["seconds"] = time.perf_counter() - began
    log(f"{name}: done in {out['seconds']:.1f}s")
    return out


def machine(device: torch.device, quick: bool) -> dict:
    try:
        transformers_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # stage 1 then records its error; the rest runs
        transformers_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else C.cpu_name()
    return {
        "benchmark": "bench.gpu", "device": name, "device_type": device.type, "quick": quick,
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers_version,
        "git": C.git_sha(), "cpu": C.cpu_name(),
    }


def parse_device(args) -> torch.device:
    """The device to measure; a one-line refusal (SystemExit) where this benchmark cannot run."""
    device = torch.device(args.device)
    if device.type == "cpu" and not args.quick:
        sys.exit("bench.gpu: this is a GPU benchmark; on a CPU only --quick runs (tiny shapes, a smoke test)")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench.gpu: torch {torch.__version__} sees no CUDA device; run it on a GPU "
                 "(or --device cpu --quick for the smoke test)")
    if device.type not in ("cpu", "cuda"):
        sys.exit(f"bench.gpu: --device {args.device!r} is neither cpu nor cuda[:N]")
    if device.type == "cuda" and device.index is None:  # cuda:0, as resolve() names it: one spelling
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --quick only)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke test, even on a CPU")
    p.add_argument("--skip-llama", action="store_true", help="leave out the Llama-3-8B-shaped forward pass")
    p.add_argument("--compile", default="off", choices=("off", "default", "max-autotune", "reduce-overhead"),
                   help="also time the fast step under torch.compile in this mode (runtime.compile)")
    args = p.parse_args()
    device = parse_device(args)
    C.setup(args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sh = QUICK if args.quick else FULL
    errors: list[str] = []
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
        record = machine(device, args.quick)
        log(f"bench.gpu on {record['device']} (torch {record['torch']}, CUDA {record['cuda']}), "
            f"{'quick' if args.quick else 'full'} shapes")
        record["peak"] = run_part("peak", lambda b: peak_part(sh, device, b), sh, errors)
        peak = record["peak"] if "bf16_tflops" in record["peak"] else {}
        record["train"] = run_part("train", lambda b: train_part(sh, device, peak, b, args.compile), sh,
                                   errors)
        free_device_memory(device)
        record["retrieval"] = run_part("retrieval", lambda b: retrieval_part(sh, device, b), sh, errors)
        free_device_memory(device)
        record["stage1"] = {"dinov2": run_part("dinov2", lambda b: encoder_part("dinov2", sh, device, b), sh,
                                               errors)}
        free_device_memory(device)
        record["stage1"]["llama"] = (
            {"skipped": "--skip-llama"} if args.skip_llama
            else run_part("llama", lambda b: llama_part(sh, device, b), sh, errors)
        )
        record["targets"] = targets(record, sh)
        record["errors"] = errors
        record["seconds_total"] = time.perf_counter() - T0
        log(f"done in {record['seconds_total']:.1f}s" + (f"; failed parts: {errors}" if errors else ""))
    record = finite(record)
    text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False)
    print(text, file=stdout, flush=True)
    C.write_json(args.json, record)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
