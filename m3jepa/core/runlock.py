"""One writer per run directory: the store writers' flock (store/lock.py) on `<run>/.lock`, with the PID."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from m3jepa.core.layout import RunDir
from m3jepa.store.lock import StoreLock, StoreLockedError


class RunLockedError(ValueError):
    """Another live process is writing this run directory."""

    def __init__(self, run_dir: Path, pid: int | None):
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"run {run_dir} is being written by {holder} (it holds {RunDir(run_dir).lock}); wait for it to "
            "finish or stop it, or choose another --run; the lock frees itself when that process exits, "
            "even if it is killed"
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
