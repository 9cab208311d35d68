"""Shipped pipelines: resolved by name from any folder, listed, shown, copied, installed as package data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from m3jepa import cli
from m3jepa.config import ConfigError
from m3jepa.pipelines import SHIPPED_DIR, copy, renamed, resolve, shipped, summary

ROOT = Path(__file__).resolve().parents[1]


def _invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def test_the_repository_pipelines_folder_is_the_shipped_one():
    assert (ROOT / "pipelines").resolve() == SHIPPED_DIR
    assert "tuxpaint" in shipped()


def test_every_shipped_pipeline_has_a_one_line_description():
    assert [name for name, path in shipped().items() if not summary(path)] == []


def test_a_name_resolves_from_any_folder_and_a_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("tuxpaint") == SHIPPED_DIR / "tuxpaint.toml"
    assert resolve("tuxpaint.toml") == SHIPPED_DIR / "tuxpaint.toml"
    (tmp_path / "tuxpaint.toml").write_text("name = 'mine'\n")
    assert resolve("tuxpaint.toml") == Path("tuxpaint.toml")


def test_a_missing_pipeline_is_one_line_listing_the_shipped_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke("run", "pipelines/tuxpaint.toml")  # a path that is not here is not a name
    assert result.exit_code == 2
    assert result.output == (
        "error: pipeline pipelines/tuxpaint.toml is neither a file nor a shipped pipeline; pass a TOML file "
        f"or one of {', '.join(shipped())} (m3jepa pipelines list)\n"
    )


def test_show_prints_the_toml_and_copy_refuses_to_overwrite(tmp_path):
    text = (SHIPPED_DIR / "tuxpaint.toml").read_text()
    assert _invoke("pipelines", "show", "tuxpaint").output == text
    dest = tmp_path / "mine.toml"
    assert _invoke("pipelines", "copy", "tuxpaint", str(dest)).output == f"{dest}\n"
    copied = renamed(text, "mine", str(dest))  # the copy is its own run: runs/mine (test_run_identity.py)
    assert dest.read_text() == copied and 'name = "mine"' in copied
    dest.write_text("edited")
    refused = _invoke("pipelines", "copy", "tuxpaint", str(dest))
    assert refused.exit_code == 2
    assert refused.output == f"error: {dest} exists; pass --force to overwrite it\n"
    assert dest.read_text() == "edited"
    assert _invoke("pipelines", "copy", "tuxpaint", str(dest), "--force").exit_code == 0
    assert dest.read_text() == copied
    assert copy("tuxpaint", tmp_path) == tmp_path / "tuxpaint.toml"  # a folder gets NAME.toml


def test_an_unknown_name_for_show_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"no shipped pipeline 'nope'; shipped pipelines: .*tuxpaint"):
        copy("nope", "/tmp/never")
    assert _invoke("pipelines", "show", "nope").exit_code == 2


def test_every_pipeline_option_takes_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = cli._encode_config({"pipeline": "tuxpaint_audio", "split": "val", "skip_bad": True})
    assert (cfg.dataset, cfg.splits, cfg.modalities, cfg.skip_bad) == ("tuxpaint-audio", ["val"],
                                                                        ["audio", "text"], True)
    assert cli._pipeline("tuxpaint_lora", ["train.lr=1e-3"]).lora.enabled


def test_encode_defaults_are_encode_configs():
    from m3jepa.config import EncodeConfig

    assert cli._encode_config({}) == EncodeConfig()
    assert cli._encode_config({"store_root": "s", "force": False}).force is False


@pytest.mark.slow
def test_a_plain_install_holds_the_pipelines(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    installed = sorted(p.name for p in (target / "m3jepa" / "pipelines").glob("*.toml"))
    assert installed == sorted(p.name for p in SHIPPED_DIR.glob("*.toml"))
    code = "from m3jepa.pipelines import resolve; print(resolve('tuxpaint'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(target / "m3jepa" / "pipelines" / "tuxpaint.toml")


@pytest.mark.parametrize("paper", ["coco_dinov2_llama3", "flickr30k_dinov2_llama3"])
def test_the_gpu_recipe_is_the_papers_pipeline_at_the_gpu_batch(paper):
    """The *_gpu files change only what the GPU recipe re-tunes (docs/training.md, "The GPU recipe"):
    a drift in any other setting between the two files fails here."""
    import dataclasses

    from m3jepa.config import load_pipeline, to_dict

    base, gpu = (load_pipeline(shipped()[n]) for n in (paper, f"{paper}_gpu"))
    assert (gpu.train.batch_size, gpu.train.lr, gpu.runtime.device) == (4096, 1e-3, "cuda")
    assert (base.train.batch_size, base.train.lr) == (128, 1e-4)  # the paper's own stays as it was
    same = dataclasses.replace(
        gpu, name=base.name, train=dataclasses.replace(
            gpu.train, batch_size=128, lr=1e-4, eval_every=base.train.eval_every,
            checkpoint_every=base.train.checkpoint_every),
        runtime=dataclasses.replace(gpu.runtime, device=base.runtime.device))
    assert to_dict(same) == to_dict(base)
