"""scripts/results.py: the docs/results.md tables are computed right from the runs' metrics.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import results  # noqa: E402


def _write(run: Path, r1: dict[str, float], entropy: list[float] | None, r2: dict[str, float] | None) -> None:
    run.mkdir(parents=True)
    routing = None
    if entropy is not None:
        gates = ("cl", "pred")
        routing = {"image->text": {g: {"entropy": e} for g, e in zip(gates, entropy[:2], strict=True)},
                   "text->image": {g: {"entropy": e} for g, e in zip(gates, entropy[2:], strict=True)}}
    m = {"directions": {d: {"R@1": v, "R@5": 0.0} for d, v in r1.items()}, "routing": routing, "r2": r2,
         "step": 10, "gallery": {"image->text": 79}}
    (run / "metrics.json").write_text(json.dumps(m))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for s in range(3):
        _write(tmp_path / "runs" / f"recipe-seed{s}", {"image->text": 20 + s, "text->image": 30 - 2 * s},
               [0.9, 0.6 + 0.1 * s, 0.8, 0.7], {"image->text": -1.0 + s, "text->image": 0.1})
        _write(tmp_path / "runs" / f"linear-seed{s}",
               {"image->text": float(rng.uniform(10, 20)), "text->image": 15.0}, None, None)
    return tmp_path


def test_table_is_mean_and_sample_std_over_seeds(workdir: Path) -> None:
    got = results.collect(workdir, ["recipe", "linear"], [0, 1, 2])
    assert [r["seed"] for r in got["recipe"]] == [0, 1, 2]
    lines = results.table(got).splitlines()
    recipe = lines[2].split(" | ")
    mean = np.mean([(20 + s + 30 - 2 * s) / 2 for s in range(3)])
    std = np.std([(20 + s + 30 - 2 * s) / 2 for s in range(3)], ddof=1)
    assert recipe[2] == f"{21.0:.1f} ± {1.0:.1f}"  # image->text 20, 21, 22
    assert recipe[4] == f"{mean:.1f} ± {std:.1f}"
    lowest = [0.6, 0.7, 0.7]  # each seed's lowest gate entropy
    assert recipe[5] == f"{np.mean(lowest):.2f} ± {np.std(lowest, ddof=1):.2f}"
    assert recipe[6] == "0.00 ± 1.00"  # R² image->text: -1, 0, 1
    linear = lines[3].split(" | ")
    assert linear[5] == "" and linear[6] == ""  # no router, no prediction head: empty cells


def test_verdict_compares_the_gap_with_the_larger_std(workdir: Path) -> None:
    got = results.collect(workdir, ["recipe", "linear"], [0, 1, 2])
    a = np.array([r["mean_r1"] for r in got["recipe"]])
    b = np.array([r["mean_r1"] for r in got["linear"]])
    text = results.verdict(got)
    assert f"{a.mean() - b.mean():+.1f} points" in text
    assert f"larger std {max(a.std(ddof=1), b.std(ddof=1)):.1f}" in text
    assert ("met" if a.mean() - b.mean() > max(a.std(ddof=1), b.std(ddof=1)) else "NOT met") in text


def test_missing_runs_are_said_not_invented(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    got = results.collect(workdir, ["recipe", "mlp"], [0, 1, 2, 3])
    assert len(got["recipe"]) == 3 and "mlp" not in got
    assert "recipe-seed3 (not run yet)" in capsys.readouterr().out
