"""Media files of an index's rows: recorded at index time (the real path, its size and sha256, inside the
gallery's roots) and read back only while they are still exactly that file.

`m3jepa index` records, for each row with a media file, the path with every symbolic link resolved, its
size and sha256, and the manifest records the gallery's roots (the `--images` folder, or the dataset's
folder). A file that resolves outside the roots is indexed without media. `read_media` (what `m3jepa
serve`'s /media answers with, through the Searcher) returns the bytes only of a regular file, reached
without a link, inside the roots, with the recorded size and sha256: a file replaced by a link to a
private file after indexing, or changed, is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import Any

from m3jepa.search.errors import SearchError

log = logging.getLogger(__name__)

BLOCK = 1 << 20


class MediaRefused(SearchError):
    """A row's media file that is not served: `status` 404 (none, or gone) or 403 (no longer the indexed
    file); `code` a stable name for it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _read_regular(path: str, limit: int | None = None) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file at `path`, opened without following a link in its last part; at most
    `limit` + 1 bytes (so a grown file shows). OSError for a link (ELOOP), a missing file, and
    IsADirectoryError for anything but a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(path)
        chunks, left = [], (st.st_size if limit is None else limit) + 1
        while left > 0 and (chunk := os.read(fd, min(BLOCK, left))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def media_roots(folders: list[str | Path]) -> list[str]:
    """The gallery roots as recorded: every folder with its links resolved."""
    return sorted({os.path.realpath(f) for f in folders})


def record_media(path: str | Path, roots: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """({"media", "media_bytes", "media_sha256"} of the file at `path`, None) when it resolves to a regular
    file inside `roots`; (None, why) otherwise."""
    real = os.path.realpath(path)
    if not _inside(real, roots):
        return None, f"{path} resolves to {real}, outside the gallery's folder(s) {', '.join(roots)}"
    try:
        data, _ = _read_regular(real)
    except IsADirectoryError:
        return None, f"{path} is not a regular file"
    except OSError as e:
        return None, f"{path} cannot be read ({e.strerror})"
    return {"media": real, "media_bytes": len(data), "media_sha256": hashlib.sha256(data).hexdigest()}, None


def read_media(row: dict[str, Any], roots: list[str], where: str) -> bytes:
    """The bytes of a row's media file, only while it is the file indexed; MediaRefused otherwise. `where`
    names the row in messages (e.g. "row 12 of 'image'")."""
    recorded = row.get("media")
    if not recorded:
        raise MediaRefused(404, "no_media", f"{where} has no media file")
    size, sha256 = row.get("media_bytes"), row.get("media_sha256")
    if not isinstance(size, int) or not isinstance(sha256, str):
        raise MediaRefused(404, "media_unverified", f"{where}: the index recorded no size and sha256 of its "
                           "media file, so it is not served; rebuild the index with `m3jepa index --force`")
    real = os.path.realpath(recorded)
    if real != recorded or not _inside(real, roots):
        raise MediaRefused(403, "media_moved", f"{where}: its media file is now a symbolic link (or under "
                           "one) and is not served; rebuild the index if the gallery changed")
    try:
        data, _ = _read_regular(recorded, limit=size)
    except FileNotFoundError:
        raise MediaRefused(404, "media_missing", f"the media file of {where} is missing") from None
    except IsADirectoryError:
        raise MediaRefused(403, "media_not_file", f"{where}: its media path is no regular file now; not "
                           "served") from None
    except OSError as e:  # ELOOP: the last part became a link between the check above and the open
        raise MediaRefused(403, "media_moved", f"{where}: its media file cannot be opened as the indexed "
                           f"file ({e.strerror}); not served") from None
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise MediaRefused(403, "media_changed", f"{where}: its media file changed since it was indexed (its "
                           "size or sha256 differs); not served: rebuild the index with `m3jepa index`")
    return data
