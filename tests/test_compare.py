"""`m3jepa compare` on two tiny runs, and the provenance evaluate records in metrics.json."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_stores import DATASET, make_stores, overrides

from m3jepa.config import load_pipeline
from m3jepa.eval.compare import compare_runs, markdown
from m3jepa.eval.evaluate import evaluate_run
from m3jepa.train.loop import train

SHORT = {"train.max_steps": 20, "train.log_every": 5, "train.eval_every": 10, "train.checkpoint_every": 10,
         "train.tensorboard": "off"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    stores = make_stores(root / "stores", n_train=128, n_val=32, n_test=32)
    out = {}
    for name, extra in {"a": {}, "b": {"model.top_k": 1, "train.schedule": "joint"}, "c": {}}.items():
        out[name] = root / name
        train(load_pipeline(None, overrides(stores, out[name], **{**SHORT, **extra})))
    evaluate_run(out["a"])
    evaluate_run(out["b"])  # c stays unevaluated
    return out


def test_metrics_json_records_the_provenance(runs):
    metrics = json.loads((runs["a"] / "metrics.json").read_text())
    p = metrics["provenance"]
    assert p["config_sha256"] == hashlib.sha256((runs["a"] / "config.toml").read_bytes()).hexdigest()
    assert (p["dataset"], p["seed"], p["sessions"], p["unfinished_sessions"]) == (DATASET, 0, 1, 0)
    code = p["code"]
    assert re.fullmatch(r"[0-9a-f]{40}", code["commit"] or "") or (code["commit"] is None and code["version"])
    session = json.loads((runs["a"] / "provenance.json").read_text())["sessions"][0]
    assert p["training_seconds"] == session["seconds"] > 0 and p["trained_at"] == session["ended_at"]
    assert p["evaluated_at"] >= p["trained_at"]  # ISO 8601 UTC strings sort by time
    stores = json.loads((runs["a"] / "stores.json").read_text())["splits"]
    for split in ("train", "test"):
        for modality in ("image", "text"):
            got, want = p["stores"][split][modality], stores[split]["stores"][modality]
            assert (got["store"], got["identity"]) == (want["store"], want["identity"])
            assert (got["encoder"], got["revision"]) == (f"syn-{modality}", "r1")


def test_compare_lists_the_differing_keys_and_each_runs_recalls(runs):
    result = compare_runs([runs["a"], runs["b"], runs["c"]])
    assert result["differing_keys"] == ["model.top_k", "train.schedule"]
    a, b, c = result["runs"]
    assert (a["config"], b["config"]) == ({"model.top_k": 2, "train.schedule": "alternate"},
                                         {"model.top_k": 1, "train.schedule": "joint"})
    for row, name in ((a, "a"), (b, "b")):
        metrics = json.loads((runs[name] / "metrics.json").read_text())
        assert row["evaluated"] and row["recalls"] == metrics["directions"]
        val = [json.loads(x) for x in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        assert row["best_val_mean_r1"] == max(r["mean_r1"] for r in val if "mean_r1" in r)
        assert row["steps"] == 20 and row["dataset"] == DATASET
    assert not c["evaluated"] and c["evaluate_command"] == f"m3jepa evaluate --run {runs['c']}"
    table = markdown(result)
    r = a["recalls"]["text->image"]
    cells = f"{r['R@1']:.2f} / {r['R@5']:.2f} / {r['R@10']:.2f}"
    assert f"| test text->image R@1 / R@5 / R@10 | {cells} |" in table
    assert "| model.top_k | 2 | 1 | 2 |" in table
    assert "| train.schedule | alternate | joint | alternate |" in table
    assert table.count("not evaluated |") == 2  # run c's two recall cells
    assert f"- {runs['c']}: not evaluated on test; run `m3jepa evaluate --run {runs['c']}`" in table


def test_compare_shows_routing_and_r2_when_metrics_has_them(runs, tmp_path):
    metrics = json.loads((runs["a"] / "metrics.json").read_text())
    cl = {"entropy": 0.8125, "share": {"e0": 0.5}, "collapsed": False}
    metrics["routing"] = {"image->text": {"cl": cl}}
    metrics["r2"] = {"image->text": 0.25}
    run = tmp_path / "a2"
    run.mkdir()
    (run / "config.toml").write_bytes((runs["a"] / "config.toml").read_bytes())
    (run / "metrics.json").write_text(json.dumps(metrics))
    row = compare_runs([run])["runs"][0]
    assert row["extra"] == {"routing.image->text.cl.entropy": 0.8125,
                            "routing.image->text.cl.collapsed": False, "r2.image->text": 0.25}
    assert "| routing.image->text.cl.entropy | 0.8125 |" in markdown(compare_runs([run]))


def test_compare_cli_json_and_one_line_errors(runs, tmp_path):
    cmd = [sys.executable, "-m", "m3jepa", "compare"]
    done = subprocess.run([*cmd, str(runs["a"]), str(runs["c"]), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(json.dumps(compare_runs([runs["a"], runs["c"]])))
    bad = subprocess.run([*cmd, str(runs["a"]), str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a run directory: it has no config.toml (train-predictor writes one)"]
