"""Typed config: TOML pipelines, --set overrides, strict keys, round trips, every shipped pipeline loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from m3jepa.config import (
    ConfigError,
    PipelineConfig,
    apply_overrides,
    dump_toml,
    from_dict,
    load_pipeline,
    parse_override,
)

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "pipelines").glob("*.toml"))


def test_defaults_build():
    cfg = load_pipeline(None)
    assert cfg.train.directions == ["image->text", "text->image"]
    assert cfg.loss.pred == "mse" and cfg.model.gates == "multi"  # the paper's choices are the defaults


def test_overrides_are_typed():
    cfg = load_pipeline(
        None,
        ["train.lr=1e-3", "model.top_k=2", "runtime.precision=bf16", "name=x",
         "train.directions=image->text"],
    )
    assert cfg.train.lr == 1e-3 and cfg.model.top_k == 2 and cfg.name == "x"
    assert cfg.runtime.precision == "bf16"
    assert cfg.train.directions == ["image->text"]


def test_parse_override_falls_back_to_string():
    assert parse_override("encode.dataset=coco") == (["encode", "dataset"], "coco")
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("nokey")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.bogus=1", "unknown config key"),
        ("bogus.x=1", "unknown config key"),
        ("train.lr=fast", "must be a number"),
        ("train.epochs=1.5", "must be an integer"),
        ("model.top_k=13", "exceeds"),
        ("loss.pred=l1", "not one of"),
        ("train.schedule=sometimes", "not one of"),
        ("train.directions=imagetext", "source->target"),
        ("train.bf16=true", "runtime.precision"),
        ("encode.decode_priority=lazy", "not one of"),
    ],
)
def test_bad_config_is_an_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(None, [override])


def test_toml_round_trip(tmp_path):
    cfg = load_pipeline(None, ["train.max_steps=7", "encode.limit=3"])
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    assert load_pipeline(p) == cfg


def test_apply_overrides_does_not_mutate():
    base = {"train": {"lr": 1.0}}
    out = apply_overrides(base, ["train.lr=2.0"])
    assert base["train"]["lr"] == 1.0 and out["train"]["lr"] == 2.0


def test_from_dict_rejects_non_table():
    with pytest.raises(ConfigError, match="must be a table"):
        from_dict(PipelineConfig, {"train": 3})


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_pipeline(tmp_path / "nope.toml")


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_every_shipped_pipeline_loads_and_names_its_command(path):
    cfg = load_pipeline(path)
    assert isinstance(cfg, PipelineConfig)
    first = path.read_text().splitlines()[0]
    assert first.split()[:4] == ["#", "m3jepa", "run", path.stem], "each pipeline is headed by its command"


def test_shipped_pipelines_exist():
    assert any(p.name == "tuxpaint.toml" for p in PIPELINES)


def test_training_path_does_not_import_transformers():
    code = (
        "import sys\n"
        "import m3jepa.cli, m3jepa.train.loop, m3jepa.eval.evaluate, m3jepa.store, m3jepa.runner\n"
        "bad = [m for m in ('transformers', 'peft', 'm3jepa.encoders.hf') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_info_prints_the_paper_preset_count():
    out = subprocess.run(
        [sys.executable, "-m", "m3jepa", "model-info"], capture_output=True, text=True, check=True
    )
    assert "140,641,304" in out.stdout  # the official release's layout comes to 140.6M
