"""Tar shards in WebDataset's layout, named by a folder, a brace pattern or an fsspec URL: listed in order,
their members listed without reading the large ones, or read in order with the `webdataset` library."""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from m3jepa.data.records import DatasetError
from m3jepa.data.splits import natural_key

# webdataset's tar_file_iterator skips these member names (metadata, e.g. "__key__"): so does the listing
_META = re.compile(r"__[^/]*__($|/)")


def is_url(text: str) -> bool:
    """True for an fsspec URL (s3://bucket/x, file:///data/x, ...), False for a local path."""
    return "://" in text


def expand_shards(spec: str, base: str | None = None) -> list[str]:
    """The tar shards `spec` names, in order.

    `spec` is a brace pattern (`shards/{00000..00099}.tar`: braceexpand, as WebDataset reads it), a
    folder (its `*.tar`, in natural order of their names), or one `.tar`; each a local path or an fsspec
    URL. A relative path is taken inside `base` (a folder path or URL) when one is given. Every named
    shard must exist: a missing one is a DatasetError naming it.
    """
    if base is not None and not is_url(spec) and not os.path.isabs(spec):
        spec = f"{base.rstrip('/')}/{spec}"
    if "{" in spec:
        from braceexpand import braceexpand

        names = list(braceexpand(spec))
    elif _isdir(spec):
        names = _tars_in(spec)
        if not names:
            raise DatasetError(f"webdataset: {spec} holds no .tar shards; give a folder of img2dataset's "
                               f"output, a brace pattern like shards/{{00000..00009}}.tar, or one .tar")
    else:
        names = [spec]
    missing = [n for n in names if not _isfile(n)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"webdataset: shard {missing[0]} not found{more}; check --root and the shard "
                           f"pattern")
    return names


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _isdir(spec: str) -> bool:
    if not is_url(spec):
        return os.path.isdir(spec)
    fs, path = _fs(spec)
    return fs.isdir(path)


def _isfile(name: str) -> bool:
    if not is_url(name):
        return os.path.isfile(name)
    fs, path = _fs(name)
    return fs.isfile(path)


def _tars_in(folder: str) -> list[str]:
    if not is_url(folder):
        found = [str(p) for p in Path(folder).glob("*.tar")]
    else:
        fs, path = _fs(folder)
        fs.invalidate_cache(path)  # list the folder as it is now, not as this process saw it before
        protocol = folder.split("://", 1)[0]
        found = [f"{protocol}://{p.lstrip('/')}" if protocol != "file" else f"file://{p}"
                 for p in fs.glob(f"{path.rstrip('/')}/*.tar")]
    return sorted(found, key=lambda n: natural_key(n.rsplit("/", 1)[-1]))


def shard_stat(name: str) -> str:
    """The shard's size-and-mtime fingerprint "stat:<size>:<mtime>" (mtime_ns locally; for a URL the
    backend's modification time and, where it has one, its ETag: "stat:<size>:<time>:<etag>"): it changes
    when the shard is rewritten."""
    if not is_url(name):
        st = os.stat(name)
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    fs, path = _fs(name)
    fs.invalidate_cache(path)  # a listing cached earlier in this process may predate a rewrite
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    # an object store's time has one-second steps: its ETag (the MD5 of a plain upload) tells apart two
    # uploads of the same size within one second
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    return f"stat:{info.get('size')}:{stamp}" + (f":{etag}" if etag else "")


@contextmanager
def open_shard(name: str) -> Iterator[IO[bytes]]:
    """A shard opened for reading: a local file, or an fsspec file (seekable, read in blocks)."""
    if not is_url(name):
        with open(name, "rb") as f:
            yield f
        return
    import fsspec

    with fsspec.open(name, "rb") as f:
        yield f


@dataclass(frozen=True)
class Member:
    """One regular file of a tar shard: its name, and its bytes when they were read (else None)."""

    name: str
    data: bytes | None


def skipped_name(name: str) -> bool:
    """Members webdataset's reader leaves out (metadata such as `__key__`): the listing leaves them too."""
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or bool(_META.match(name))


def list_members(name: str, read: Callable[[str], bool]) -> Iterator[Member]:
    """The shard's regular members in order, with the bytes of those `read(member name)` selects only: the
    others are skipped by seeking (tarfile), so listing a shard of images reads its headers, not its images.
    """
    try:
        with open_shard(name) as f:
            size = _size(f)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    tar.members = []  # keep no list of every header (webdataset's reader does the same)
                    if not info.isreg() or skipped_name(info.name):
                        continue
                    if size is not None and info.offset_data + info.size > size:
                        raise tarfile.ReadError(f"member {info.name} runs past the end of the file")
                    data = None
                    if read(info.name):
                        handle = tar.extractfile(info)
                        data = handle.read() if handle is not None else b""
                    yield Member(info.name, data)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise _unreadable(name, e) from None


def read_members(name: str) -> Iterator[Member]:
    """The shard's regular members in order, with their bytes, read sequentially by the webdataset library."""
    from webdataset.tariterators import tar_file_iterator

    try:
        with open_shard(name) as f:
            for item in tar_file_iterator(f):
                yield Member(item["fname"], item["data"])
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise _unreadable(name, e) from None


def _size(f: IO[bytes]) -> int | None:
    try:
        end = f.seek(0, os.SEEK_END)
        f.seek(0)
        return end
    except (OSError, ValueError):
        return None


def _unreadable(name: str, e: BaseException) -> DatasetError:
    return DatasetError(f"webdataset: shard {name} cannot be read as a tar file ({type(e).__name__}: {e}); "
                        f"download it again or leave it out of the shard list")


def split_name(member: str) -> tuple[str | None, str]:
    """(key, extension) of a member name, by webdataset's rule (`base_plus_ext`: the key is the name up
    to the first dot of its last component; the extension, lower-cased, the rest); key None: no dot."""
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(member)
    return key, (ext or "").lower()


def unsafe_key(key: str) -> str | None:
    """Why a sample key is refused, or None: an absolute path, a `..` or empty component, a backslash or
    a control character (a traversal-looking name: m3jepa writes nothing under it, but refuses it as jsonl
    refuses a path that escapes its root)."""
    if key.startswith("/") or "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        return f"member name {key!r} is absolute or holds a backslash or a control character"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return f"member name {key!r} has an empty, '.' or '..' path component (a traversal-looking name)"
    return None
