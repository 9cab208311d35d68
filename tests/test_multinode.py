"""Two nodes that share no local disk, running docs/multinode.md's lines as printed: two torchrun launches
meeting at a c10d rendezvous on 127.0.0.1, each in its own folder (cwd, m3jepa cache, run folder), the
stores in an S3 bucket (moto's server on 127.0.0.1, bench/s3server.py, reached through s3fs as a user's
AWS_ENDPOINT_URL points it), small budgets added to each line.

- encode on two nodes writes the bytes of a one-process encode;
- train-predictor on two nodes (gloo) ends within docs/training.md's tolerance of one process, and only
  rank 0's node holds the run folder;
- SIGKILL of node 1's process mid-run: torchrun --max-restarts restarts both nodes' processes, which resume
  from the last checkpoint (no --resume on the line) and end with the uninterrupted run's weights;
- a rerun whose newest run folder is on the node that is not rank 0: that folder moves to rank 0's node.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from launch import free_port, kill_worker, launch_nodes, wait_nodes
from safetensors.numpy import load_file
from typer.testing import CliRunner

from bench.s3server import S3Server
from m3jepa import cli

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[1] / "docs" / "multinode.md"
BUCKET, BUCKET_URL = "my-bucket", "s3://my-bucket/stores"  # the docs' bucket, on moto's server here
# added to the documented lines: 16 groups of train and val in 2 shards per store, so both ranks write
ENCODE = ["--split", "train,val", "--limit", "16", "--shard-size", "8"]
# dropout 0 (ranks draw their own masks), a checkpoint every 4 of 40 steps so a kill has one to resume
TRAIN = {"model.dropout": 0.0, "train.max_steps": 40, "train.batch_size": 8, "train.eval_every": 20,
         "train.checkpoint_every": 4, "train.num_threads": 1}
RUN = "runs/tux2"  # the documented --run-dir, relative: each node's own folder
RTOL, ATOL = 1e-4, 5e-5  # docs/training.md, "Multi-process": 2 gloo processes against 1


def _documented() -> tuple[str, dict[str, str]]:
    """(the `export` line, {m3jepa command: its torchrun line}) of the page's first code block."""
    block = DOC.read_text().split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    export = next(x for x in block if x.startswith("export "))
    lines = {re.search(r" -m m3jepa (\S+)", x).group(1): x for x in block if x.startswith("torchrun ")}
    return export, lines


def _run_line(root: Path, command: str, *extra: str) -> list:
    """Launch the documented line of `command` on two nodes, the machine's values after the page's export
    line: the rendezvous on 127.0.0.1 at a free port, a fresh id (the bucket's endpoint and credentials
    are in the environment, as a user's are)."""
    export, lines = _documented()
    assert BUCKET_URL in lines[command]
    mine = f"export HEAD=127.0.0.1 PORT={free_port()} RUN_ID={uuid.uuid4().hex}"
    return launch_nodes(root, "\n".join([export, mine, " ".join([lines[command], *extra])]))


