"""The evaluation report: a markdown metrics table, and metrics.json / metrics.md written into a run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_KEYS = ("split", "protocol", "headline_space", "spaces")


@dataclass
class MetricsFiles:
    """Where `write_metrics` put the report."""

    json: Path
    markdown: Path


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown: one row per direction x space with R@k and their mean, then gallery sizes and latency.

    `metrics` = {"split", "protocol", "headline_space", "spaces": {direction: {space: {"R@1": ..}}},
    optional "gallery": {direction: {"queries": int, "gallery": int}}, optional "latency_ms": float}.
    The headline space's rows are in bold.
    """
    _validate(metrics)
    directions: dict[str, dict[str, dict[str, float]]] = metrics["spaces"]
    ks = _recall_keys(directions)
    headline = metrics["headline_space"]
    lines = [
        f"split: {metrics['split']} · protocol: {metrics['protocol']} · headline space: {headline}",
        "",
        "| direction | space | " + " | ".join(ks) + " | mean |",
        "|---|---|" + "---:|" * (len(ks) + 1),
    ]
    for direction, spaces in directions.items():
        for space, recalls in spaces.items():
            values = [float(recalls[k]) for k in ks]
            cells = [direction, space] + [f"{v:.2f}" for v in values] + [f"{np.mean(values):.2f}"]
            if space == headline:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(_footer_lines(metrics, ks))
    return "\n".join(lines).rstrip() + "\n"


def _validate(metrics: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    if missing:
        raise ValueError(
            f"metrics dict lacks key(s) {', '.join(missing)}; it needs {', '.join(REQUIRED_KEYS)}"
        )
    directions = metrics["spaces"]
    if not isinstance(directions, dict) or not directions:
        raise ValueError("metrics['spaces'] must be a non-empty {direction: {space: {R@k: value}}}")
    for direction, spaces in directions.items():
        if not isinstance(spaces, dict) or not spaces:
            raise ValueError(f"metrics['spaces'][{direction!r}] must map space names to recalls")


def _recall_keys(directions: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The R@k columns, ordered by k; every row must have the same ones."""
    key_sets = {frozenset(r) for spaces in directions.values() for r in spaces.values()}
    if len(key_sets) != 1:
        raise ValueError(
            f"every direction and space must report the same recalls, got {sorted(map(sorted, key_sets))}"
        )
    keys = list(next(iter(key_sets)))
    bad = [k for k in keys if not re.fullmatch(r"R@\d+", k)]
    if bad or not keys:
        raise ValueError(f"recall keys must look like 'R@5', got {sorted(keys)}")
    return sorted(keys, key=lambda k: int(k[2:]))


def _footer_lines(metrics: dict[str, Any], ks: list[str]) -> list[str]:
    lines = []
    headline = metrics["headline_space"]
    headline_r1 = [s[headline]["R@1"] for s in metrics["spaces"].values() if headline in s and "R@1" in ks]
    if headline_r1:
        lines.append(f"- mean R@1 ({headline}, over directions): {np.mean(headline_r1):.2f}")
    for direction, sizes in metrics.get("gallery", {}).items():
        lines.append(
            f"- {direction}: {int(sizes['queries']):,} queries × {int(sizes['gallery']):,} gallery items"
        )
    if metrics.get("latency_ms") is not None:
        lines.append(f"- query latency: {float(metrics['latency_ms']):.3f} ms")
    if isinstance(metrics.get("provenance"), dict):
        lines.extend(_provenance_lines(metrics["provenance"]))
    return lines


def _provenance_lines(p: dict[str, Any]) -> list[str]:
    lines = [f"- dataset {p.get('dataset')}, seed {p.get('seed')}, config sha256 {p.get('config_sha256')}"]
    if p.get("code"):
        lines.append(f"- trained by m3jepa {code_label(p['code'])} at {p.get('trained_at')} "
                     f"({float(p.get('training_seconds') or 0):.1f} s of training); evaluated at "
                     f"{p.get('evaluated_at')}")
    return lines


def code_label(code: dict[str, Any]) -> str:
    """'<commit>' (+ ' (dirty)'), or 'version <v>' when the source was not a git checkout."""
    if code.get("commit"):
        return code["commit"] + (" (dirty)" if code.get("dirty") else "")
    return f"version {code.get('version')}"


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with dotted keys ({"val": {"a->b": {"R@1": 1}}} -> {"val.a->b.R@1": 1});
    the CSV columns, TensorBoard tags and the config keys `m3jepa compare` lists."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def run_provenance(run_dir: str | Path) -> dict[str, Any]:
    """What metrics.json records about the run it scores: dataset, seed, the sha256 of its saved
    config.toml, the stores it recorded (stores.json), the code and times of training, and now."""
    from m3jepa.core import provenance, runstores

    run_dir = Path(run_dir)
    from m3jepa.core.layout import RunDir

    path = RunDir(run_dir).config
    text = path.read_bytes() if path.is_file() else None  # None: a run dir someone took config.toml from
    cfg = tomllib.loads(text.decode("utf-8")) if text is not None else {}
    out: dict[str, Any] = {
        "dataset": cfg.get("encode", {}).get("dataset"),
        "seed": cfg.get("train", {}).get("seed"),
        "config_sha256": hashlib.sha256(text).hexdigest() if text is not None else None,
        "stores": _stores(runstores.read_record(run_dir)),
        "evaluated_at": provenance.now_iso(),
    }
    out.update(provenance.summary(run_dir) or {"code": None, "trained_at": None, "training_seconds": None})
    return out


def _stores(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """stores.json per split and modality: the store's path, encoder, revision and manifest identity."""
    if record is None:
        return None
    return {
        split: {
            modality: {
                "store": entry["store"],
                "encoder": entry["identity"].get("encoder"),
                "revision": entry["identity"].get("encoder_revision"),
                "identity": entry["identity"],
            }
            for modality, entry in rec.get("stores", {}).items()
        }
        for split, rec in record["splits"].items()
    }


def write_metrics(run_dir: str | Path, metrics: dict[str, Any], *, stem: str = "metrics") -> MetricsFiles:
    """Write `<stem>.json` (sorted keys) and `<stem>.md` into `run_dir`, each atomically."""
    run_dir = Path(run_dir)
    if not stem or "/" in stem or stem.startswith("."):
        raise ValueError(f"stem={stem!r} must be a plain file name stem such as 'metrics-val-paired'")
    table = metrics_table(metrics)  # validates before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    files = MetricsFiles(json=run_dir / f"{stem}.json", markdown=run_dir / f"{stem}.md")
    _atomic_write(files.json, json.dumps(metrics, sort_keys=True, indent=2, default=_json_default) + "\n")
    _atomic_write(files.markdown, table)
    return files


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays appear naturally in metrics; JSON has no such types.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON serialisable: {value!r}")


def _atomic_write(path: Path, text: str) -> None:
    # A reader (or a crash) never sees half a file: write beside it, then rename over it.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
