"""runtime.compile: the compiled training step trains as the eager one does, and refuses what it cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import torchrun
from safetensors.numpy import load_file
from synthetic_stores import make_stores, overrides

from m3jepa.config import ConfigError, RuntimeConfig, load_pipeline
from m3jepa.core.device import resolve
from m3jepa.train.loop import train


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    return make_stores(tmp_path_factory.mktemp("stores"), n_train=128)


def _sets(stores: Path, run: Path, **extra) -> list[str]:
    # one direction: each compiles on its first step (a cold compile takes a minute on 2 cores)
    sets = {"train.max_steps": 8, "train.eval_every": 8, "train.checkpoint_every": 8, "model.dropout": 0.0,
            "train.directions": ["text->image"], **extra}
    return overrides(stores, run, **sets)


def _weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))


def _train(stores: Path, run: Path, **extra) -> dict[str, np.ndarray]:
    train(load_pipeline(None, _sets(stores, run, **extra)))
    return _weights(run)


def _assert_near(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        # inductor fuses and reorders float32 reductions: close, not bit-equal. A near-tie in the top-k
        # routing can go the other way, which moves a gate weight by a fraction of one AdamW step
        # (lr 3e-3; measured 2.4e-4 on one of 256 weights), so the bound is a sixth of a step
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=5e-4, err_msg=k)


def test_compiled_step_trains_as_the_eager_step(stores, tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _train(stores, tmp_path / "eager")
    compiled = _train(stores, tmp_path / "compiled", **{"runtime.compile": "default"})
    # the direction's step was compiled, so the setting did something
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    _assert_near(compiled, eager)
    logs = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("eager", "compiled")]
    losses = [[json.loads(x)["loss"] for x in log if "loss" in json.loads(x)] for log in logs]
    assert len(losses[0]) >= 2
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)



@pytest.mark.slow
def test_compiled_step_under_torchrun_trains_as_one_eager_process(stores, tmp_path):
    """Two gloo ranks, each compiling its step (the negatives' all-gather inside it breaks the graph
    there), against one eager process: DDP's tolerance (docs/training.md) is far inside compile's."""
    eager = _train(stores, tmp_path / "one")
    sets = _sets(stores, tmp_path / "two", **{"runtime.compile": "default"})
    done = torchrun("-m", "m3jepa", "train-predictor", *[a for s in sets for a in ("--set", s)], timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("runtime.compile = default") == 2  # each rank compiled its own step
    _assert_near(_weights(tmp_path / "two"), eager)


@pytest.mark.parametrize(
    ("sets", "names"),
    [
        ({"compile": "reduce-overhead", "device": "cpu"}, "CUDA graphs"),
        ({"compile": "default", "device": "cpu", "precision": "bf16"}, "CPU fast path"),
    ],
)
def test_what_a_cpu_cannot_compile_is_refused(sets, names):
    with pytest.raises(ConfigError, match=names):
        resolve(RuntimeConfig(**sets))


def test_compile_modes_are_checked_and_lora_refuses_it(tmp_path):
    with pytest.raises(ConfigError, match="runtime.compile"):
        RuntimeConfig(compile="fast")
    lora = {"lora.enabled": True, "encode.kind": "prefix", "encode.tunable_layers": 3,
            "runtime.compile": "default"}
    with pytest.raises(ConfigError, match="LoRA"):
        load_pipeline(None, overrides(tmp_path, tmp_path / "run", **lora))
    assert resolve(RuntimeConfig(compile="default", device="cpu")).compile == "default"
