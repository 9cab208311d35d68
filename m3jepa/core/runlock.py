"""One writer per run directory: the store writers' flock (store/lock.py) on `<run>/.lock`, with the PID."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from m3jepa.core.layout import RunDir
from m3jepa.store.lock import StoreLock, StoreLockedError


class RunLockedError(ValueError):
    """Another live process is writing this run directory."""

    def __init__(self, run_dir: Path, pid: int | None, fix: str | None = None):
        holder = f"process {pid}" if pid is not None else "another process"
        fix = fix or "wait for it to finish or stop it, or choose another --run"
        super().__init__(
            f"run {run_dir} is being written by {holder} (it holds {RunDir(run_dir).lock}); {fix}; the lock "
            "frees itself when that process exits, even if it is killed"
        )
        self.run_dir = run_dir
        self.pid = pid


class RunLock(StoreLock):
    """StoreLock's mechanism on a run directory: a non-blocking exclusive flock the OS frees on death, so a
    lock file left by a killed run never blocks the next one (its stale PID is overwritten)."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir)
        self.run_dir = Path(run_dir)
        self.path = RunDir(self.run_dir).lock

    def acquire(self) -> RunLock:
        try:
            super().acquire()
        except StoreLockedError as e:
            raise RunLockedError(self.run_dir, e.pid) from None
        return self


def writer_of(run_dir: Path) -> int | None:
    """The pid of the live process holding the run's lock (training it, or evaluate writing into it); None
    when no process holds it. Reads only: a reader never creates or takes the lock file."""
    path = RunDir(run_dir).lock
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody holds it (the holder keeps its file until it releases)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            pid = int(text) if text.isdigit() else -1
            return None if pid == os.getpid() else pid  # this process's own lock (evaluate holds it)
        fcntl.flock(fd, fcntl.LOCK_UN)  # a file left by a killed holder: free
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_run(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run directory's lock for the block (only where `enabled`: rank 0 writes the run).

    The directory is created if needed, and removed again if the block leaves it empty (a run that
    failed before writing anything leaves no trace).
    """
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    try:
        yield
    finally:
        lock.release()
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()
