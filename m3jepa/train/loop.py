"""The stage-2 recipe as one plain loop: setup, train with AGD, validate, checkpoint, clean up."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m3jepa.config import PipelineConfig, check_machine, save_toml
from m3jepa.core import checkpoint as ckpt
from m3jepa.core import runstores
from m3jepa.core.collectives import GradReducer, broadcast_float, broadcast_object, resolve_compression
from m3jepa.core.compiled import compiled
from m3jepa.core.device import Runtime, resolve
from m3jepa.core.feeder import read_ahead
from m3jepa.core.layout import RunDir
from m3jepa.core.objective import Objective, loss_scalars, write_parameter_report
from m3jepa.core.paired import PairedSplit, carve_validation, load_split, split_is_empty
from m3jepa.core.rankrng import rng_states, seed_ranks
from m3jepa.core.runlock import hold_run
from m3jepa.distributed import DistInfo, process_group
from m3jepa.files import refused_writes
from m3jepa.model.mixup import mix_plan, mixup_pair
from m3jepa.model.moe import log_view, warn_unbalanced
from m3jepa.progress import progress
from m3jepa.train import resume as run_resume
from m3jepa.train import tracking
from m3jepa.train.optim import build_optimizer, optimizer_step
from m3jepa.train.recipes import RoutingTally, auto_size, fit_target_statistics
from m3jepa.train.schedule import directions_at, lr_at

log = logging.getLogger(__name__)

@dataclass
class TrainResult:
    """What a finished (or early-stopped) run reports."""

    run_dir: Path
    steps: int
    best_step: int
    best_metric: float
    stopped_early: bool
    seconds: float
    samples_per_s: float
    num_params: int
    already_finished: bool = False  # resumed at its end: nothing was trained now

    def summary(self) -> str:
        if self.already_finished:
            how = f"stopped early at step {self.steps}" if self.stopped_early else f"{self.steps} steps"
            return (
                f"run {self.run_dir} was already finished ({how}); nothing to train: best validation mean "
                f"R@1 {self.best_metric:.2f} at step {self.best_step}"
            )
        return (
            f"run {self.run_dir}: {self.steps} steps in {self.seconds:.1f}s "
            f"({self.samples_per_s:.0f} samples/s), {self.num_params:,} trainable parameters; "
            f"best validation mean R@1 {self.best_metric:.2f} at step {self.best_step}"
            + (" (stopped early)" if self.stopped_early else "")
        )


def run_dir_of(cfg: PipelineConfig) -> Path:
    """The run directory: configured, else runs/<name>."""
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


def total_steps(cfg: PipelineConfig, data: PairedSplit) -> int:
    """max_steps, else epochs over the largest direction's pairs."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    n = max(data.num_pairs(d) for d in cfg.train.directions)
    return cfg.train.epochs * max(1, n // cfg.train.batch_size)


def train(cfg: PipelineConfig, resume: bool = False, auto_keys: frozenset[str] | None = None) -> TrainResult:
    """Train the predictor from the stores the config names; `resume` continues from `latest`.

    `auto_keys`: keys sized from the train split's pairs (`m3jepa.train.recipes.auto_size`): what
    `train-predictor` without a pipeline passes, less the keys its --set gave.
    """
    runtime = resolve(cfg.runtime)  # the device and its process-group backend, decided once
    # a full disk or a read-only run folder: one line; a checkpoint being written is removed, the previous
    # one kept (core/checkpoint.py), and --resume goes on from it (m3jepa/files.py)
    disk = refused_writes(run_dir_of(cfg), kept="the run's finished checkpoints",
                          fix="then `m3jepa train-predictor ... --resume` goes on from checkpoints/latest")
    # one process: rank 0 of 1, no group; rank 0 locks the run dir, so a second run into it fails at once
    with process_group(runtime.device) as info, disk, hold_run(run_dir_of(cfg), info.is_main):
        log.info("training on %s (%s, float32 matmuls %s, process group %s)", runtime.device,
                 runtime.precision, runtime.matmul_precision, runtime.backend)
        return _train(cfg, resume, info, runtime, auto_keys)


def _train(
    cfg: PipelineConfig,
    resume: bool,
    info: DistInfo,
    runtime: Runtime,
    auto_keys: frozenset[str] | None = None,
) -> TrainResult:
    t = cfg.train
    check_machine(cfg)  # train.num_threads within this machine's ceiling, before torch starts them
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.batch_size % info.world_size:
        raise ValueError(f"train.batch_size={t.batch_size} must divide evenly over {info.world_size} ranks")
    tensorboard = tracking.use_tensorboard(t.tensorboard)  # "on" without the package fails before any work
    run_dir = run_dir_of(cfg)
    layout = RunDir(run_dir)
    if cfg.lora.enabled and t.mixup > 0:
        raise ValueError("train.mixup mixes stored latents, the LoRA mode re-encodes them: set train.mixup=0")
    # "already holds a run", before any data is read; a torchrun restart resumes (train/resume.py)
    resume = run_resume.plan(layout, resume, info)

    device = runtime.device
    train_data = load_split(cfg, t.train_split, t.directions, feed=t.feed, device=device)
    train_data, val_data = _validation_split(cfg, train_data, device)
    if auto_keys:  # train-predictor without a pipeline: sized from the pairs (the log says to what)
        cfg = auto_size(cfg, train_data, auto_keys, device)
        t = cfg.train
        if t.batch_size % info.world_size:
            raise ValueError(f"train.batch_size={t.batch_size} must divide over {info.world_size} ranks")
    start = run_resume.load(cfg, layout, info, runtime.device) if resume else None
    runstores.start_run(cfg, run_dir, train_data, info.is_main, device)  # batch, memory; stores.json
    torch.manual_seed(t.seed)
    with device:  # parameters are created where they train
        objective = Objective(cfg.model, cfg.loss, train_data.dims())
    if cfg.lora.enabled:  # encoder tails with LoRA adapters before the predictor (docs/lora.md)
        from m3jepa.lora.objective import attach_lora

        objective = attach_lora(cfg, objective, train_data, val_data, device)
    optimizer = build_optimizer(objective, cfg, runtime)
    state = ckpt.TrainState(
        dims=train_data.dims(),
        directions=list(t.directions),
        stores={m: {"encoder": f.encoder, "revision": f.revision} for m, f in train_data.modalities.items()},
    )
    if start is not None:
        _restore(start, objective, optimizer)
        state = start.state
    elif cfg.loss.pred_target == "standardized":  # a resumed run has its statistics in the checkpoint
        fit_target_statistics(objective.predictor, train_data, t.directions)
    # DDP's work, done by m3jepa.core.collectives.GradReducer (its docstring says why not DDP itself):
    # rank 0's initial state everywhere, then each backward's gradients averaged over the ranks
    reducer = None
    if info.enabled:
        reducer = GradReducer(objective, info, resolve_compression(cfg.runtime.grad_compression, runtime))
        reducer.broadcast_from_main(objective)
    # after the shared initialisation every rank draws its own dropout masks (rank 0 keeps train.seed's
    # stream, so it is the one-process run's); a resumed run takes each rank's saved generator back
    seed_ranks(start, t.seed, info, device, state.step)
    stepper = compiled(objective, runtime)  # what the step calls: the objective, or its compiled wrapper

    n_steps = total_steps(cfg, train_data)
    n_params = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    if start is not None and (state.stopped_early or state.step >= n_steps):  # a rerun of a finished run
        train_data.close()
        log.info("run %s is already finished at step %d: nothing to train", run_dir, state.step)
        return TrainResult(run_dir=run_dir, steps=state.step, best_step=state.best_step,
                           best_metric=state.best_metric, stopped_early=state.stopped_early, seconds=0.0,
                           samples_per_s=0.0, num_params=n_params, already_finished=True)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_toml(cfg, layout.config)
        run_resume.record_launch(layout, info)
        write_parameter_report(objective, layout.trainable)
        _truncate_metrics(layout.metrics_log, state.step)
        log.info(
            "training %s trainable parameters for %d steps (from step %d)",
            f"{n_params:,}",
            n_steps,
            state.step,
        )

    began, first_step = time.perf_counter(), state.step
    bar = progress(n_steps, initial=state.step, disable=not info.is_main, desc="train", unit="step")
    # metrics.jsonl, metrics.csv, TensorBoard, provenance.json (train/tracking.py)
    tracker = tracking.Tracker(run_dir, state.step, tensorboard) if info.is_main else None
    window: dict[str, list] = {}  # direction -> [loss sum, steps] since the last log line
    tally = RoutingTally(getattr(getattr(objective.predictor, "mixer", None), "top_k", None))
    warned: set[tuple[str, str]] = set()  # (direction, gate) already warned about (moe.warn_unbalanced)
    # A thread prepares the batches of the steps ahead (the directions the schedule will draw); under
    # mixup every rank takes the global batch (it mixes it as one process would, then keeps its slice).
    whole = t.mixup > 0
    train_data.readahead = read_ahead(
        train_data,
        lambda s: directions_at(
            s, t.directions, t.schedule, probs=t.direction_probs, seed=t.seed, recalls=state.last_recalls
        ),
        range(state.step, n_steps),
        t.batch_size,
        t.seed,
        0 if whole else info.rank,
        1 if whole else info.world_size,
    )
    try:
        for step in range(state.step, n_steps):
            if state.stopped_early:
                break
            parts = _train_step(stepper, optimizer, cfg, train_data, state, step, n_steps, info, runtime,
                                reducer=reducer)
            _accumulate(window, parts["by_direction"])
            tally.add(parts["routing"])  # expert counts summed on the device; read once per log line
            state.step = step + 1
            state.samples_seen += t.batch_size * len(parts["directions"])
            last = state.step == n_steps
            if info.is_main and (state.step % t.log_every == 0 or last):
                rate = (state.step - first_step) * t.batch_size / max(1e-9, time.perf_counter() - began)
                record = {"step": state.step, **_scalars(parts), "loss_by_direction": _drain(window),
                          "samples_per_s": rate}
                routing = tally.read()  # each gate's routing over the steps since the last log line
                if routing:
                    record["routing"] = routing
                tracker.log(record)
                bar.set_postfix(
                    loss=f"{float(parts['loss']):.4f}", lr=f"{parts['lr']:.2e}", sps=f"{rate:.0f}"
                )
            if state.step % t.eval_every == 0 or last:
                _validate(objective, cfg, val_data, state, tracker, run_dir, info, runtime, warned)
            if state.step % t.checkpoint_every == 0 or last or state.stopped_early:
                rng = rng_states(objective, info)  # every rank's generators (a collective)
                if info.is_main:
                    ckpt.save_checkpoint(layout.latest, cfg, objective, state, optimizer, _extra(objective),
                                         rng=rng)
            bar.update(1)
    finally:
        train_data.close()
        bar.close()
        if tracker:
            tracker.close()
    info.barrier()
    seconds = time.perf_counter() - began
    done = state.step - first_step
    return TrainResult(
        run_dir=run_dir,
        steps=state.step,
        best_step=state.best_step,
        best_metric=state.best_metric,
        stopped_early=state.stopped_early,
        seconds=seconds,
        samples_per_s=done * t.batch_size / max(seconds, 1e-9),
        num_params=n_params,
    )


def _restore(start: ckpt.Checkpoint, objective: Objective, optimizer: torch.optim.Optimizer) -> None:
    try:
        objective.load_state_dict(start.weights, strict=True)
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"checkpoint {start.path} does not fit this model: {e}") from e
    optimizer.load_state_dict(start.optimizer["optimizer"])


