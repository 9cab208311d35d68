"""Small file helpers every stage shares (stdlib only): atomic text writes and private caches."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a pid-unique temporary name and a rename, so readers never see half."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- private caches
# The run-time compiled kernels (m3jepa.accel.native) and the rendered SVGs (m3jepa.data.svg) are reused
# from a cache folder without being made again, so what is in it must be what m3jepa put there: the
# folder is the user's and writable by no one else (created 0700), each file is the user's, not a link,
# not writable by group or others, and matches the sha256 recorded beside it when it was made.


def cache_dir() -> Path:
    """m3jepa's cache: $M3JEPA_CACHE, else $XDG_CACHE_HOME/m3jepa, else ~/.cache/m3jepa."""
    if os.environ.get("M3JEPA_CACHE"):
        return Path(os.environ["M3JEPA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "m3jepa"


def make_private_dir(path: Path) -> None:
    """Create `path` with mode 0700 (its parents with the usual mode); an existing one is left as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)


def why_untrusted(
    path: Path, what: str, *, folder: bool, redo: str = "rebuild", st: os.stat_result | None = None
) -> str | None:
    """Why `path` must not be trusted (one line naming it, as `what`, and the fix), or None when it is safe.

    Refused: a symbolic link, anything not owned by the current user, anything writable by group or
    others. `redo` says what removing a refused file makes m3jepa do ("rebuild", "render it again").
    `st`: the path's lstat when the caller has it.
    """
    st = st or path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return f"{what} {path} is a symbolic link; remove it (rm {path})"
    if st.st_uid != os.getuid():
        fix = (f"remove it (rm -r {path}) or set M3JEPA_CACHE to a folder of yours" if folder
               else f"remove it (rm {path}) to {redo}")
        return f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); {fix}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        fix = f"run chmod 700 {path}" if folder else f"remove it (rm {path}) to {redo}"
        return f"{what} {path} is writable by group or others (mode {st.st_mode & 0o777:o}); {fix}"
    return None


def sha256_record(path: Path) -> Path:
    """The file beside `path` that holds the sha256 its bytes had when m3jepa made it."""
    return path.with_name(path.name + ".sha256")


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def matches_record(path: Path) -> bool:
    """Whether `path`'s bytes hash to its trusted sha256 record (a missing or untrusted record does not)."""
    record = sha256_record(path)
    try:
        st = record.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or why_untrusted(record, "record", folder=False, st=st) is not None:
        return False
    return record.read_text().strip() == sha256_file(path)


def atomic_write_lines(path: Path, lines: Iterable[str]) -> str:
    """Write `lines` (each ending in a newline) one by one as atomic_write_text does; their bytes' sha256.

    Memory stays bounded by one line, so a file of 100M rows is written without holding its text. An
    error raised while `lines` is iterated leaves `path` as it was and removes the temporary file.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with tmp.open("wb") as f:
            for line in lines:
                data = line.encode("utf-8")
                h.update(data)
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return h.hexdigest()
