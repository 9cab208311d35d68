"""`m3jepa compare`: runs grouped by config (seeds pooled), mean ± std against the seed spread and chance,
config differences, training, recalls, routing health where scored, and a plot with error bars."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from m3jepa.core.checkpoint import SPEED_ONLY
from m3jepa.core.layout import RunDir
from m3jepa.eval.report import flatten

# Keys that never tell two runs' configs apart: the run's own name and folder, its seed (the runs of one
# config with different seeds are one group), and the speed-only settings of run identity
# (m3jepa.core.checkpoint.SPEED_ONLY: threads, feed, logging cadence, device, how stores were made).
NOT_COMPARED = frozenset({"name", "run_dir", "train.seed"}) | SPEED_ONLY
# What routing-health evaluation adds to metrics.json, shown when a run has it: the routing entropy (and
# whether routing collapsed) per direction and space, and the pred-space R² per direction.
EXTRA_SECTIONS = ("routing", "r2")
EXTRA_LEAVES = {"routing": ("entropy", "collapsed"), "r2": None}  # None: every value of the section
MISSING = "—"


def metrics_path(run_dir: Path, split: str) -> Path:
    """The metrics file `m3jepa evaluate --split SPLIT` writes (multi-caption protocol)."""
    return RunDir(run_dir).metrics(split, "multi")


def evaluate_command(run_dir: Path, split: str) -> str:
    return f"m3jepa evaluate --run {run_dir}" + ("" if split == "test" else f" --split {split}")


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config, every key spelled out (defaults filled in through the config's own dataclasses),
    so a default written in one config.toml and left out of another is the same value, not a difference."""
    from m3jepa.config import load_pipeline

    path = RunDir(run_dir).config
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no config.toml "
                         "(train-predictor writes one)")
    try:
        cfg = load_pipeline(path, written_by_m3jepa=True)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable run config ({e})") from None
    return flatten(dataclasses.asdict(cfg))


def _training(run_dir: Path) -> dict[str, Any]:
    """Steps logged and the best validation mean R@1 (and its step), from metrics.jsonl."""
    steps, best, best_step = None, None, None
    path = RunDir(run_dir).metrics_log
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written (a run in progress)
        if not isinstance(record, dict) or "step" not in record:
            continue
        steps = max(steps or 0, int(record["step"]))
        if record.get("mean_r1") is not None and (best is None or record["mean_r1"] > best):
            best, best_step = float(record["mean_r1"]), int(record["step"])
    return {"steps": steps, "best_val_mean_r1": best, "best_step": best_step}


def _metrics(run_dir: Path, split: str) -> dict[str, Any] | None:
    path = metrics_path(run_dir, split)
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); evaluate the run again") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("directions"), dict):
        raise ValueError(f"{path} has no 'directions' recalls; evaluate the run again")
    return metrics


def _evaluation(run_dir: Path, split: str) -> dict[str, Any]:
    metrics = _metrics(run_dir, split)
    if metrics is None:
        return {"evaluated": False, "evaluate_command": evaluate_command(run_dir, split)}
    extra = {}
    for section in EXTRA_SECTIONS:
        if isinstance(metrics.get(section), dict):
            leaves = EXTRA_LEAVES[section]
            extra.update({k: v for k, v in flatten(metrics[section], section + ".").items()
                          if leaves is None or k.rsplit(".", 1)[-1] in leaves})
    return {
        "evaluated": True,
        "headline_space": metrics.get("headline_space"),
        "recalls": metrics["directions"],
        "gallery": metrics.get("gallery"),  # {direction: {"queries", "gallery"}}: the chance level
        "extra": extra,
        "provenance": metrics.get("provenance"),
    }


