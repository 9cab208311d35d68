"""Routing health over training: each gate's expert shares (and normalised entropy) per logged step."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class RoutingSeries:
    """One (direction, gate): the steps logged, each expert's share of the rows, the normalised entropy."""

    steps: list[int] = field(default_factory=list)
    shares: list[list[float]] = field(default_factory=list)  # per step, one share per expert (sorted names)
    entropy: list[float] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)


def read_routing(metrics_jsonl: str | Path) -> dict[tuple[str, str], RoutingSeries]:
    """The `routing` entries of the training records of metrics.jsonl, keyed by (direction, gate).

    Lines that are not complete JSON (a writer mid-line) and records without routing are skipped.
    """
    out: dict[tuple[str, str], RoutingSeries] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for d, gates in (record.get("routing") or {}).items():
            for gate, h in gates.items():
                s = out.setdefault((d, gate), RoutingSeries())
                names = sorted(h["share"])
                if not s.experts:
                    s.experts = names
                s.steps.append(int(record["step"]))
                s.shares.append([float(h["share"][e]) for e in s.experts])
                s.entropy.append(float(h["entropy"]))
    return out


def plot_routing(metrics_jsonl: str | Path, out_png: str | Path) -> dict[tuple[str, str], RoutingSeries]:
    """One panel per (gate, direction): each expert's share of the rows vs step (stacked, so the band
    heights sum to k), titled with the last normalised entropy. Writes nothing when no record has routing
    (mlp and linear predictors)."""
    from m3jepa.eval.plots import _figure, _save

    series = read_routing(metrics_jsonl)
    if not series:
        return series
    gates = sorted({g for _, g in series})
    directions = sorted({d for d, _ in series})
    fig = _figure(figsize=(4.6 * len(directions), 3.2 * len(gates)))
    axes = np.atleast_2d(np.asarray(fig.subplots(len(gates), len(directions), squeeze=False)))
    for i, gate in enumerate(gates):
        for j, d in enumerate(directions):
            _panel(axes[i, j], series.get((d, gate)), d, gate)
    fig.tight_layout()
    _save(fig, out_png)
    return series


def _panel(ax: Any, s: RoutingSeries | None, direction: str, gate: str) -> None:
    if s is None or not s.steps:
        ax.set_axis_off()
        return
    shares = np.asarray(s.shares).T  # (N, steps)
    from matplotlib import colormaps

    colors = colormaps["tab20"](np.arange(len(s.experts)) % 20)  # 20 distinct colours before any repeats
    ax.stackplot(s.steps, shares, labels=s.experts, colors=colors, linewidth=0.3)
    ax.set_title(f"{gate} gate, {direction}: entropy {s.entropy[-1]:.2f}", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("share of rows (stacked; sums to k)")
    if s.steps[-1] > s.steps[0]:
        ax.set_xlim(s.steps[0], s.steps[-1])
    if len(s.experts) <= 16:
        ax.legend(fontsize=6, ncol=2, loc="upper right")
