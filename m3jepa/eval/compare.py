"""`m3jepa compare`: runs side by side: config differences, training, recalls, routing health where scored."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from m3jepa.core.layout import RunDir
from m3jepa.eval.report import flatten

# The run's own path always differs between runs; it heads the run's column instead.
NOT_COMPARED = frozenset({"run_dir"})
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
    path = RunDir(run_dir).config
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no config.toml "
                         "(train-predictor writes one)")
    try:
        return flatten(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid TOML ({e}); the run's config is unreadable") from None


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
        "extra": extra,
        "provenance": metrics.get("provenance"),
    }


def compare_runs(run_dirs: list[Path], split: str = "test") -> dict[str, Any]:
    """The runs side by side, as `m3jepa compare --json` prints them."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    configs = [_read_config(Path(r)) for r in run_dirs]
    keys = sorted(set().union(*configs) - NOT_COMPARED)
    differing = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
    runs = []
    for run_dir, cfg in zip(run_dirs, configs, strict=True):
        runs.append({
            "run": str(run_dir),
            "dataset": cfg.get("encode.dataset"),
            "predictor": cfg.get("model.predictor"),
            "gates": cfg.get("model.gates"),
            "routing": cfg.get("model.routing"),
            "config": {k: cfg.get(k) for k in differing},
            **_training(Path(run_dir)),
            **_evaluation(Path(run_dir), split),
        })
    return {"split": split, "differing_keys": differing, "runs": runs}


def markdown(result: dict[str, Any]) -> str:
    """One table, a column per run: what it is, how it differs, how it trained and how it scores."""
    runs = result["runs"]
    rows: list[tuple[str, list[str]]] = [
        ("dataset", [_cell(r["dataset"]) for r in runs]),
        ("predictor / gates / routing", [f"{r['predictor']} / {r['gates']} / {r['routing']}" for r in runs]),
    ]
    rows += [(k, [_cell(r["config"][k]) for r in runs]) for k in result["differing_keys"]]
    rows.append(("steps", [_cell(r["steps"]) for r in runs]))
    rows.append(("best val mean R@1", [_best(r) for r in runs]))
    rows += _recall_rows(result)
    extra_keys = sorted({k for r in runs if r["evaluated"] for k in r["extra"]})
    rows += [(k, [_cell(r["extra"].get(k)) if r["evaluated"] else MISSING for r in runs]) for k in extra_keys]
    lines = ["| | " + " | ".join(_escape(r["run"]) for r in runs) + " |", "|---|" + "---|" * len(runs)]
    lines += ["| " + " | ".join(_escape(c) for c in [name, *cells]) + " |" for name, cells in rows]
    notes = [f"- {r['run']}: not evaluated on {result['split']}; run `{r['evaluate_command']}`"
             for r in runs if not r["evaluated"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _recall_rows(result: dict[str, Any]) -> list[tuple[str, list[str]]]:
    runs = result["runs"]
    directions = sorted({d for r in runs if r["evaluated"] for d in r["recalls"]})
    if not directions:
        return [(f"{result['split']} R@1 / R@5 / R@10", ["not evaluated"] * len(runs))]
    rows = []
    for d in directions:
        cells = []
        for r in runs:
            if not r["evaluated"]:
                cells.append("not evaluated")
            elif d not in r["recalls"]:
                cells.append(MISSING)
            else:
                cells.append(" / ".join(_recall(r["recalls"][d].get(k)) for k in ("R@1", "R@5", "R@10")))
        rows.append((f"{result['split']} {d} R@1 / R@5 / R@10", cells))
    return rows


def _recall(value: Any) -> str:
    return MISSING if value is None else f"{float(value):.2f}"


def _best(run: dict[str, Any]) -> str:
    if run["best_val_mean_r1"] is None:
        return MISSING
    return f"{run['best_val_mean_r1']:.2f} (step {run['best_step']})"


def _cell(value: Any, fmt: str = ".4g") -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return format(value, fmt)
    return value if isinstance(value, str) else json.dumps(value)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")
