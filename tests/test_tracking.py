"""The loop's sinks: metrics.csv equal to metrics.jsonl (also across a resume), TensorBoard, provenance."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
from synthetic_stores import make_stores, overrides

from m3jepa.config import ConfigError, load_pipeline
from m3jepa.core import checkpoint as ckpt
from m3jepa.core import provenance
from m3jepa.eval.report import flatten
from m3jepa.train import tracking
from m3jepa.train.loop import train

SHORT = {"train.max_steps": 40, "train.log_every": 5, "train.eval_every": 20, "train.checkpoint_every": 10,
         "train.tensorboard": "off"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    return make_stores(tmp_path_factory.mktemp("stores"), n_train=128, n_val=32, n_test=32)


def _cfg(stores: Path, run: Path, **extra):
    return load_pipeline(None, overrides(stores, run, **{**SHORT, **extra}))


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _csv(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _as_csv(value) -> str:
    """The CSV text of one flattened value, as csv.DictWriter writes it."""
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, list) else str(value)


def _assert_csv_equals_jsonl(run: Path) -> list[str]:
    records = [flatten(r) for r in _records(run)]
    cols, rows = _csv(run)
    assert cols == ["step"] + sorted(set().union(*records) - {"step"})
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        assert row == {c: _as_csv(record.get(c)) for c in cols}
    return cols


def test_csv_rows_equal_jsonl_records_and_every_direction_is_logged(stores, tmp_path):
    run = tmp_path / "run"
    train(_cfg(stores, run))
    cols = _assert_csv_equals_jsonl(run)
    assert {"loss", "loss_by_direction.image->text", "loss_by_direction.text->image", "val.text->image.R@1",
            "mean_r1", "direction"} <= set(cols)
    # AGD: each 5-step window trains both directions, so every log line has both directions' mean loss
    train_lines = [r for r in _records(run) if "loss" in r]
    assert [r["step"] for r in train_lines] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(set(r["loss_by_direction"]) == {"image->text", "text->image"} for r in train_lines)
    assert not (run / "tensorboard").exists()  # train.tensorboard = "off"


def test_csv_is_rewritten_when_a_resume_cuts_the_log_back(stores, tmp_path, monkeypatch):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train(_cfg(stores, ref))
    real_save = ckpt.save_checkpoint

    def killed_at_30(path, cfg, objective, state, *args, **kwargs):
        if path.name == "latest" and state.step == 30:  # lines up to step 30 are logged, latest is at 20
            raise RuntimeError("killed")
        return real_save(path, cfg, objective, state, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", killed_at_30)
    with pytest.raises(RuntimeError, match="killed"):
        train(_cfg(stores, cut))
    assert max(r["step"] for r in _records(cut)) == 30
    _assert_csv_equals_jsonl(cut)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    train(_cfg(stores, cut), resume=True)
    assert _assert_csv_equals_jsonl(cut) == _assert_csv_equals_jsonl(ref)  # the same columns

    def strip(records):
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]

    assert strip(_records(cut)) == strip(_records(ref))  # per-direction losses included
    sessions = json.loads((cut / "provenance.json").read_text())["sessions"]
    spans = [(s["from_step"], s["to_step"], s["finished"]) for s in sessions]
    assert spans == [(0, 30, False), (20, 40, True)]
    summary = provenance.summary(cut)
    assert (summary["sessions"], summary["unfinished_sessions"]) == (2, 1)
    assert summary["training_seconds"] == pytest.approx(sum(s["seconds"] for s in sessions), abs=1e-6)


def test_tensorboard_setting(stores, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.tensorboard='yes' is not one of auto, on, off"):
        _cfg(stores, tmp_path / "x", **{"train.tensorboard": "yes"})
    monkeypatch.setattr(tracking, "tensorboard_installed", lambda: False)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(_cfg(stores, tmp_path / "on", **{"train.tensorboard": "on"}))
    assert not (tmp_path / "on").exists()  # refused before anything is written
    train(_cfg(stores, tmp_path / "auto", **{"train.tensorboard": "auto", "train.max_steps": 10}))
    assert (tmp_path / "auto" / "metrics.csv").is_file() and not (tmp_path / "auto" / "tensorboard").exists()


def test_tensorboard_scalars_per_flattened_key(stores, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(_cfg(stores, run, **{"train.tensorboard": "on"}))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = _records(run)
    numeric = {k for r in records for k, v in flatten(r).items()
               if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
    assert set(events.Tags()["scalars"]) == {k.replace(".", "/") for k in numeric}
    logged = [(s.step, s.value) for s in events.Scalars("loss_by_direction/text->image")]
    want = [(r["step"], r["loss_by_direction"]["text->image"]) for r in records if "loss" in r]
    assert [s for s, _ in logged] == [s for s, _ in want]
    assert [v for _, v in logged] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32


def test_source_identity_is_a_commit_or_the_version(monkeypatch):
    from m3jepa import __version__

    ident = provenance.source_identity()
    assert ident["version"] == __version__
    top = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance.PACKAGE_DIR, capture_output=True,
                         text=True)
    if top.returncode == 0:  # this checkout is a git repository: its HEAD, and whether it has changes
        assert ident["commit"] == top.stdout.strip() and re.fullmatch(r"[0-9a-f]{40}", ident["commit"])
        assert isinstance(ident["dirty"], bool)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance.source_identity() == {"commit": None, "dirty": None, "version": __version__}
