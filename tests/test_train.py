"""Stages 2 and 3 on synthetic stores with a known answer: learning, evaluation, resume, DDP, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from synthetic_stores import DATASET, make_label_split, make_split, make_stores, overrides, write_store

from m3jepa.config import load_pipeline
from m3jepa.core.checkpoint import CheckpointError
from m3jepa.core.errors import StoreDataError
from m3jepa.data.records import Record
from m3jepa.eval.evaluate import evaluate_run
from m3jepa.store import StoreError, store_path
from m3jepa.train.loop import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    return make_stores(tmp_path_factory.mktemp("stores"))


def _cfg(stores: Path, run: Path, **extra):
    return load_pipeline(None, overrides(stores, run, **extra))


def test_training_learns_and_evaluate_scores_it(stores, tmp_path):
    result = train(_cfg(stores, tmp_path / "run"))
    assert result.steps == 60 and result.best_metric > 30.0  # chance R@1 is 1/48 ≈ 2%
    metrics = evaluate_run(tmp_path / "run").to_json()
    assert set(metrics["directions"]) == {"image->text", "text->image"}
    for d in metrics["spaces"].values():
        assert set(d) == {"pred", "cl"} and 0 <= d["cl"]["R@1"] <= d["cl"]["R@5"] <= d["cl"]["R@10"] <= 100
    assert metrics["directions"]["text->image"] == metrics["spaces"]["text->image"]["cl"]  # the headline
    assert metrics["directions"]["text->image"]["R@1"] > 25.0
    # multi-caption protocol: 48 images, 2 captions each
    assert metrics["gallery"]["image->text"] == {"queries": 48, "gallery": 96}
    assert metrics["gallery"]["text->image"] == {"queries": 96, "gallery": 48}
    run = tmp_path / "run"
    for name in (
        "config.toml",
        "metrics.jsonl",
        "metrics.json",
        "metrics.md",
        "training_curves.png",
        "similarity_test.png",
        "checkpoints/best/model.safetensors",
        "checkpoints/latest/optimizer.pt",
    ):
        assert (run / name).exists(), name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val" in x] == [20, 40, 60]
    # AGD: the line logged after step index 4 (even) trained image->text, after index 9 (odd) text->image
    assert [x["direction"] for x in lines if "direction" in x][:2] == ["image->text", "text->image"]
    paired = evaluate_run(run, protocol="paired").to_json()
    assert paired["gallery"]["image->text"] == {"queries": 48, "gallery": 48}


@pytest.mark.parametrize(
    "variant",
    [
        {"model.predictor": "mlp"},
        {"model.predictor": "linear"},
        {"train.schedule": "joint"},
        {"model.gates": "shared", "loss.pred": "smooth_l1", "loss.learn_temperature": True},
        {"train.schedule": "dynamic"},
        {"runtime.precision": "bf16"},
    ],
)
def test_ablations_and_baselines_train(stores, tmp_path, variant):
    result = train(_cfg(stores, tmp_path / "run", **variant, **{"train.max_steps": 40}))
    assert result.steps == 40 and result.best_metric > 10.0  # well above the 2% chance level
    assert evaluate_run(tmp_path / "run").to_json()["headline_space"] == "cl"


def test_existing_run_needs_resume_and_resume_needs_same_config(stores, tmp_path):
    run = tmp_path / "run"
    train(_cfg(stores, run, **{"train.max_steps": 10}))
    with pytest.raises(ValueError, match="--resume"):
        train(_cfg(stores, run, **{"train.max_steps": 10}))
    with pytest.raises(CheckpointError, match="model.top_k"):
        train(_cfg(stores, run, **{"train.max_steps": 10, "model.top_k": 1}), resume=True)
    with pytest.raises(ValueError, match="does not exist"):
        train(_cfg(stores, tmp_path / "fresh"), resume=True)


def test_missing_and_mismatched_stores_are_named(stores, tmp_path):
    with pytest.raises(StoreDataError, match="m3jepa encode"):
        train(_cfg(tmp_path / "nowhere", tmp_path / "run"))
    # a text store whose captions belong to other images than the image store's
    bad = tmp_path / "bad"
    make_split(bad, "train", 20)
    make_split(bad, "val", 8)
    shutil.rmtree(store_path(bad, DATASET, "val", "text", "syn-text"))
    recs = [Record(i, f"x{i}", f"other-{i}", "text", "c") for i in range(8)]
    write_store(bad, "val", "text", recs, np.ones((8, 32), np.float32))
    with pytest.raises(StoreDataError, match="different datasets or splits"):
        train(_cfg(bad, tmp_path / "run2"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "m3jepa", "train-predictor", *args]


def _sets(stores: Path, run: Path, **extra) -> list[str]:
    out = []
    for s in overrides(stores, run, **extra):
        out += ["--set", s]
    return out


@pytest.mark.slow
def test_resume_after_kill_is_bit_exact(stores, tmp_path):
    heavy = {"model.dim": 256, "model.hidden": 1024, "train.max_steps": 200, "train.checkpoint_every": 5}
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cli(*_sets(stores, ref, **heavy)), check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen(
        _cli(*_sets(stores, cut, **heavy)),
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = cut / "checkpoints" / "latest" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 30:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make it heavier"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 30 <= killed_at < 200
    done = subprocess.run(
        _cli(*_sets(stores, cut, **heavy), "--resume"), env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    a = load_file(str(ref / "checkpoints" / "latest" / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / "latest" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs after resume from step {killed_at}"
    ref_log = (ref / "metrics.jsonl").read_text().splitlines()
    cut_log = (cut / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in ref_log]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in cut_log]


def test_evaluate_cli_json(stores, tmp_path):
    run = tmp_path / "run"
    train(_cfg(stores, run, **{"train.max_steps": 10}))
    out = subprocess.run(
        [sys.executable, "-m", "m3jepa", "evaluate", "--run", str(run), "--json"],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    metrics = json.loads(out.stdout)
    assert metrics["split"] == "test" and set(metrics["directions"]) == {"image->text", "text->image"}
    assert metrics["latency_ms"] > 0 and metrics["gallery"]["text->image"]["gallery"] == 48
    assert DATASET in (run / "config.toml").read_text()


def test_label_directions_are_scored_as_classification(tmp_path):
    root = tmp_path / "stores"
    for split in ("train", "val", "test"):
        make_label_split(root, split)
    run = tmp_path / "run"
    directions = '["image->label", "label->image"]'
    cfg = load_pipeline(
        None,
        [
            *overrides(root, run),
            f"train.directions={directions}",
            'encode.label_encoder="syn-label"',
            "train.max_steps=40",
            "train.batch_size=20",
        ],
    )
    train(cfg)
    metrics = evaluate_run(run).to_json()
    cls = metrics["classification"]["image->label"]
    assert "label->image" not in metrics["classification"]  # only directions into labels classify
    assert cls["n_queries"] == 100 and len(cls["classes"]) == 5
    # top-1 accuracy is image->label R@1: the same nearest-class decision
    assert cls["accuracy"] == pytest.approx(metrics["directions"]["image->label"]["R@1"])
    assert cls["accuracy"] > 60.0  # chance is 20%
    assert "macro F1" in (run / "metrics.md").read_text()


def test_nan_features_and_an_empty_split_are_named(stores, tmp_path):
    import zarr

    bad = tmp_path / "bad"
    for split in ("train", "val", "test"):
        make_split(bad, split, 10)
    # The writer refuses NaN, so corrupt a finished shard behind its back, as a damaged disk would:
    # the shard's checksum catches it when the split is read into memory...
    path = store_path(bad, DATASET, "train", "image", "syn-image")
    shard = path / "shards" / "00000.zarr"
    feats = zarr.open_group(str(shard), mode="r+")["features"]
    feats[3, 0] = np.nan
    with pytest.raises(StoreError, match=r"sha256.*stores verify"):
        train(_cfg(bad, tmp_path / "run"))
    # ... and a NaN that came with a matching checksum (a faulty writer) is still named by its row
    from m3jepa.store.backends import checksum
    from m3jepa.store.manifest import load_manifest, save_manifest

    man = load_manifest(path)
    man.shards[0].sha256 = checksum({"features": feats[:]})[0]
    save_manifest(path, man)
    with pytest.raises(StoreDataError, match=r"NaN or infinite.*row 3"):
        train(_cfg(bad, tmp_path / "run"))

    empty = tmp_path / "empty"
    for split in ("train", "test"):
        make_split(empty, split, 10)
    write_store(empty, "val", "image", [], np.zeros((0, 48), np.float32))
    write_store(empty, "val", "text", [], np.zeros((0, 32), np.float32))
    # an empty val split is carved from train unless train.carve_val = 0 (tests/test_recipes.py)
    with pytest.raises(StoreDataError, match="empty"):
        train(_cfg(empty, tmp_path / "run2", **{"train.carve_val": 0.0}))