def compare_runs(run_dirs: list[Path], split: str = "test") -> dict[str, Any]:
    """The runs side by side and grouped by config, as `m3jepa compare --json` prints them."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    configs = [_read_config(Path(r)) for r in run_dirs]
    keys = sorted(set().union(*configs) - NOT_COMPARED)
    differing = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
    runs = []
    for run_dir, cfg in zip(run_dirs, configs, strict=True):
        runs.append({
            "run": str(run_dir),
            "seed": cfg.get("train.seed"),
            "dataset": cfg.get("encode.dataset"),
            "predictor": cfg.get("model.predictor"),
            "gates": cfg.get("model.gates"),
            "routing": cfg.get("model.routing"),
            "config": {k: cfg.get(k) for k in differing},
            **_training(Path(run_dir)),
            **_evaluation(Path(run_dir), split),
        })
    return {"split": split, "differing_keys": differing, "runs": runs, "groups": _groups(runs)}


# ---------------------------------------------------------------- groups: one config, its seeds

def _groups(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs of one config (all differing keys equal) form a group; each metric's mean ± sample std over
    its evaluated runs; every later group's differences from the first, judged against the seed spread."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_config.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r)
    groups = [_group(members) for members in by_config.values()]
    for g in groups[1:]:
        g["vs_first"] = {m: _difference(groups[0]["metrics"].get(m), g["metrics"][m]) for m in g["metrics"]}
    return groups


def _label(members: list[dict[str, Any]]) -> str:
    """The group's name: its first run's folder name, less a trailing `-seed<N>` (`--seeds` names)."""
    return re.sub(r"-seed\d+$", "", Path(members[0]["run"]).name) or members[0]["run"]


def _group(members: list[dict[str, Any]]) -> dict[str, Any]:
    values: dict[str, list[float]] = {}
    for r in members:
        for name, v in _run_metrics(r).items():
            values.setdefault(name, []).append(v)
    evaluated = [r for r in members if r["evaluated"]]
    return {
        "label": _label(members),
        "runs": [r["run"] for r in members],
        "seeds": [r["seed"] for r in members],
        "config": members[0]["config"],
        "evaluated": len(evaluated),
        "metrics": {name: _stats(v) for name, v in values.items()},
        "chance": _chance(evaluated[0]) if evaluated else {},
    }


def _run_metrics(r: dict[str, Any]) -> dict[str, float]:
    """The numbers a group pools: steps, best validation mean R@1, each direction's test R@k and their
    mean R@1 over directions (headline space)."""
    out: dict[str, float] = {}
    if r["steps"] is not None:
        out["steps"] = float(r["steps"])
    if r["best_val_mean_r1"] is not None:
        out["best val mean R@1"] = float(r["best_val_mean_r1"])
    if r["evaluated"]:
        r1 = []
        for d, rec in sorted(r["recalls"].items()):
            for k in ("R@1", "R@5", "R@10"):
                if rec.get(k) is not None:
                    out[f"{d} {k}"] = float(rec[k])
            if rec.get("R@1") is not None:
                r1.append(float(rec["R@1"]))
        if r1:
            out["mean R@1"] = float(np.mean(r1))
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    """Mean and sample std (ddof 1; None for one value) of one metric over a group's runs."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "n": len(values), "values": values}


def _difference(first: dict[str, Any] | None, other: dict[str, Any]) -> dict[str, Any] | None:
    """other − first, and whether it exceeds the seed spread: the larger of the two groups' sample stds.

    `beyond_spread` is None when either group has one run (no spread to judge by)."""
    if first is None:
        return None
    diff = other["mean"] - first["mean"]
    if first["std"] is None or other["std"] is None:
        return {"diff": diff, "spread": None, "beyond_spread": None}
    spread = max(first["std"], other["std"])
    return {"diff": diff, "spread": spread, "beyond_spread": bool(abs(diff) > spread)}


def _chance(run: dict[str, Any]) -> dict[str, float]:
    """R@1 of a random ranking per direction, in percent: 100 / min(queries, gallery). Every item belongs to
    one group and every query has its group's items as positives, so with one item per group on either
    side the chance of a positive at rank 1 is (positives per query) / gallery = 1 / min(queries, gallery)."""
    sizes = run.get("gallery") or {}
    return {d: 100.0 / min(int(g["queries"]), int(g["gallery"])) for d, g in sorted(sizes.items())
            if min(int(g["queries"]), int(g["gallery"])) > 0}


# ---------------------------------------------------------------- the table

def markdown(result: dict[str, Any]) -> str:
    """One table, a column per config (its seeds pooled): how it differs, how it trained and how it scores
    as mean ± std; later columns say how far they are from the first, and whether that beats the noise."""
    groups = result["groups"]
    rows: list[tuple[str, list[str]]] = [
        ("runs", [f"{len(g['runs'])} (seed{'s' if len(g['seeds']) > 1 else ''} "
                  f"{', '.join(str(x) for x in g['seeds'])})" for g in groups]),
    ]
    rows += [(k, [_cell(g["config"].get(k)) for g in groups]) for k in result["differing_keys"]]
    metrics = _metric_order(groups)
    for name in metrics:
        label = name if name in ("steps", "best val mean R@1") else f"{result['split']} {name}"
        rows.append((label, [_metric_cell(g, name, i) for i, g in enumerate(groups)]))
    chance = _chance_row(groups)
    if chance:
        rows.append((f"chance R@1 ({result['split']})", chance))
    rows += _extra_rows(result)
    lines = ["| | " + " | ".join(_escape(g["label"]) for g in groups) + " |", "|---|" + "---|" * len(groups)]
    lines += ["| " + " | ".join(_escape(c) for c in [name, *cells]) + " |" for name, cells in rows]
    notes = [
        "",
        "Cells: mean ± sample std over a column's runs (one config, its seeds). Later columns give their "
        "difference from the first in brackets: **bold** where it is larger than the seed spread (the larger "
        "std of the two columns), `≈` where it is not (noise at this many seeds), `?` where a column has one "
        "run (no spread to judge by). Chance: R@1 of a random ranking, 100 / min(queries, gallery).",
    ]
    notes += [f"- {r['run']}: not evaluated on {result['split']}; run `{r['evaluate_command']}`"
              for r in result["runs"] if not r["evaluated"]]
    return "\n".join(lines + notes) + "\n"


