"""torchrun from tests: never a fixed port, everything on 127.0.0.1 (other test runs share the machine)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


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