def _train_step(
    model,
    optimizer,
    cfg: PipelineConfig,
    data: PairedSplit,
    state,
    step: int,
    n_steps: int,
    info: DistInfo,
    runtime: Runtime,
    reducer: GradReducer | None = None,
) -> dict:
    """One AGD step: the step's direction(s), their losses summed, one backward, the gradients averaged
    over the ranks (`reducer`, under torchrun), one optimizer update."""
    t = cfg.train
    lr = lr_at(step, n_steps, t.lr, warmup_frac=t.warmup_frac, min_lr_frac=t.min_lr_frac)
    for group in optimizer.param_groups:
        group["lr"] = lr
    directions = directions_at(
        step, t.directions, t.schedule, probs=t.direction_probs, seed=t.seed, recalls=state.last_recalls
    )
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = pred = cl = torch.zeros((), device=runtime.device)
    by_direction = {}  # each direction's own loss (a joint step sums several)
    routing = {}  # direction -> ({gate: (N,) expert assignments of this batch, on the device}, rows)
    rows = t.batch_size // info.world_size  # this rank's slice (y may be the LoRA mode's PrefixBatch)
    for d in directions:
        if t.mixup > 0:  # FuseMix: one partner and one λ per pair, the same in source and target
            # drawn and applied over the global batch, then this rank's slice: the same mixed rows as in
            # one process, whatever the world size
            x, y = _batch(data, d, t.batch_size, t.seed, step, DistInfo())  # (B, D) on runtime.device
            plan = mix_plan(t.batch_size, t.mixup, t.mixup_alpha, t.seed, step, t.directions.index(d))
            x, y = _rank_slice(mixup_pair(x, y, plan), info)
        else:
            x, y = _batch(data, d, t.batch_size, t.seed, step, info)  # on runtime.device
        with runtime.autocast():
            parts = model(d, x, y, info)
        p, c = loss_scalars(parts)
        loss, pred, cl = loss + parts.total, pred + p, cl + c
        by_direction[d] = parts.total.detach()
        if parts.expert_counts:
            routing[d] = ({g: c.detach() for g, c in parts.expert_counts.items()}, rows)
    loss.backward()
    if reducer is not None:
        reducer.reduce()
    optimizer_step(optimizer, model, t.grad_clip)
    return {"loss": loss.detach(), "loss_pred": pred, "loss_cl": cl, "lr": lr, "directions": directions,
            "by_direction": by_direction, "routing": routing}