def _metric_order(groups: list[dict[str, Any]]) -> list[str]:
    names = {n for g in groups for n in g["metrics"]}
    head = [n for n in ("steps", "best val mean R@1") if n in names]
    r1 = sorted(n for n in names if n.endswith(" R@1") and n not in head and n != "mean R@1")
    rest = sorted((n for n in names if n not in head and n not in r1 and n != "mean R@1"), key=_by_k)
    return head + r1 + (["mean R@1"] if "mean R@1" in names else []) + rest


def _by_k(name: str) -> tuple[str, int]:
    """'image->text R@10' sorts after 'image->text R@5'."""
    head, _, k = name.rpartition(" R@")
    return (head, int(k)) if k.isdigit() else (name, 0)


def _metric_cell(group: dict[str, Any], name: str, index: int) -> str:
    st = group["metrics"].get(name)
    if st is None:
        return "not evaluated" if name not in ("steps", "best val mean R@1") else MISSING
    digits = 0 if name == "steps" else 2
    cell = f"{st['mean']:.{digits}f}" + (f" ± {st['std']:.{digits}f}" if st["std"] is not None else "")
    d = group.get("vs_first", {}).get(name) if index else None
    if d is not None:
        diff = f"{d['diff']:+.{digits}f}"
        mark = {True: f"**{diff}**", False: f"{diff} ≈", None: f"{diff} ?"}[d["beyond_spread"]]
        cell += f" ({mark})"
    return cell


def _chance_row(groups: list[dict[str, Any]]) -> list[str]:
    if not any(g["chance"] for g in groups):
        return []
    return [", ".join(f"{d} {v:.2f}" for d, v in g["chance"].items()) or MISSING for g in groups]


def _extra_rows(result: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Routing entropy, collapse and R² per group, where evaluate recorded them (one run's values when a
    group has several: the first evaluated run)."""
    out = []
    firsts = []
    for g in result["groups"]:
        runs = [r for r in result["runs"] if r["run"] in g["runs"] and r["evaluated"]]
        firsts.append(runs[0]["extra"] if runs else None)
    keys = sorted({k for e in firsts if e for k in e})
    for k in keys:
        out.append((k, [_cell(e.get(k)) if e is not None else MISSING for e in firsts]))
    return out


# ---------------------------------------------------------------- the plot

def plot_groups(result: dict[str, Any], out_png: Path) -> Path:
    """Bars of each group's mean test R@1 per direction and over directions, error bars of ± one sample
    std over its seeds, the chance level as a tick on each bar's column; written atomically."""
    from m3jepa.eval.plots import _figure, _save

    groups = [g for g in result["groups"] if g["evaluated"]]
    if not groups:
        raise ValueError(f"no run is evaluated on {result['split']}: nothing to plot "
                         "(m3jepa evaluate --run R)")
    names = [n for n in _metric_order(groups) if n.endswith(" R@1") and n != "best val mean R@1"]
    fig = _figure((max(5.0, 1.6 * len(names) * len(groups) ** 0.5 + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(groups)
    for i, g in enumerate(groups):
        means = [g["metrics"].get(n, {}).get("mean", math.nan) for n in names]
        stds = [g["metrics"].get(n, {}).get("std") or 0.0 for n in names]
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, means, width, yerr=stds, capsize=4, label=f"{g['label']} (n={len(g['runs'])})")
    chance = groups[0]["chance"]
    for j, n in enumerate(names):
        d = n[: -len(" R@1")]
        level = chance.get(d, np.mean(list(chance.values())) if d == "mean" and chance else None)
        if level is not None:
            ax.hlines(level, j - 0.45, j + 0.45, colors="black", linestyles="dashed",
                      label="chance" if j == 0 else None)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel(f"{result['split']} R@1 (%), mean ± std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_png)
    return Path(out_png)


def _cell(value: Any, fmt: str = ".4g") -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return format(value, fmt)
    return value if isinstance(value, str) else json.dumps(value)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def default_plot(run_dirs: list[Path]) -> Path:
    """compare.png in the runs' deepest common folder."""
    import os

    common = Path(os.path.commonpath([str(Path(r).resolve()) for r in run_dirs]))
    if len(run_dirs) == 1 or common == Path(run_dirs[0]).resolve():  # one run: beside it, not inside
        common = common.parent
    return common / "compare.png"