def _train_extra() -> list[str]:
    return [w for k, v in TRAIN.items() for w in ("--set", f"{k}={v}")]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _objects(url: str) -> dict[str, bytes]:
    """Every object under `url` by key relative to it, with its bytes."""
    import fsspec

    fs = fsspec.filesystem("s3", use_listings_cache=False)
    base = url.removeprefix("s3://").rstrip("/") + "/"
    return {k[len(base):]: fs.cat_file(k) for k in fs.find(base)}


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
def bucket():
    """moto's S3 server with the docs' bucket; its endpoint and test credentials in this process's
    environment (and so in every node's), as a user points s3fs at an S3-compatible endpoint."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with S3Server() as server, pytest.MonkeyPatch.context() as mp:
        for k, v in server.env().items():
            mp.setenv(k, v)
        server.make_bucket(BUCKET)
        yield BUCKET_URL


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, bucket, tuxpaint_root) -> Path:
    """The documented encode on two nodes: the folder holding node0/ and node1/."""
    root = tmp_path_factory.mktemp("encode")
    wait_nodes(root, _run_line(root, "encode", *ENCODE))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, encoded) -> Path:
    """The documented train-predictor on two nodes, never interrupted."""
    root = tmp_path_factory.mktemp("train")
    wait_nodes(root, _run_line(root, "train-predictor", *_train_extra()))
    return root


def test_encode_on_two_nodes_writes_one_process_bytes(encoded, bucket, tmp_path):
    for rank in (0, 1):  # node n is rank n (tests/launch.py), and both ranks encoded shards
        out = (encoded / f"node{rank}" / "out.txt").read_text()
        assert f"(rank {rank} of 2" in out and re.search(r"train +image +\S+ +16 +8 ", out), out[-3000:]
    export, lines = _documented()
    args = lines["encode"].split(" -m m3jepa ", 1)[1].replace(BUCKET_URL, str(tmp_path / "one")).split()
    res = CliRunner().invoke(cli.app, [*args, *ENCODE, "--threads", "1"])  # torchrun's OMP_NUM_THREADS=1
    assert res.exit_code == 0, res.output[-3000:]
    one, two = _files(tmp_path / "one"), _objects(bucket)
    assert one.keys() == two.keys() and any("shards/00001" in k for k in one)
    assert [k for k in one if one[k] != two[k]] == []
    for node in (0, 1):  # nothing of the stores on a node's own disk
        assert {p.name for p in (encoded / f"node{node}").iterdir()} <= {"out.txt", "cache"}


def test_train_on_two_nodes_matches_one_process(trained, tmp_path):
    run = trained / "node0" / RUN
    assert _step(run) == 40
    assert not (trained / "node1" / "runs").exists()  # rank 1 writes nothing of the run
    export, lines = _documented()
    args = lines["train-predictor"].split(" -m m3jepa ", 1)[1].split()
    args[args.index("--run-dir") + 1] = str(tmp_path / "one")
    res = CliRunner().invoke(cli.app, [*args, *_train_extra()])
    assert res.exit_code == 0, res.output[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=RTOL, atol=ATOL, err_msg=k)


def test_a_killed_node_resumes_from_the_last_checkpoint(trained, tmp_path):
    procs = _run_line(tmp_path, "train-predictor", *_train_extra())
    run = tmp_path / "node0" / RUN
    deadline = time.monotonic() + 300
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


def test_the_newest_run_folder_moves_to_rank_0(trained, tmp_path):
    """A rerun whose newest run folder is on node 1 (rank 0 was there last time): rank 0's node receives
    it, and its own older copy (here: a copy whose latest says step 8) is moved aside."""
    shutil.copytree(trained / "node0" / RUN, tmp_path / "node1" / RUN)
    shutil.copytree(trained / "node0" / RUN, tmp_path / "node0" / RUN)
    state = tmp_path / "node0" / RUN / "checkpoints" / "latest" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 8}))
    outs = wait_nodes(tmp_path, _run_line(tmp_path, "train-predictor", *_train_extra(), "--resume"))
    assert "replaces it" in outs[0] and "already finished" in outs[0], outs[0][-3000:]
    moved = {k: v for k, v in _files(tmp_path / "node0" / RUN).items() if k != ".lock"}
    sent = {k: v for k, v in _files(tmp_path / "node1" / RUN).items() if k != ".lock"}
    assert moved == sent and "checkpoints/latest/model.safetensors" in moved
    assert _step(tmp_path / "node0" / f"{RUN}.step8") == 8


def test_restarts_across_nodes_on_the_shared_store_are_warned_about(monkeypatch, caplog):
    from m3jepa.distributed import _warn_shared_store

    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3", "GROUP_WORLD_SIZE": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _warn_shared_store()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text
    caplog.clear()
    for quiet in ({"TORCHELASTIC_USE_AGENT_STORE": "False"}, {"TORCHELASTIC_MAX_RESTARTS": "0"},
                  {"GROUP_WORLD_SIZE": "1"}):
        for k, v in {**env, **quiet}.items():
            monkeypatch.setenv(k, v)
        _warn_shared_store()
    assert caplog.text == ""