def _batch(data: PairedSplit, direction: str, batch_size: int, seed: int, step: int, info: DistInfo):
    """This rank's slice of the global batch of `step` for one direction: (x (b, D_s), y (b, D_t)).

    A concatenated input ('image+question->answer') gives x as {modality: (b, D_m)}. In memory or read
    from the stores (train.feed), the rows, their order and their float32 values are the same.
    """
    return data.batch(direction, batch_size, seed, step, info.rank, info.world_size)


def _rank_slice(batch: tuple, info: DistInfo) -> tuple:
    """This rank's contiguous slice of a global batch (x (B, D_s) or {m: (B, D_m)}, y (B, D_t)), as
    PairedSplit.batch slices the batch indices."""
    if not info.enabled:
        return batch
    x, y = batch
    b = y.shape[0] // info.world_size
    part = slice(info.rank * b, (info.rank + 1) * b)
    return ({m: v[part] for m, v in x.items()} if isinstance(x, dict) else x[part]), y[part]


def _scalars(parts: dict) -> dict:
    return {
        "loss": float(parts["loss"]),
        "loss_pred": float(parts["loss_pred"]),
        "loss_cl": float(parts["loss_cl"]),
        "lr": parts["lr"],
        "direction": ",".join(parts["directions"]),
    }


