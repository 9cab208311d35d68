"""Runs and bad input on the training/evaluation side: damaged checkpoints, two writers of one run, stores
re-encoded under a run, evaluate from another directory, and config/CLI values out of range (issue #11)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic_stores import DATASET, make_split, make_stores, overrides

from m3jepa.config import load_pipeline
from m3jepa.core.checkpoint import CHECKSUMS
from m3jepa.store import store_path
from m3jepa.train.loop import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SMALL = {"train.max_steps": 10, "train.eval_every": 10, "train.checkpoint_every": 10}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    return make_stores(tmp_path_factory.mktemp("stores"))


@pytest.fixture(scope="module")
def base_run(stores, tmp_path_factory) -> Path:
    """A finished 10-step run (checkpoints best and latest), trained once for the module."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(load_pipeline(None, overrides(stores, run, **SMALL)))
    return run


def _m3jepa(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "m3jepa", *args], env=ENV, capture_output=True, text=True, cwd=cwd
    )


def _sets(stores: Path, run: Path, **extra) -> list[str]:
    out = []
    for s in overrides(stores, run, **{**SMALL, **extra}):
        out += ["--set", s]
    return out


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    """The CLI failed with exit status 2 and printed exactly one line: the error, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-2000:]
    return errors[0]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


# ---------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize(("name", "damage"), [("model.safetensors", _flip_byte), ("optimizer.pt", _truncate)])
def test_damaged_checkpoint_file_is_named_by_resume_evaluate_and_lora_export(
    stores, base_run, tmp_path, name, damage
):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    latest = run / "checkpoints" / "latest"
    assert set(json.loads((latest / CHECKSUMS).read_text())["sha256"]) == {
        "model.safetensors", "state.json", "config.toml", "optimizer.pt"
    }
    damage(latest / name)
    expect = f"checkpoint {latest}: {name} "
    resumed = _m3jepa("train-predictor", *_sets(stores, run), "--resume")
    assert expect in _one_error_line(resumed)
    evaluated = _m3jepa("evaluate", "--run", str(run), "--checkpoint", "latest")
    assert expect in _one_error_line(evaluated)
    out = str(tmp_path / "out")
    exported = _m3jepa("lora-export", "--run", str(run), "--out", out, "--checkpoint", "latest")
    assert expect in _one_error_line(exported)
    assert not (run / "metrics.json").exists() and not (tmp_path / "out").exists()


def test_checkpoint_without_checksums_loads_with_a_warning(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (run / "checkpoints" / "best" / CHECKSUMS).unlink()  # as written before checkpoints had checksums
    res = _m3jepa("evaluate", "--run", str(run), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"has no {CHECKSUMS}" in res.stderr
    assert json.loads(res.stdout)["gallery"]["image->text"] == {"queries": 48, "gallery": 96}


def test_a_file_added_to_a_checkpoint_is_named(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (run / "checkpoints" / "best" / "notes.txt").write_text("x")
    line = _one_error_line(_m3jepa("evaluate", "--run", str(run)))
    assert f"notes.txt is not listed in {CHECKSUMS}" in line


# ---------------------------------------------------------------- one writer per run directory


def test_second_train_process_on_a_run_fails_at_once_naming_the_holder(stores, tmp_path):
    run = tmp_path / "run"
    heavy = {"model.dim": 256, "model.hidden": 1024, "train.max_steps": 5000, "train.checkpoint_every": 5}
    first = subprocess.Popen(
        [sys.executable, "-m", "m3jepa", "train-predictor", *_sets(stores, run, **heavy)],
        env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        latest = run / "checkpoints" / "latest" / "state.json"
        deadline = time.time() + 120
        while not latest.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None and latest.exists(), "the first run did not start training"
        assert (run / ".lock").read_text().strip() == str(first.pid)
        began = time.time()
        second = _m3jepa("train-predictor", *_sets(stores, run, **heavy), "--resume")
        line = _one_error_line(second)
        assert f"run {run} is being written by process {first.pid}" in line
        assert time.time() - began < 60 and first.poll() is None  # it failed while the first still ran
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The killed holder's lock file stays behind with its dead pid; the OS freed the flock, so the next
    # writer gets in and fails only on what it was asked (a run exists: --resume), not on the lock.
    assert (run / ".lock").read_text().strip() == str(first.pid)
    again = _m3jepa("train-predictor", *_sets(stores, run, **heavy))
    assert "pass --resume" in _one_error_line(again)


# ---------------------------------------------------------------- the stores a run names


def test_evaluate_from_another_directory_reads_the_runs_stores(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    make_stores(work / "stores", n_train=64, n_val=24, n_test=24)
    elsewhere.mkdir()
    monkeypatch.chdir(work)  # train with a relative encode.store_root, as `m3jepa run` in a folder does
    sets = overrides(Path("stores"), Path("run"), **SMALL)
    train(load_pipeline(None, sets))
    record = json.loads((work / "run" / "stores.json").read_text())
    assert record["store_root"] == str((work / "stores").resolve())
    assert record["splits"]["test"]["read"] is False and record["splits"]["train"]["read"] is True
    res = _m3jepa("evaluate", "--run", str(work / "run"), "--json", cwd=elsewhere)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["gallery"]["image->text"] == {"queries": 24, "gallery": 48}


def _re_encode(root, split: str, groups: int) -> None:
    """What `m3jepa encode --split SPLIT --limit GROUPS` leaves once the old stores are gone: other rows."""
    for modality, encoder in (("image", "syn-image"), ("text", "syn-text")):
        shutil.rmtree(store_path(root, DATASET, split, modality, encoder))
    make_split(root, split, groups)


def test_evaluate_after_the_test_split_is_re_encoded_names_the_store(tmp_path):
    root = make_stores(tmp_path / "stores", n_train=64, n_val=24, n_test=24)
    run = tmp_path / "run"
    train(load_pipeline(None, overrides(root, run, **SMALL)))
    _re_encode(root, "test", 16)
    line = _one_error_line(_m3jepa("evaluate", "--run", str(run)))
    image_store = store_path(root, DATASET, "test", "image", "syn-image").resolve()
    assert f"the test image store {image_store} is not the one run {run} recorded" in line
    assert "rows 24 != 16" in line and "membership" in line
    assert not (run / "metrics.json").exists()


def test_resume_on_re_encoded_train_stores_is_refused(tmp_path):
    root = make_stores(tmp_path / "stores", n_train=64, n_val=24, n_test=24)
    run = tmp_path / "run"
    train(load_pipeline(None, overrides(root, run, **SMALL)))
    _re_encode(root, "train", 48)
    line = _one_error_line(_m3jepa("train-predictor", *_sets(root, run), "--resume"))
    assert "--resume: the train image store" in line and "rows 64 != 48" in line


# ---------------------------------------------------------------- bad config and CLI values


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.num_threads=-1", "train.num_threads=-1 must be positive"),
        ("train.num_threads=0", "train.num_threads=0 must be positive"),
        ("model.dim=1000000000", "give at least 2.49e+13 predictor parameters, over the limit of 1e+10"),
        ("train.max_steps=0", "train.max_steps=0 must be positive"),
        ("train.max_steps=-3", "train.max_steps=-3 must be positive"),
        ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be a finite number >= 0"),
        ("train.grad_clip=-1.0", "train.grad_clip=-1.0 must be a finite number >= 0"),
        ("train.patience=-1", "train.patience=-1 must be a finite number >= 0"),
        ('train.directions=["image->text","text->image","image->text"]', "lists image->text more than once"),
        ("train.lr=inf", "train.lr=inf must be a finite number > 0"),
        ("train.lr=nan", "train.lr=nan must be a finite number > 0"),
        ("train.lr=0", "train.lr=0.0 must be a finite number > 0"),
        ("train.lr=-1e-3", "train.lr=-0.001 must be a finite number > 0"),
    ],
)
def test_out_of_range_config_is_one_line(tmp_path, setting, message):
    res = _m3jepa("train-predictor", "--run", str(tmp_path / "run"), "--set", setting)
    assert message in _one_error_line(res)
    assert not (tmp_path / "run").exists()


def test_batch_larger_than_the_training_pairs_is_refused_at_start(stores, tmp_path):
    res = _m3jepa("train-predictor", *_sets(stores, tmp_path / "run", **{"train.batch_size": 1024}))
    line = _one_error_line(res)
    assert "train.batch_size=1024 is larger than the 512 image->text pairs of split 'train'" in line
    assert "set train.batch_size <= 512" in line
    assert not (tmp_path / "run").exists()


def test_evaluate_protocol_goes_through_the_config_check(base_run):
    line = _one_error_line(_m3jepa("evaluate", "--run", str(base_run), "--protocol", "pared"))
    assert "eval.protocol='pared' is not one of multi, paired" in line
    assert not list(base_run.glob("metrics-*")) and not (base_run / "metrics.json").exists()
    line = _one_error_line(_m3jepa("evaluate", "--run", str(base_run), "--checkpoint", "bset"))
    assert "--checkpoint 'bset' is not one of best, latest" in line
