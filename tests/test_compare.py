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
    # a and c share a config: one column (c unevaluated adds nothing to the test recalls)
    first, second = result["groups"]
    assert first["runs"] == [str(runs["a"]), str(runs["c"])] and first["evaluated"] == 1
    table = markdown(result)
    r = a["recalls"]["text->image"]["R@1"]
    assert f"| test text->image R@1 | {r:.2f} | " in table  # one evaluated run: no ± std
    assert "| model.top_k | 2 | 1 |" in table and "| train.schedule | alternate | joint |" in table
    assert "| runs | 2 (seeds 0, 0) | 1 (seed 0) |" in table
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
    done = subprocess.run([*cmd, str(runs["a"]), str(runs["c"]), "--json", "--plot", "none"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(json.dumps(compare_runs([runs["a"], runs["c"]])))
    bad = subprocess.run([*cmd, str(runs["a"]), str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a run directory: it has no config.toml (train-predictor writes one)"]


# ---------------------------------------------------------------- seeds and noise (issue 21 item 5)


def _fake_run(root: Path, name: str, seed: int, recalls: dict[str, float], sets: list[str]) -> Path:
    """A run folder with a config and metrics whose numbers are chosen: a known answer for compare."""
    from m3jepa.config import dump_toml

    run = root / name
    run.mkdir(parents=True)
    cfg = load_pipeline(None, [f"train.seed={seed}", f'name="{name}"', *sets])
    (run / "config.toml").write_text(dump_toml(cfg))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 100, "mean_r1": 10.0 + seed}) + "\n")
    metrics = {"directions": {d: {"R@1": v, "R@5": 50.0, "R@10": 60.0} for d, v in recalls.items()},
               "headline_space": "cl", "gallery": {"image->text": {"queries": 79, "gallery": 158},
                                                   "text->image": {"queries": 158, "gallery": 79}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_compare_pools_seeds_and_marks_what_beats_the_noise(tmp_path):
    # recipe A: image->text 20/22/24 (22 ± 2), text->image 10/14/12 (12 ± 2)
    # recipe B: image->text 30/31/32 (31 ± 1): +9 > 2, beyond the spread; text->image 13/12/14 (13 ± 1):
    # +1 < 2, noise. B's configs spell defaults differently (splits, threads): no row for those.
    a = [_fake_run(tmp_path, f"a-seed{s}", s, {"image->text": 20 + 2 * s, "text->image": [10, 14, 12][s]},
                   []) for s in range(3)]
    b_sets = ["loss.temperature=0.07", 'encode.splits=["train", "val", "test"]', "train.num_threads=1"]
    b = [_fake_run(tmp_path, f"b-seed{s}", s, {"image->text": 30 + s, "text->image": [13, 12, 14][s]},
                   b_sets) for s in range(3)]
    result = compare_runs(a + b)
    assert result["differing_keys"] == ["loss.temperature"]  # not name, seed, splits or threads
    ga, gb = result["groups"]
    assert (ga["label"], gb["label"], ga["seeds"], gb["seeds"]) == ("a", "b", [0, 1, 2], [0, 1, 2])
    assert ga["metrics"]["image->text R@1"]["mean"] == pytest.approx(22.0)
    assert ga["metrics"]["image->text R@1"]["std"] == pytest.approx(2.0)
    assert gb["vs_first"]["image->text R@1"] == {"diff": pytest.approx(9.0), "spread": pytest.approx(2.0),
                                                 "beyond_spread": True}
    assert gb["vs_first"]["text->image R@1"]["beyond_spread"] is False
    assert gb["vs_first"]["mean R@1"]["diff"] == pytest.approx(5.0)  # (31 + 13) / 2 − (22 + 12) / 2
    assert ga["chance"] == {"image->text": pytest.approx(100 / 79), "text->image": pytest.approx(100 / 79)}
    table = markdown(result)
    assert "| test image->text R@1 | 22.00 ± 2.00 | 31.00 ± 1.00 (**+9.00**) |" in table
    assert "| test text->image R@1 | 12.00 ± 2.00 | 13.00 ± 1.00 (+1.00 ≈) |" in table
    assert "| test mean R@1 | 17.00 ± 1.73 | 22.00 ± 0.87 (**+5.00**) |" in table  # per-run means first
    assert "| chance R@1 (test) | image->text 1.27, text->image 1.27 |" in table
    assert "| name |" not in table and "encode.splits" not in table and "num_threads" not in table
    from m3jepa.eval.compare import plot_groups

    png = plot_groups(result, tmp_path / "compare.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_seeds_train_one_folder_each_and_compare_says_which_recipe_wins(runs, tmp_path):
    """Real tiny runs through the CLI: --seeds 0,1,2 of two recipes, then compare (the plot included)."""
    stores = runs["a"].parent / "stores"
    cmd = [sys.executable, "-m", "m3jepa"]
    for name, extra in (("fast", {"train.lr": 3e-3}), ("slow", {"train.lr": 1e-5})):
        sets = overrides(stores, tmp_path / name, **{**SHORT, "train.max_steps": 10, **extra})
        args = [x for item in sets if not item.startswith("run_dir=") for x in ("--set", item)]
        done = subprocess.run([*cmd, "train-predictor", "--run", str(tmp_path / name), "--seeds", "0,1,2",
                               *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("trainable parameters") == 3
        for seed in range(3):
            run = tmp_path / f"{name}-seed{seed}"
            assert f"seed = {seed}" in (run / "config.toml").read_text()
            evaluate_run(run)
    dirs = [str(tmp_path / f"{n}-seed{s}") for n in ("fast", "slow") for s in range(3)]
    done = subprocess.run([*cmd, "compare", *dirs], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| train.lr | 0.003 | 1e-05 |" in done.stdout and "| runs | 3 (seeds 0, 1, 2) |" in done.stdout
    row = next(x for x in done.stdout.splitlines() if x.startswith("| test mean R@1 |"))
    assert "**-" in row, row  # lr 1e-5 for 10 steps barely moves: far beyond the seed spread, and lower
    png = tmp_path / "compare.png"  # the runs' common folder
    assert png.stat().st_size > 0 and f"plot: {png}" in done.stdout
    bad = subprocess.run([*cmd, "train-predictor", "--seeds", "0,x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--seeds '0,x' must be integers" in bad.stderr
