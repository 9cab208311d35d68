"""Run identity (issue 21 item 2, issue 22): a changed config never continues a run, speed-only settings
never block one, a copied pipeline gets its own run, a finished run says so; the guarantees behind the
speed-only list are checked by training."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from synthetic_stores import make_stores, overrides

from m3jepa.config import load_pipeline
from m3jepa.core.checkpoint import SPEED_ONLY, CheckpointError, check_same_run, run_differences
from m3jepa.pipelines import copy, renamed, shipped_file
from m3jepa.runner import check_existing_run
from m3jepa.train.loop import train


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    return make_stores(tmp_path_factory.mktemp("stores"), n_train=128, n_val=32, n_test=32)


def _cfg(stores: Path, run: Path, **extra):
    return load_pipeline(None, overrides(stores, run, **{"train.max_steps": 20, **extra}))


def _weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))


def test_speed_only_keys_are_ignored_and_the_rest_compared(tmp_path) -> None:
    tux = shipped_file("tuxpaint")
    base = load_pipeline(tux)
    speed = load_pipeline(tux, ["train.num_threads=1", "train.feed=\"store\"", "train.log_every=3",
                                       "train.checkpoint_every=7", "train.tensorboard=\"off\"",
                                       "runtime.device=\"cpu\"", "encode.workers=1", "encode.threads=1",
                                       "encode.splits=[\"train\"]", "encode.batch_size=8"])
    assert run_differences(speed, base) == []
    changed = load_pipeline(tux, ["loss.temperature=0.05", "lora.r=8"])
    assert run_differences(changed, base) == ["loss.temperature: 0.05 != 0.03", "lora.r: 8 != 4"]
    with pytest.raises(CheckpointError) as e:
        check_same_run(changed, base, tmp_path / "runs" / "tuxpaint")
    message = str(e.value)
    # one line: what differs, that it is never resumed, and options that exist (run and train-predictor)
    assert "\n" not in message and "loss.temperature: 0.05 != 0.03" in message
    assert "--run NEW_FOLDER" in message and "delete" in message
    assert all(k.split(".")[0] in ("train", "runtime", "encode") for k in SPEED_ONLY)


def test_speed_only_settings_compute_the_same_weights(stores, tmp_path) -> None:
    """The guarantee behind SPEED_ONLY: feed, log/checkpoint cadence and TensorBoard give bit-identical
    weights; a thread count only changes the order of float sums (equal to rounding)."""
    plain = tmp_path / "plain"
    train(_cfg(stores, plain, **{"train.tensorboard": "off"}))
    other = tmp_path / "other"
    train(_cfg(stores, other, **{"train.feed": "store", "train.log_every": 3, "train.checkpoint_every": 7,
                                 "train.tensorboard": "auto"}))
    a, b = _weights(plain), _weights(other)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    threads = tmp_path / "threads"
    train(_cfg(stores, threads, **{"train.num_threads": 2, "train.tensorboard": "off"}))
    c = _weights(threads)
    worst = max(float(np.abs(a[k] - c[k]).max() / (np.abs(a[k]).max() + 1e-12)) for k in a)
    assert worst < 1e-4, worst  # measured: 1 ulp (1.2e-7) after 30 steps


def test_speed_only_change_continues_and_a_finished_run_says_so(stores, tmp_path, caplog) -> None:
    run = tmp_path / "run"
    first = train(_cfg(stores, run, **{"train.max_steps": 10}))
    assert first.steps == 10 and not first.already_finished
    # a longer budget is another run; more threads are not
    with pytest.raises(CheckpointError, match="train.max_steps: 12 != 10"):
        train(_cfg(stores, run, **{"train.max_steps": 12}), resume=True)
    with caplog.at_level(logging.INFO):
        again = train(_cfg(stores, run, **{"train.max_steps": 10, "train.num_threads": 2}), resume=True)
    assert again.already_finished and again.steps == 10
    assert again.summary().startswith(f"run {run} was already finished (10 steps); nothing to train")
    assert "samples/s" not in again.summary()
    # `m3jepa run`'s check, before it encodes anything: continue this config, refuse another
    assert check_existing_run(_cfg(stores, run, **{"train.max_steps": 10, "train.feed": "store"}), run)
    assert not check_existing_run(_cfg(stores, tmp_path / "new"), tmp_path / "new")
    with pytest.raises(CheckpointError, match="model.top_k"):
        check_existing_run(_cfg(stores, run, **{"train.max_steps": 10, "model.top_k": 1}), run)


def test_a_copied_pipeline_is_named_after_its_file(tmp_path) -> None:
    path = copy("tuxpaint", tmp_path / "my.toml")
    cfg = load_pipeline(path)
    assert cfg.name == "my" and cfg.model == load_pipeline(shipped_file("tuxpaint")).model  # name alone
    lines = path.read_text().splitlines()
    assert lines[0] == f"# m3jepa run {path}"
    assert lines[1:] == [
        ('name = "my"' if ln.startswith("name = ") else ln) for ln in shipped_file("tuxpaint").read_text(
        ).splitlines()[1:]
    ]
    # a header with arguments keeps them
    assert renamed('# m3jepa run coco --set a=1\nname = "coco"\n', "c2", "c2.toml").startswith(
        '# m3jepa run c2.toml --set a=1\nname = "c2"')
    with pytest.raises(ValueError, match="cannot name a run folder"):
        copy("tuxpaint", tmp_path / "a b.toml")


def test_seeds_get_one_folder_each() -> None:
    from m3jepa.runner import resolve_paths, seed_configs

    cfg = load_pipeline(shipped_file("tuxpaint"))
    out = seed_configs(cfg, [0, 2])
    got = [(c.run_dir, c.train.seed) for c in out]
    assert got == [("runs/tuxpaint-seed0", 0), ("runs/tuxpaint-seed2", 2)]
    assert resolve_paths(out[1], Path("/w")).run_dir == "/w/runs/tuxpaint-seed2"  # --workdir anchors them
    assert seed_configs(cfg, None) == [cfg]
