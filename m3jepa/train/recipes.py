"""Recipes around the training loop: routing tallies, target statistics, a run sized by its data."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from m3jepa.config import PipelineConfig
from m3jepa.core.directions import parse_direction
from m3jepa.core.paired import ModalityFeatures, PairedSplit
from m3jepa.device_table import kind_of
from m3jepa.model.moe import log_view, routing_health

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- routing health


class RoutingTally:
    """Each (direction, gate)'s expert assignment counts summed over steps, on the device.

    `add` is called every step with the counts the step's forward already made (no second forward, no
    host sync); `read` moves them to the host once (one stacked `tolist`) at a log step and starts over.
    `top_k` None (a predictor without a router) keeps nothing.
    """

    def __init__(self, top_k: int | None) -> None:
        self.top_k = top_k
        self.counts: dict[tuple[str, str], Tensor] = {}  # (direction, gate) -> (N,) int64
        self.rows: dict[str, int] = {}  # direction -> rows routed

    def add(self, routing: dict[str, tuple[dict[str, Tensor], int]]) -> None:
        if self.top_k is None:
            return
        for d, (counts, rows) in routing.items():
            for gate, c in counts.items():
                key = (d, gate)
                self.counts[key] = c if key not in self.counts else self.counts[key] + c  # (N,)
            self.rows[d] = self.rows.get(d, 0) + rows

    def read(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{direction: {gate: {"share": {...}, "entropy": x}}} since the last read; {} when empty."""
        if not self.counts:
            return {}
        keys = list(self.counts)
        host = torch.stack([self.counts[k] for k in keys]).tolist()  # (G, N): the one sync
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (d, gate), c in zip(keys, host, strict=True):
            out.setdefault(d, {})[gate] = log_view(routing_health(c, self.rows[d], self.top_k))
        self.counts.clear()
        self.rows.clear()
        return out


# ---------------------------------------------------------------- standardised prediction targets

STATS_CHUNK = 65536  # rows read at a time


def _stored_rows(m: ModalityFeatures, rows: np.ndarray) -> Tensor:
    """(b, D) stored latents of `rows` from memory, the device or the store (never a LoRA tail's prefix)."""
    if m.features is not None:
        return m.features[torch.from_numpy(rows).to(m.features.device)]
    return m.reader(rows)


def target_statistics(data: PairedSplit, modality: str, rows: np.ndarray) -> tuple[Tensor, Tensor]:
    """Per-dimension (mean (D,), std (D,) with ddof 0), float64, of `modality`'s stored latents at `rows`."""
    m = data.modalities[modality]
    total = sq = None
    for i in range(0, len(rows), STATS_CHUNK):
        f = _stored_rows(m, rows[i : i + STATS_CHUNK]).double()  # (b, D)
        s, s2 = f.sum(dim=0), f.square().sum(dim=0)  # (D,) each
        total, sq = (s, s2) if total is None else (total + s, sq + s2)
    n = len(rows)
    mean = total / n  # (D,)
    var = (sq / n - mean.square()).clamp_min(0.0)  # (D,)
    return mean, var.sqrt()


def fit_target_statistics(predictor: nn.Module, data: PairedSplit, directions: list[str]) -> None:
    """Set the predictor's standardisation buffers (loss.pred_target = "standardized") from the train split:
    for each target modality, the rows that are a target of some direction's training pair."""
    space = getattr(predictor, "target_space", None)
    if space is None:
        return
    targets: dict[str, list[np.ndarray]] = {}
    for d in directions:
        targets.setdefault(parse_direction(d)[1], []).append(data.pairs[d][1])
    for modality, parts in targets.items():
        rows = np.unique(np.concatenate(parts))
        mean, std = target_statistics(data, modality, rows)
        space.fit(modality, mean, std)
        log.info(
            "loss.pred_target=standardized: %s statistics from %d %s rows of split %r (mean |mean| %.3g, "
            "mean std %.3g)", modality, len(rows), modality, data.split, float(mean.abs().mean()),
            float(std.mean()),
        )


# ---------------------------------------------------------------- a run sized by its data

# The keys `auto_size` may set; `train-predictor` without a pipeline sizes those its --set does not give.
SIZED_KEYS = frozenset({"model.dim", "model.hidden", "model.cl_dim", "train.batch_size", "train.max_steps"})
# (largest pair count, d, h, d_cl): up to 5,000 pairs the width pipelines/tuxpaint.toml measured on 628
# pairs (4.3M parameters matched 15M on validation R@1); up to 100,000 ModelConfig's defaults; beyond, the
# paper's preset (d = h = d_cl = 2048), which the paper trained on COCO's 566,000 pairs.
SIZES = ((5_000, 256, 512, 128), (100_000, 512, 1024, 256), (math.inf, 2048, 2048, 2048))
# A step budget, not a schedule: the run stops when validation mean R@1 has not improved for
# train.patience evaluations (10 × eval_every 50 = 500 steps by default), and the learning rate's cosine
# runs over the budget. The old fixed 300 steps stopped Tux Paint, emoji and an icon set while validation
# was still improving (docs/training.md, "Without a pipeline", measured).
MIN_BUDGET = 3000


def sized_values(pairs: dict[str, int], epochs: int, batch_size: int) -> dict[str, int]:
    """The rule: width from the largest direction's pairs P (SIZES); batch = train.batch_size halved until
    it fits the smallest direction; step budget = max(MIN_BUDGET, ceil(epochs · P / batch))."""
    largest, smallest = max(pairs.values()), min(pairs.values())
    _, dim, hidden, cl_dim = next(row for row in SIZES if largest <= row[0])
    batch = batch_size
    while batch > smallest and batch > 1:
        batch //= 2
    steps = max(MIN_BUDGET, math.ceil(epochs * largest / batch))
    return {"model.dim": dim, "model.hidden": hidden, "model.cl_dim": cl_dim, "train.batch_size": batch,
            "train.max_steps": steps}


def auto_size(
    cfg: PipelineConfig, data: PairedSplit, keys: frozenset[str], device: torch.device | None = None
) -> PipelineConfig:
    """`cfg` with `keys` (a subset of SIZED_KEYS) set by `sized_values` from the train split's pairs;
    the log says what was chosen and why. A batch that is sized (not given) starts at `device`'s row of
    the device table (`train_batch`: 128 on a CPU, 4,096 on a GPU), else at train.batch_size."""
    pairs = {d: data.num_pairs(d) for d in cfg.train.directions}
    start = cfg.train.batch_size
    if device is not None and "train.batch_size" in keys:
        start = kind_of(device).train_batch
    sized = sized_values(pairs, cfg.train.epochs, start)
    values = {k: v for k, v in sized.items() if k in keys}
    if not values:
        return cfg
    sections: dict[str, dict[str, int]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    out = dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in sections.items()}
    )
    log.warning(
        "no pipeline: sized from the %s train pairs (largest direction %d): %s; a step budget that early "
        "stopping ends after train.patience=%d validations (every %d steps) without a better mean R@1 "
        "(docs/training.md, 'Without a pipeline'; --set any of them, or pass --pipeline, to choose yourself)",
        ", ".join(f"{d} {n}" for d, n in pairs.items()), max(pairs.values()),
        ", ".join(f"{k}={v}" for k, v in sorted(values.items())), cfg.train.patience, cfg.train.eval_every,
    )
    return out
