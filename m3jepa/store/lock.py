"""One writer per (store, rank): an flock on `<store>/.lock.rank<r>` that the OS frees if the holder dies."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from m3jepa.store.manifest import StoreError

log = logging.getLogger(__name__)


class StoreLockedError(StoreError):
    """Another live process holds this store's writer lock for the same rank."""

    def __init__(self, path: Path, pid: int | None):
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"{path.parent} is being written by {holder} (it holds {path.name}); wait for it to "
            f"finish or stop it; the lock frees itself when that process exits, even if it is killed"
        )
        self.path = path
        self.pid = pid


def lock_path(store: Path, rank: int) -> Path:
    return Path(store) / f".lock.rank{rank}"


class StoreLock:
    """A non-blocking exclusive flock; the holder's PID is written into the file for error messages.

    On release the file is removed (while still locked) so a finished store carries no lock files;
    acquire re-checks that the file it locked is still the one at `path`, which keeps that removal safe.
    """

    def __init__(self, store: Path, rank: int = 0):
        self.path = lock_path(store, rank)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def check(self) -> None:
        """An flock is held until released, even across a stall: nothing to re-check before a commit."""
        if self._fd is None:
            raise StoreError(f"{self.path.parent}: the writer holds no lock for this rank")

    def acquire(self) -> StoreLock:
        if self._fd is not None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise StoreLockedError(self.path, pid) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file between our open and our flock
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        log.debug("locked %s", self.path)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)
