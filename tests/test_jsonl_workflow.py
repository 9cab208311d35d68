"""docs/datasets.md, "From your own jsonl folder to a search page": the documented sequence (make a jsonl
folder, encode, train-predictor --root, evaluate, index, search, serve) through the real CLI, on 60 Tux Paint
stamps with a 30-step budget."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAMPS = Path("/usr/share/tuxpaint/stamps")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not STAMPS.is_dir(),
                       reason="needs Debian's tuxpaint-stamps-default (scripts/setup.sh)"),
]
SMALL = ["--set", "train.max_steps=30", "--set", "train.eval_every=10", "--set", "train.num_threads=1"]


def _m3jepa(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "m3jepa", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"m3jepa {' '.join(args)}:\n{done.stderr[-3000:]}"
    return done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_own_jsonl_folder_to_a_search_page(tmp_path):
    data = tmp_path / "mydata"
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_jsonl.py"), "tuxpaint", str(data),
                           "--limit", "60"], capture_output=True, text=True, check=True)
    assert made.stdout.strip() == f"{data / 'pairs.jsonl'}: 60 images with captions"
    _m3jepa("encode", "--dataset", "jsonl", "--root", str(data), "--store-root", "stores", "--workers", "1",
            cwd=tmp_path)
    # the message of a folder dataset without its folder names an option train-predictor has
    missing = subprocess.run([sys.executable, "-m", "m3jepa", "train-predictor", "--dataset", "jsonl",
                              "--store-root", "stores"], cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode == 2 and "--root" in missing.stderr
    trained = _m3jepa("train-predictor", "--dataset", "jsonl", "--root", "mydata", "--store-root", "stores",
                      "--run", "runs/mydata", *SMALL, cwd=tmp_path)
    assert "trainable parameters" in trained.stdout
    saved = (tmp_path / "runs" / "mydata" / "config.toml").read_text()
    assert f'root = "{data}"' in saved  # absolute: found again from any directory

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = str(tmp_path / "runs" / "mydata")
    _m3jepa("evaluate", "--run", run, cwd=elsewhere)
    metrics = json.loads((tmp_path / "runs" / "mydata" / "metrics.json").read_text())
    assert metrics["gallery"]["image->text"]["queries"] == 6  # 60 stamps: 48 / 6 / 6
    _m3jepa("evaluate", "--run", run, "--root", str(data), "--split", "val", cwd=elsewhere)
    for modality in ("image", "text"):
        _m3jepa("index", "--run", run, "--split", "test", "--modality", modality, "--root", str(data),
                cwd=elsewhere)
    image_index = tmp_path / "runs" / "mydata" / "embedded" / "test" / "image.index"
    text_index = tmp_path / "runs" / "mydata" / "embedded" / "test" / "text.index"
    found = json.loads(_m3jepa("search", "--index", str(image_index), "--text", "a red apple", "--json",
                               cwd=elsewhere).stdout)
    assert len(found["hits"]) == 6  # the whole test gallery

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "m3jepa", "serve", "--index", str(image_index),
                               "--index", str(text_index), "--port", str(port)], cwd=elsewhere,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "serve did not answer /health"
                time.sleep(0.3)
        body = json.dumps({"text": "a red apple", "k": 3}).encode()  # text answers the image index
        request = urllib.request.Request(url + "/api/search", data=body,
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert len(json.loads(r.read())["hits"]) == 3
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
