"""torchrun from tests: never a fixed port, everything on 127.0.0.1 (other test runs share the machine)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ENV = {**os.environ, **OFFLINE}


def torchrun_args(nproc: int = 2) -> list[str]:
    """torchrun's options for one node of `nproc` ranks: a c10d rendezvous on 127.0.0.1 port 0, so the
    launcher binds a free port itself (no race with other processes picking one)."""
    return [f"--nproc_per_node={nproc}", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
            f"--rdzv-id={uuid.uuid4().hex}"]


def torchrun(*args: str, nproc: int = 2, cwd: Path | None = None, timeout: float = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc <rendezvous> ARGS` (python -m torch.distributed.run), captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(nproc), *args]
    return subprocess.run(cmd, env=env or ENV, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for commands run as printed, whose torchrun takes its static
    rendezvous port from PET_MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def printed_env() -> dict[str, str]:
    """The environment for a documented `torchrun ...` line run as printed: its default static rendezvous
    moved to 127.0.0.1 and a free port by torchrun's own environment defaults (PET_<OPTION>)."""
    return {**ENV, "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port())}


def launch_nodes(root: Path, line: str, env: dict[str, str] | None = None,
                 nnodes: int = 2) -> list[subprocess.Popen]:
    """The shell `line` (`torchrun --nnodes=... -m m3jepa ...`, as docs/multinode.md prints it) once per
    node, each in its own folder `root/node<n>`: its cwd, its m3jepa cache, its output in
    `root/node<n>/out.txt` (nodes that share no local disk). `torchrun` is this interpreter's, exec'd, so
    each Popen is a node's torchrun. Node n announces itself as 127.0.0.(n+1) (loopback too; torchrun's
    --local-addr through its PET_ default): c10d numbers the nodes by that address, so node 0 is rank 0."""
    shell = f'torchrun() {{ exec "{sys.executable}" -m torch.distributed.run "$@"; }}\n{line}'
    procs = []
    for node in range(nnodes):
        home = root / f"node{node}"
        home.mkdir(parents=True, exist_ok=True)
        node_env = {**os.environ, **OFFLINE, **(env or {}), "M3JEPA_CACHE": str(home / "cache"),
                    "PET_LOCAL_ADDR": f"127.0.0.{node + 1}"}
        with (home / "out.txt").open("w") as out:
            procs.append(subprocess.Popen(["bash", "-c", shell], cwd=home, env=node_env, stdout=out,
                                          stderr=subprocess.STDOUT))
    return procs


def wait_nodes(root: Path, procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for every node's torchrun; each node's output; a node that failed fails with all of them."""
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [(root / f"node{n}" / "out.txt").read_text() for n in range(len(procs))]
    assert codes == [0] * len(procs), "\n\n".join(f"node {n} (exit {c}):\n{o[-3000:]}"
                                                 for n, (c, o) in enumerate(zip(codes, outs, strict=True)))
    return outs


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc: no psutil)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def kill_worker(agent: subprocess.Popen) -> int:
    """SIGKILL the m3jepa worker process a node's torchrun started; returns its pid."""
    (worker,) = [c for c in children(agent.pid) if b"m3jepa" in _cmdline(c)]
    os.kill(worker, signal.SIGKILL)
    return worker


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