def _validate(
    objective: Objective,
    cfg,
    val_data: PairedSplit,
    state,
    tracker,
    run_dir: Path,
    info: DistInfo,
    runtime: Runtime,
    warned: set[tuple[str, str]] | None = None,
) -> None:
    """Validation recall on rank 0; early stopping and the `best` checkpoint follow mean R@1.

    The record also holds the R² of the predicted latents (`r2`, in the space L_pred uses) and each
    gate's routing over the validation pairs (`val_routing`), from one more forward of those pairs.
    """
    from m3jepa.eval.evaluate import direction_recalls, prediction_health

    mean_r1 = 0.0
    if info.is_main:
        objective.eval()
        # the LoRA mode scores the tails' current latents of the tuned modalities
        data = objective.view(val_data) if hasattr(objective, "view") else val_data
        recalls = direction_recalls(objective.predictor, data, cfg.train.directions, cfg.eval.headline,
                                    runtime=runtime)
        # Recall is reported in percent; the dynamic AGD schedule takes fractions.
        state.last_recalls = {d: r["R@1"] / 100.0 for d, r in recalls.items()}
        mean_r1 = float(np.mean([r["R@1"] for r in recalls.values()]))
        record = {"step": state.step, "val": recalls, "mean_r1": mean_r1}
        health = prediction_health(objective.predictor, data, cfg.train.directions, runtime=runtime)
        if health["r2"]:
            record["r2"] = health["r2"]
        if health["routing"]:
            record["val_routing"] = {d: {g: log_view(h) for g, h in gates.items()}
                                     for d, gates in health["routing"].items()}
            warn_unbalanced(health["routing"], cfg.model.load_balance_weight,
                            f"validation at step {state.step}", warned)
        tracker.log(record)
    mean_r1 = broadcast_float(mean_r1, info, runtime.device)
    # Every rank must draw the same dynamic-AGD directions, so every rank needs rank 0's recalls.
    state.last_recalls = broadcast_object(state.last_recalls, info)
    if mean_r1 > state.best_metric:
        state.best_metric, state.best_step, state.evals_since_best = mean_r1, state.step, 0
        if info.is_main:
            best = RunDir(run_dir).best
            ckpt.save_checkpoint(best, cfg, objective, state, None, _extra(objective))
    else:
        state.evals_since_best += 1
        if cfg.train.patience and state.evals_since_best >= cfg.train.patience:
            state.stopped_early = True
            log.info(
                "early stop at step %d: no better mean R@1 for %d evaluations",
                state.step,
                state.evals_since_best,
            )


