"""The real `m3jepa run` output on a small Tux Paint subset (issue 21 items 2 and 6, issue 22): a quiet
report, a finished run that says so, a copied pipeline that is its own run, a changed config refused with
an option that exists, and a speed-only setting that reuses the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

STAMPS = Path("/usr/share/tuxpaint/stamps")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not STAMPS.is_dir(),
                       reason="needs Debian's tuxpaint-stamps-default (scripts/setup.sh)"),
]
# 40 stamps a split, a small predictor and 20 steps: the output is under test, not the recall
SMALL = ["encode.limit=40", "encode.workers=1", "train.batch_size=32", "train.max_steps=20",
         "train.eval_every=10", "train.checkpoint_every=10", "train.num_threads=1"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "m3jepa", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_a_quiet_first_run_and_runs_of_their_own(tmp_path):
    sets = [x for s in SMALL for x in ("--set", s)]
    out = _run("run", "tuxpaint", "--workdir", str(tmp_path), *sets, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stderr
    # routing health is one line of the report, not warnings; R² is explained; no library bar fragments
    assert "routing collapse" not in log and "WARNING m3jepa.model.moe" not in log
    assert "Loading weights" not in log and "%|" not in log, log[-3000:]
    assert sum(line.startswith("- routing (test split") for line in out.stdout.splitlines()) == 1
    assert "- R² of the predicted latents:" in out.stdout and "0 no better than predicting" in out.stdout

    run = tmp_path / "runs" / "tuxpaint"
    again = _run("run", "tuxpaint", "--workdir", str(tmp_path), *sets, "--set", "train.num_threads=2",
                 cwd=tmp_path)  # a speed-only change (issue 22) reuses the finished run
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run {run} was already finished (" in again.stdout and "samples/s" not in again.stdout

    # a copy with another temperature: refused in the default's folder (one line, an option that exists),
    # and its own run, named after the file, without --run
    assert _run("pipelines", "copy", "tuxpaint", "my.toml", cwd=tmp_path).returncode == 0
    text = (tmp_path / "my.toml").read_text().replace("temperature = 0.03", "temperature = 0.05")
    (tmp_path / "my.toml").write_text(text)
    refused = _run("run", "my.toml", "--workdir", str(tmp_path), "--run", "runs/tuxpaint", *sets,
                   cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert "loss.temperature: 0.05 != 0.03" in line and "--run NEW_FOLDER" in line
    assert "stores cached" not in refused.stderr + refused.stdout  # refused before encoding anything
    mine = _run("run", "my.toml", "--workdir", str(tmp_path), *sets, cwd=tmp_path)
    assert mine.returncode == 0, mine.stderr[-3000:]
    assert (tmp_path / "runs" / "my" / "metrics.json").is_file()
