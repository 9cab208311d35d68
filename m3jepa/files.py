"""Small file helpers every stage shares (stdlib only): atomic text writes, private caches, and one line for
a write the disk or the folder refused (a full disk, a quota, a read-only folder) instead of a traceback."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

# A write that fails with one of these is the disk's or the folder's fault, not the data's: one line.
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EFBIG: "the file size limit is reached", errno.EROFS: "the folder is read-only",
               errno.EACCES: "the folder is not writable", errno.EPERM: "the folder is not writable"}
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Libraries that write from native code report the OS error in their message: safetensors (Rust) says
# "... (os error 28)", faiss (C stdio) "... No space left on device"
_OS_ERROR = re.compile(r"os error (\d+)")
_STRERRORS = {os.strerror(code): code for code in DISK_ERRNOS}


class WriteError(ValueError):
    """A write the disk or the folder refused: the message names the folder, the space it needed, what was
    removed and kept, and the fix (one line)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a pid-unique temporary name and a rename, so readers never see half;
    a failed write leaves no temporary file behind."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- private caches
# The run-time compiled kernels (m3jepa.accel.native) and the rendered SVGs (m3jepa.data.svg) are reused
# from a cache folder without being made again, so what is in it must be what m3jepa put there: the
# folder is the user's and writable by no one else (created 0700), each file is the user's, not a link,
# not writable by group or others, and matches the sha256 recorded beside it when it was made.


def replace_dir(tmp: Path, out: Path, aside: str) -> None:
    """Put the finished folder `tmp` in place of `out`: the old one is moved to `out` + `aside` before the
    new one is renamed in, so a kill between the renames leaves one of them whole (the caller's recovery
    knows `aside`)."""
    old = out.with_name(out.name + aside)
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


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


# ---------------------------------------------------------------- writes the disk refuses


def disk_errno(e: BaseException) -> int | None:
    """The DISK_ERRNOS code a failed write reports, from an OSError or a native library's message; None
    when the failure is something else."""
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return e.errno
    text = str(e)
    found = _OS_ERROR.search(text)
    if found and int(found.group(1)) in DISK_ERRNOS:
        return int(found.group(1))
    return next((code for message, code in _STRERRORS.items() if message in text), None)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable


def free_bytes(folder: Path) -> int | None:
    """Free bytes for this user on the file system of `folder` (or its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_error_message(folder: Path, code: int, need: int | None, removed: str = "", kept: str = "",
                        fix: str = "then rerun the same command") -> str:
    """One line: `cannot write FOLDER: the disk is full (No space left on device): 1.2 MiB free there, about
    3.4 MiB needed; removed: ...; kept: ...; free space on it, then ...`."""
    parts = [f"cannot write {folder}: {DISK_ERRNOS[code]} ({os.strerror(code)})"]
    if code in SPACE_ERRNOS:
        free = free_bytes(folder)
        space = [f"{human_bytes(free)} free there" if free is not None else "",
                 f"about {human_bytes(need)} needed" if need else ""]
        if any(space):
            parts[0] += ": " + ", ".join(s for s in space if s)
    if removed:
        parts.append(f"removed {removed}")
    if kept:
        parts.append(f"kept {kept}")
    action = "free space on it" if code in SPACE_ERRNOS else "make it writable"
    parts.append(f"{action}, {fix}")
    return "; ".join(parts)


@contextlib.contextmanager
def refused_writes(folder: Path, *, need: int | None = None, remove: Iterable[Path] = (), removed: str = "",
                   kept: str = "", fix: str = "then rerun the same command") -> Iterator[None]:
    """Turn a write the disk or folder refuses inside the block into a WriteError (one line naming `folder`,
    the free and needed space, what was removed and `kept`), after removing the `remove` paths (the
    temporary files the block was writing). Any other error passes through, the paths removed as well; so
    does a permission error on a file outside `folder` (a store the block could not read is no write)."""
    try:
        yield
    except WriteError:
        raise
    except BaseException as e:
        for path in remove:
            _remove(Path(path))
        code = disk_errno(e)
        if code is None or (code in (errno.EACCES, errno.EPERM) and not _inside(e, Path(folder))):
            raise
        raise WriteError(write_error_message(folder, code, need, removed, kept, fix), code) from None


def _inside(e: BaseException, folder: Path) -> bool:
    """Whether the OSError `e` names a file in `folder` (or `folder` itself)."""
    name = getattr(e, "filename", None)
    if not name:
        return False
    path, root = Path(os.path.abspath(name)), Path(os.path.abspath(folder))
    return path == root or root in path.parents


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
