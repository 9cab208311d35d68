"""Two nodes that share no local disk (docs/multinode.md): two torchrun launches meeting at a c10d
rendezvous on 127.0.0.1, each in its own folder (cwd, m3jepa cache, run folder), the stores in a folder
neither node owns (the bucket's stand-in).

- encode on two nodes writes the same bytes as one process;
- train-predictor on two nodes (gloo) ends within docs/training.md's tolerance of one process, and only
  rank 0's node holds the run folder;
- SIGKILL of one node's worker mid-run: torchrun --max-restarts restarts both nodes' workers, which resume
  from the last checkpoint (no --resume on the command line) and end with the uninterrupted run's weights;
- a rerun whose newest run folder is on the node that is not rank 0: that folder moves to rank 0's node.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from launch import kill_worker, launch_nodes, wait_nodes
from safetensors.numpy import load_file
from synthetic_stores import make_stores, overrides
from typer.testing import CliRunner

from m3jepa import cli

pytestmark = pytest.mark.slow

# encode: 24 groups of the train split in 3 shards per store, so both ranks write; one thread each, as
# torchrun's --nproc-per-node=1 leaves the thread count alone (docs/encode.md: bytes follow threads)
ENCODE = ["encode", "--dataset", "tuxpaint", "--split", "train", "--limit", "24", "--shard-size", "8",
          "--workers", "0", "--threads", "1"]
# train: dropout 0 (ranks draw their own masks), a checkpoint every 4 of 40 steps so a kill has one
TRAIN = {"model.dropout": 0.0, "train.max_steps": 40, "train.eval_every": 20, "train.checkpoint_every": 4}
RUN = "runs/two"  # relative: each node's own folder
RTOL, ATOL = 1e-4, 5e-5  # docs/training.md, "Multi-process": 2 gloo processes against 1


def _train_args(stores: Path, run: str | Path) -> list[str]:
    args = ["train-predictor", "--run-dir", str(run)]
    for s in overrides(stores, Path(run), **TRAIN):
        if not s.startswith("run_dir="):
            args += ["--set", s]
    return args


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))


def _step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoints" / "latest" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _log_steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> Path:
    """Where the stores live: a folder of neither node (the S3 bucket of docs/multinode.md)."""
    return tmp_path_factory.mktemp("bucket")


@pytest.fixture(scope="module")
def synthetic(bucket) -> Path:
    return make_stores(bucket / "synthetic")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic) -> Path:
    """The uninterrupted 2-node run: the folder holding node0/ and node1/."""
    root = tmp_path_factory.mktemp("train")
    wait_nodes(root, launch_nodes(root, *_train_args(synthetic, RUN)))
    return root


def test_encode_on_two_nodes_writes_one_process_bytes(tmp_path, bucket, tuxpaint_root):
    stores = bucket / "tux"
    outs = wait_nodes(tmp_path, launch_nodes(tmp_path, *ENCODE, "--store-root", str(stores)))
    for rank, out in enumerate(outs):  # node n is rank n (tests/launch.py::node_args); both encoded
        assert f"(rank {rank} of 2" in out, out[-2000:]
    res = CliRunner().invoke(cli.app, [*ENCODE, "--store-root", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output[-3000:]
    one, two = _files(tmp_path / "one"), _files(stores)
    assert one.keys() == two.keys() and any("shards/00002" in k for k in one)
    assert [k for k in one if one[k] != two[k]] == []
    for node in (0, 1):  # nothing of the stores on a node's own disk
        assert {p.name for p in (tmp_path / f"node{node}").iterdir()} <= {"out.txt", "cache"}


def test_train_on_two_nodes_matches_one_process(trained, synthetic, tmp_path):
    run = trained / "node0" / RUN
    assert _step(run) == 40
    assert not (trained / "node1" / "runs").exists()  # rank 1 writes nothing of the run
    res = CliRunner().invoke(cli.app, _train_args(synthetic, tmp_path / "one"))
    assert res.exit_code == 0, res.output[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=RTOL, atol=ATOL, err_msg=k)


def test_a_killed_node_resumes_from_the_last_checkpoint(trained, synthetic, tmp_path):
    procs = launch_nodes(tmp_path, *_train_args(synthetic, RUN), max_restarts=1)
    run = tmp_path / "node0" / RUN
    deadline = time.monotonic() + 240
    while _step(run) < 8 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    killed_at = _step(run)
    assert 8 <= killed_at < 40, f"no checkpoint to resume from before the run ended ({killed_at})"
    kill_worker(procs[1])  # rank 1's process, on the node that holds no run folder
    outs = wait_nodes(tmp_path, procs)
    assert "resuming from the last checkpoint" in outs[0] and "resuming" in outs[1], outs[0][-3000:]
    assert _log_steps(run) == _log_steps(trained / "node0" / RUN)  # the log reads as one run
    a, b = _weights(trained / "node0" / RUN), _weights(run)
    for k in a:  # the same ranks, the same batches, every rank's generators restored: the same weights
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_the_newest_run_folder_moves_to_rank_0(trained, synthetic, tmp_path):
    """A rerun whose run folder is on node 1 (rank 0 was there last time): rank 0's node receives it."""
    shutil.copytree(trained / "node0" / RUN, tmp_path / "node1" / RUN)
    outs = wait_nodes(tmp_path, launch_nodes(tmp_path, *_train_args(synthetic, RUN), "--resume"))
    assert "replaces it" in outs[0] and "already finished" in outs[0], outs[0][-3000:]
    moved = {k: v for k, v in _files(tmp_path / "node0" / RUN).items() if k != ".lock"}
    sent = {k: v for k, v in _files(tmp_path / "node1" / RUN).items() if k != ".lock"}
    assert moved == sent and "checkpoints/latest/model.safetensors" in moved
