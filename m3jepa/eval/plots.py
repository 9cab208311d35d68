"""Figures for a run: training curves from metrics.jsonl, and the 10x10 image-text similarity heatmap."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LOSS_PARTS = ("loss_pred", "loss_cl")


@dataclass
class TrainingLog:
    """The records of a run's metrics.jsonl, split into training and validation series."""

    # direction -> (steps, losses): each direction's loss_by_direction, else the line's own direction;
    # "all" when lines carry no direction, "a,b" for an older joint line (the sum of both)
    loss: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    parts: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # loss_pred / loss_cl
    val_r1: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # direction -> R@1
    mean_r1: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))
    n_train: int = 0
    n_val: int = 0


def read_training_log(metrics_jsonl: str | Path) -> TrainingLog:
    """Parse metrics.jsonl; a truncated last line (a writer mid-line) is skipped, other bad lines raise."""
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; train-predictor writes it into the run directory")
    lines = [(i + 1, line) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty: no training or validation records to plot yet")
    out = TrainingLog()
    series: dict[str, dict[str, tuple[list, list]]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for n, line in lines:
        record = _parse_line(path, n, line, last=n == lines[-1][0])
        if record is not None:
            _add_record(record, series, out)
    if out.n_train == 0 and out.n_val == 0:
        raise ValueError(f"{path} has no training ('loss') or validation ('val') records")
    out.loss, out.parts, out.val_r1 = dict(series["loss"]), dict(series["parts"]), dict(series["val"])
    return out


def _parse_line(path: Path, n: int, line: str, last: bool) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        if last:
            log.warning("%s:%d is not complete JSON (still being written?); skipped", path, n)
            return None
        raise ValueError(f"{path}:{n} is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{n} is not a JSON object")
    return record


def _add_record(record: dict[str, Any], series: dict, out: TrainingLog) -> None:
    if "step" not in record:
        return  # e.g. a header or summary line: nothing to plot
    step = int(record["step"])
    if "loss" in record:
        out.n_train += 1
        by_direction = record.get("loss_by_direction")
        if isinstance(by_direction, dict) and by_direction:
            for direction, value in by_direction.items():
                _append(series["loss"][direction], step, value)
        else:  # a log written before loss_by_direction: the line's step trained `direction`
            _append(series["loss"][str(record.get("direction", "all"))], step, record["loss"])
        for part in LOSS_PARTS:
            if record.get(part) is not None:
                _append(series["parts"][part], step, record[part])
    if isinstance(record.get("val"), dict):
        out.n_val += 1
        for direction, recalls in record["val"].items():
            if isinstance(recalls, dict) and "R@1" in recalls:
                _append(series["val"][direction], step, recalls["R@1"])
        if record.get("mean_r1") is not None:
            _append(out.mean_r1, step, record["mean_r1"])


def _append(xy: tuple[list, list], step: int, value: Any) -> None:
    xy[0].append(step)
    xy[1].append(float(value))


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> TrainingLog:
    """Two panels: training loss (per direction, and its pred/CL parts) and validation R@1, vs step."""
    history = read_training_log(metrics_jsonl)
    _save(training_figure(history), out_png)
    return history


def training_figure(history: TrainingLog) -> Any:
    """The training-curves figure (axes: loss, validation R@1), not yet saved."""
    fig = _figure(figsize=(11, 4.2))
    ax_loss, ax_val = fig.subplots(1, 2)
    _loss_panel(ax_loss, history)
    _val_panel(ax_val, history)
    fig.tight_layout()
    return fig


def _loss_panel(ax: Any, history: TrainingLog) -> None:
    ax.set_title("training loss")
    ax.set_xlabel("step")
    if not history.loss:
        _empty(ax, "no training records yet")
        return
    for direction, (steps, values) in sorted(history.loss.items()):
        ax.plot(steps, values, marker=_marker(steps), ms=4, lw=1.2, label=_loss_label(direction))
    for (part, (steps, values)), style in zip(sorted(history.parts.items()), ("--", ":"), strict=False):
        ax.plot(steps, values, style, marker=_marker(steps), ms=3, lw=1.0, alpha=0.8, label=part)
    values = np.concatenate([v for _, v in [*history.loss.values(), *history.parts.values()]])
    # Prediction and contrastive losses differ by orders of magnitude; a log axis shows both.
    if np.all(values > 0) and values.max() / values.min() > 50:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _val_panel(ax: Any, history: TrainingLog) -> None:
    ax.set_title("validation R@1 (%)")
    ax.set_xlabel("step")
    if not history.val_r1:
        _empty(ax, "no validation records yet")
        return
    for direction, (steps, values) in sorted(history.val_r1.items()):
        ax.plot(steps, values, marker="o", ms=4, lw=1.2, label=direction)
    steps, values = history.mean_r1
    if steps:
        ax.plot(steps, values, "k--", marker="s", ms=4, lw=1.0, label="mean R@1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _marker(steps: list[int]) -> str | None:
    # a line through one point draws nothing: a lone point gets a marker
    return "o" if len(steps) == 1 else None


def _loss_label(direction: str) -> str:
    if direction == "all":
        return "loss"
    if "," in direction:  # an older joint line: one loss summed over its directions
        return "loss " + " + ".join(direction.split(","))
    return f"loss {direction}"


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_similarity_matrix(
    sim: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    out_png: str | Path,
    *,
    title: str = "image-text similarity",
    space: str | None = None,
    axis_names: tuple[str, str] = ("query", "gallery"),
    true_pairs: Sequence[tuple[int, int]] = (),
    max_label_chars: int = 32,
) -> Any:
    """Heatmap of `sim` (R, C), e.g. 10 images x 10 captions, each cell annotated with its value.

    `space` ("cl" or "pred") is named in the title; `axis_names` label the rows and the columns;
    each (row, column) of `true_pairs` gets a box. Returns the saved figure.
    """
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.size == 0:
        raise ValueError(f"sim must be a non-empty 2-D matrix, got shape {sim.shape}")
    if len(row_labels) != sim.shape[0] or len(col_labels) != sim.shape[1]:
        raise ValueError(
            f"sim is {sim.shape[0]}x{sim.shape[1]} but got {len(row_labels)} row and "
            f"{len(col_labels)} column labels"
        )
    if not np.isfinite(sim).all():
        raise ValueError("sim contains NaN or inf values")
    bad = [p for p in true_pairs if not (0 <= p[0] < sim.shape[0] and 0 <= p[1] < sim.shape[1])]
    if bad:
        raise ValueError(f"true_pairs {bad} fall outside the {sim.shape[0]}x{sim.shape[1]} matrix")
    n_rows, n_cols = sim.shape
    fig = _figure(figsize=(1.0 + 0.75 * n_cols + 2.5, 1.5 + 0.6 * n_rows + 2.0))
    ax = fig.subplots()
    image = ax.imshow(sim, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    _annotate(ax, sim)
    _mark_pairs(ax, true_pairs)
    ax.set_xticks(range(n_cols), [_short(s, max_label_chars) for s in col_labels], rotation=45, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(n_rows), [_short(s, max_label_chars) for s in row_labels])
    ax.tick_params(labelsize=8)
    ax.set_ylabel(axis_names[0])
    ax.set_xlabel(axis_names[1])
    named = f"{title}, {space} space" if space else title
    ax.set_title(named + (" (boxes: true pairs)" if true_pairs else ""))
    fig.tight_layout()
    _save(fig, out_png)
    return fig


def _mark_pairs(ax: Any, pairs: Sequence[tuple[int, int]]) -> None:
    from matplotlib.patches import Rectangle

    for i, j in pairs:  # a cell spans (j - 0.5, i - 0.5) to (j + 0.5, i + 0.5) in imshow's coordinates
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.2,
                               gid="true pair"))


def _annotate(ax: Any, sim: np.ndarray) -> None:
    # Dark text on light cells and light text on dark ones, so every value stays readable.
    midpoint = (sim.max() + sim.min()) / 2
    for (i, j), value in np.ndenumerate(sim):
        colour = "black" if value > midpoint else "white"
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)


def _short(label: Any, limit: int) -> str:
    """One line of at most `limit` characters: whitespace collapsed, a longer label cut with an ellipsis."""
    text = " ".join(str(label).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _figure(figsize: tuple[float, float]) -> Any:
    # A bare Figure renders with Agg and never touches pyplot's global state or a display.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=100)


def _save(fig: Any, out_png: str | Path) -> None:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(out_png)
