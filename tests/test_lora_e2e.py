"""The LoRA mode end to end on real Tux Paint stamps with MiniLM: encode prefix stores, train, evaluate,
export; the parameter report, the saved adapters, and a resume that matches an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _m3jepa(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "m3jepa", *args], env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _sets(stores: Path, **extra) -> list[str]:
    base = {"encode.store_root": json.dumps(str(stores)), "train.max_steps": 8, "train.batch_size": 16,
            "train.eval_every": 4, "train.checkpoint_every": 4, "train.num_threads": 1, **extra}
    out = []
    for k, v in base.items():
        out += ["--set", f"{k}={v}"]
    return out


@pytest.fixture(scope="module")
def stores(lora_stores) -> Path:
    return lora_stores  # conftest.py: prefix stores of 40 groups per split, shared with tests/test_ddp.py


def test_lora_run_trains_adapters_evaluates_and_exports(stores, tmp_path):
    run = tmp_path / "run"
    pipe = str(ROOT / "pipelines" / "tuxpaint_lora.toml")
    _m3jepa("train-predictor", "--pipeline", pipe, "--run", str(run), *_sets(stores))
    report = json.loads((run / "trainable.json").read_text())
    lora = {n for n in report["parameters"] if n.startswith("encoders.")}
    assert lora == {
        f"encoders.text.peft.base_model.model.encoder.layer.{i}.attention.self.{m}.lora_{ab}.default.weight"
        for i in (3, 4, 5) for m in ("query", "value") for ab in "AB"
    }  # only the text tower: EfficientNet-Lite0 stays frozen
    assert report["parts"]["encoders.text"] == 12 * 4 * 384
    assert all(n.startswith(("predictor.", "encoders.text.")) for n in report["parameters"])
    best = run / "checkpoints" / "best"
    for name in ("adapters/text/adapter_config.json", "adapters/text/adapter_model.safetensors"):
        assert (best / name).is_file(), name
    weights = load_file(str(best / "model.safetensors"))
    assert not [k for k in weights if k.startswith("encoders.") and "lora_" not in k]  # no frozen weights
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_b) == 6 and any(np.abs(v).max() > 0 for v in lora_b)  # the adapters trained

    metrics = json.loads(_m3jepa("evaluate", "--run", str(run), "--json").stdout)
    assert metrics["lora"]["modalities"] == ["text"]
    r = metrics["directions"]["image->text"]
    assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100

    out = tmp_path / "export"
    _m3jepa("lora-export", "--run", str(run), "--out", str(out / "peft"))
    assert (out / "peft" / "text" / "adapter_model.safetensors").is_file()
    _m3jepa("lora-export", "--run", str(run), "--out", str(out / "merged"), "--merge")
    merged = load_file(str(out / "merged" / "text" / "model.safetensors"))
    assert {k.split(".")[2] for k in merged} == {"3", "4", "5"}  # encoder.layer.<i>.…: the tail only
    assert json.loads((out / "merged" / "text" / "export.json").read_text())["layer_index"] == 3


def test_lora_resume_matches_an_uninterrupted_run(stores, tmp_path):
    pipe = str(ROOT / "pipelines" / "tuxpaint_lora.toml")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _m3jepa("train-predictor", "--pipeline", pipe, "--run", str(ref), *_sets(stores))
    # the same run stopped after its step-4 checkpoint (a kill there loses nothing more), then resumed
    code = (
        "import sys\n"
        "from m3jepa.config import load_pipeline\n"
        "from m3jepa.train import loop\n"
        "real = loop._train_step\n"
        "def step(*a, **k):\n"
        "    if a[5] == 5:\n"
        "        raise SystemExit(3)\n"
        "    return real(*a, **k)\n"
        "loop._train_step = step\n"
        "sets = [s for s in sys.argv[2:] if s != '--set']\n"
        "loop.train(load_pipeline(sys.argv[1], sets))\n"
    )
    sets = _sets(stores) + ["--set", f"run_dir={json.dumps(str(cut))}"]
    res = subprocess.run([sys.executable, "-c", code, pipe, *sets], env=ENV, capture_output=True, text=True)
    assert res.returncode == 3, res.stderr[-3000:]
    assert json.loads((cut / "checkpoints" / "latest" / "state.json").read_text())["step"] == 4
    _m3jepa("train-predictor", "--pipeline", pipe, "--run", str(cut), "--resume", *_sets(stores))
    a = load_file(str(ref / "checkpoints" / "latest" / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / "latest" / "model.safetensors"))
    assert a.keys() == b.keys() and any("lora_" in k for k in a)
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs after resume"


def test_full_layer_lora_runs_every_layer_from_the_raw_data(tmp_path, tuxpaint_root):
    pooled = tmp_path / "stores"
    _m3jepa("encode", "--dataset", "tuxpaint", "--split", "train,val,test", "--modality", "image,text",
            "--limit", "24", "--store-root", str(pooled), "--workers", "0")
    run = tmp_path / "run"
    pipe = str(ROOT / "pipelines" / "tuxpaint_lora.toml")
    sets = _sets(pooled, **{"train.max_steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
                            "encode.kind": '"pooled"', "lora.layers": '"all"', "encode.limit": 24})
    _m3jepa("train-predictor", "--pipeline", pipe, "--run", str(run), *sets)
    names = json.loads((run / "trainable.json").read_text())["parameters"]
    layers = {n.split(".encoder.layer.")[1].split(".")[0] for n in names if n.startswith("encoders.text.")}
    assert layers == {"0", "1", "2", "3", "4", "5"}  # adapters on all six MiniLM layers
    metrics = json.loads(_m3jepa("evaluate", "--run", str(run), "--json").stdout)
    assert metrics["lora"]["modalities"] == ["text"]