def _validation_split(
    cfg: PipelineConfig, train_data: PairedSplit, device: torch.device
) -> tuple[PairedSplit, PairedSplit]:
    """(train, val): the val split's stores; or, when the dataset has no val split (its stores hold no
    rows) and train.carve_val > 0, that share of the train groups, carved out of train (logged)."""
    t = cfg.train
    if t.carve_val > 0 and t.val_split != t.train_split and split_is_empty(cfg, t.val_split, t.directions):
        train_data, val_data, carved = carve_validation(train_data, t.carve_val, t.seed, t.val_split)
        if any(m.features is None for m in val_data.modalities.values()):  # store-fed: validation reads
            in_memory = load_split(cfg, t.train_split, t.directions, device=device)  # rows from memory
            val_data = carve_validation(in_memory, t.carve_val, t.seed, t.val_split)[1]  # the same groups
        log.warning(
            "split %r has no rows: validating on %d of the %d groups of split %r instead "
            "(train.carve_val=%s, seed %d; pairs %s); they do not train",
            t.val_split, carved["groups"], carved["of_groups"], t.train_split, t.carve_val, t.seed,
            ", ".join(f"{d} {n}" for d, n in carved["pairs"].items()),
        )
        return train_data, val_data
    return train_data, load_split(cfg, t.val_split, t.directions, device=device)


def _extra(objective) -> Callable[[Path], None] | None:
    """What a checkpoint writes besides the weights: the LoRA mode's adapters in peft's format."""
    return getattr(objective, "save_adapters", None)


def _accumulate(window: dict[str, list], by_direction: dict[str, torch.Tensor]) -> None:
    # tensors, so a step never waits for the device; _drain reads them once per log line
    for d, value in by_direction.items():
        total, n = window.get(d, (0.0, 0))
        window[d] = [total + value, n + 1]


def _drain(window: dict[str, list]) -> dict[str, float]:
    """Each direction's mean loss over the steps since the last log line that trained it (under AGD a
    log line's own step trained one direction only), then an empty window."""
    out = {d: float(total) / n for d, (total, n) in sorted(window.items())}
    window.clear()
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed, so a resumed log reads like one run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))
