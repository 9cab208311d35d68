"""Where stores live: a local folder (a `pathlib.Path`) or an fsspec URL (`StoreURL`: s3://, gs://, memory://).

A local path stays a `Path`, so every local code path (flock, rename, pread) is unchanged. A URL becomes a
`StoreURL`, a small value with the pathlib methods the store code uses (`/`, `name`, `parent`, `is_file`,
`read_bytes`, ...) carried out through fsspec. Credentials never appear in a URL: they come from the
backend's own environment (AWS_* variables, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS), so nothing m3jepa
logs or writes holds them (docs/feature-store.md, "Stores at URLs").
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.S)
CREDENTIALS_HINT = (
    "give credentials through the backend's environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
    "~/.aws/credentials for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://), never in the URL"
)


class LocationError(ValueError):
    """A store location that cannot be used as given; the message names it (without secrets) and the fix."""


@dataclass(frozen=True)
class StoreURL:
    """A location in an fsspec filesystem, e.g. s3://bucket/stores/coco; `cache`: a local folder that keeps
    whole copies of the objects read (fsspec's filecache; encode.store_cache), or None."""

    url: str  # protocol://path, no trailing slash, no credentials, no query
    cache: str | None = None

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StoreURL({self.url!r})"

    def __truediv__(self, part: str | Path) -> StoreURL:
        part = str(part).strip("/")
        return replace(self, url=f"{self.url}/{part}") if part else self

    # ------------------------------------------------------------ pathlib's names

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> StoreURL:
        head, rest = self.url.split("://", 1)
        return replace(self, url=f"{head}://{rest.rsplit('/', 1)[0]}") if "/" in rest else self

    @property
    def parents(self) -> list[StoreURL]:
        out, here = [], self
        while here.parent != here:
            here = here.parent
            out.append(here)
        return out

    def with_name(self, name: str) -> StoreURL:
        return self.parent / name

    def resolve(self) -> StoreURL:
        return self  # a URL is already absolute

    def is_absolute(self) -> bool:
        return True

    def relative_to(self, other: StoreURL) -> str:
        prefix = other.url.rstrip("/") + "/"
        if not self.url.startswith(prefix):
            raise ValueError(f"{self} is not under {other}")
        return self.url[len(prefix) :]

    # ------------------------------------------------------------ fsspec

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (writes, listings and uncached reads)."""
        return filesystem(self.protocol)

    @property
    def key(self) -> str:
        """The path the filesystem's methods take (the URL without its protocol, as fsspec strips it)."""
        return self.fs._strip_protocol(self.url)

    @property
    def read_fs(self) -> Any:
        """The filesystem reads go through: the plain one, or with `cache` a whole-file cache in front."""
        return self.fs if self.cache is None else cached_filesystem(self.protocol, self.cache)

    def exists(self) -> bool:
        with remote_errors(self):
            return bool(self.fs.exists(self.key))

    def is_file(self) -> bool:
        with remote_errors(self):
            return bool(self.fs.isfile(self.key))

    def is_dir(self) -> bool:
        with remote_errors(self):
            return bool(self.fs.isdir(self.key))

    def read_bytes(self) -> bytes:
        with remote_errors(self):
            return self.fs.cat_file(self.key)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One PUT: an object appears whole or not at all (object stores have no partial objects)."""
        with remote_errors(self):
            self.fs.pipe_file(self.key, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        with remote_errors(self):
            try:
                self.fs.rm_file(self.key)
            except FileNotFoundError:
                if not missing_ok:
                    raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no folders, only keys with a common prefix."""

    def glob(self, pattern: str) -> list[StoreURL]:
        with remote_errors(self):
            found = self.fs.glob(f"{self.key}/{pattern}")
        base = self.key.rstrip("/") + "/"
        return sorted((self / k[len(base) :] for k in found if k.startswith(base)), key=str)


Location = Path | StoreURL


def location(value: str | Path | StoreURL, cache: str | Path | None = None) -> Location:
    """A local path as a Path ("file://" URLs too), any other URL as a StoreURL (with `cache`, a local
    folder for whole copies of remote objects read; ignored for local paths, which need none)."""
    if isinstance(value, StoreURL):
        return value if cache is None or value.cache is not None else replace(value, cache=str(cache))
    if isinstance(value, Path):
        return value
    text = str(value)
    match = _URL.match(text)
    if match is None:
        if "::" in text:
            raise LocationError(f"{redact(text)}: chained URLs are not accepted; for a local read cache set "
                                "encode.store_cache")
        return Path(text)
    protocol, rest = match.group(1).lower(), match.group(2)
    _check_url(text, protocol, rest)
    if protocol in ("file", "local"):
        return Path(rest if rest.startswith("/") else "/" + rest)
    rest = rest.rstrip("/")
    if not rest:
        raise LocationError(f"{text}: name a bucket (and a prefix), e.g. {protocol}://my-bucket/stores")
    filesystem(protocol)  # an unknown protocol or a missing package is one line now, not at first use
    return StoreURL(f"{protocol}://{rest}", None if cache is None else str(cache))


def is_url(value: str | Path | StoreURL) -> bool:
    return isinstance(location(value), StoreURL)


def _check_url(text: str, protocol: str, rest: str) -> None:
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        raise LocationError(f"{redact(text)}: a store URL may not carry credentials; {CREDENTIALS_HINT}")
    if "?" in rest or "#" in rest:
        raise LocationError(f"{redact(text)}: a store URL may not carry a query or fragment (they can hold "
                            f"tokens); {CREDENTIALS_HINT}")
    if "::" in rest:
        raise LocationError(f"{redact(text)}: chained URLs are not accepted; for a local read cache set "
                            "encode.store_cache")


def redact(text: str) -> str:
    """`text` with any user:secret@ and ?query removed, safe to print."""
    match = _URL.match(text)
    if match is None:
        return text
    protocol, rest = match.groups()
    authority, sep, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    path = re.split(r"[?#]", path, maxsplit=1)[0]
    return f"{protocol}://{authority}{sep}{path}"


def filesystem(protocol: str) -> Any:
    """fsspec's filesystem for `protocol`, configured from the backend's environment and fsspec's config
    (FSSPEC_S3_ENDPOINT_URL, ~/.config/fsspec/); one line when the protocol or its package is missing."""
    import fsspec

    try:
        # No listings cache: other processes (other ranks, other nodes) write to the same prefixes, and a
        # cached listing would hide their shards from this one (rank 0 checks them all before it finalizes).
        return fsspec.filesystem(protocol, use_listings_cache=False)
    except ValueError as e:
        raise LocationError(f"{protocol}:// is not a filesystem fsspec knows ({e})") from None
    except ImportError as e:
        extra = " (pip install 'm3jepa[s3]')" if protocol in ("s3", "s3a") else ""
        raise LocationError(f"{protocol}:// needs a package that is not installed: {e}{extra}") from None


def cached_filesystem(protocol: str, cache: str) -> Any:
    """fsspec's whole-file cache in front of `protocol`, in folder `cache`: each object read is downloaded
    once and read locally after; `check_files` re-validates a copy against the object's ETag on each open,
    so an object rewritten in the bucket (a re-encode) is fetched again, never served stale."""
    folder = Path(cache).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    key = (protocol, str(folder))
    if key not in _CACHES:
        cls = _locked_file_cache()
        _CACHES[key] = cls(fs=filesystem(protocol), cache_storage=str(folder), check_files=True)
    return _CACHES[key]


_CACHES: dict[tuple[str, str], Any] = {}


@functools.cache
def _locked_file_cache() -> type:
    """fsspec's WholeFileCacheFileSystem with every open under an flock on `<cache>/.m3jepa-cache.lock`.

    Its metadata (which objects are cached, under which ETag) is one dict saved to a file per folder, and
    concurrent opens race on it: zarr reads chunks on several threads, and two of them lost each other's
    entry (fsspec 2026.9: `_check_file` returned False right after a download, a TypeError in `_open`). An
    flock orders the opens of every thread and every process sharing the folder; reads of cached files
    run unlocked."""
    import fcntl

    from fsspec.implementations.cached import WholeFileCacheFileSystem

    class LockedFileCache(WholeFileCacheFileSystem):
        def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
            lock = Path(self.storage[-1]) / ".m3jepa-cache.lock"
            with open(lock, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    return super()._open(path, mode, **kwargs)
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    return LockedFileCache


@contextlib.contextmanager
def remote_errors(where: StoreURL | str) -> Iterator[None]:
    """Turn a backend's failure (network, permissions, a missing bucket) into one LocationError line that
    names the location and the fix; FileNotFoundError and FileExistsError pass through for callers."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, LocationError):
        raise
    except MemoryError:
        raise
    except Exception as e:  # s3fs/botocore/aiohttp raise many types; all mean "the backend said no"
        if type(e).__module__.startswith("m3jepa."):
            raise  # m3jepa's own one-line errors, raised inside the block
        raise LocationError(
            f"{where}: {type(e).__name__}: {_one_line(e)}; check the URL, that the bucket exists, the "
            "endpoint (AWS_ENDPOINT_URL for an S3-compatible server) and the credentials in the environment"
        ) from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("…" if len(text) > 300 else "")


# ---------------------------------------------------------------- operations on either kind


def write_text(loc: Location, text: str) -> None:
    """A whole-or-nothing text write: a temporary name and a rename locally, one PUT remotely."""
    if isinstance(loc, StoreURL):
        loc.write_text(text)
        return
    tmp = loc.with_name(f"{loc.name}.tmp-{os.getpid()}")  # as m3jepa.files.atomic_write_text
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, loc)


def write_lines(loc: Location, lines: Iterable[str]) -> str:
    """Write `lines` (each ending in a newline) whole-or-nothing in bounded memory; their bytes' sha256.

    Locally as m3jepa.files.atomic_write_lines (a temporary name, then a rename); at a URL the lines go to
    a local temporary file first, uploaded in one PUT. An error while `lines` is iterated writes nothing.
    """
    import tempfile

    h = hashlib.sha256()
    local = isinstance(loc, Path)
    tmp = loc.with_name(f"{loc.name}.tmp-{os.getpid()}") if local else None
    fd, scratch = (None, tmp) if local else tempfile.mkstemp(prefix="m3jepa-lines-")
    scratch = Path(scratch)
    try:
        with (scratch.open("wb") if fd is None else os.fdopen(fd, "wb")) as f:
            for line in lines:
                data = line.encode("utf-8")
                h.update(data)
                f.write(data)
        if local:
            os.replace(scratch, loc)
        else:
            with remote_errors(loc):
                loc.fs.put_file(str(scratch), loc.key)
    finally:
        scratch.unlink(missing_ok=True)
    return h.hexdigest()


def remove_tree(loc: Location) -> None:
    """Delete a folder (a local tree, or every object under a remote prefix); missing is fine."""
    if isinstance(loc, StoreURL):
        with remote_errors(loc), contextlib.suppress(FileNotFoundError):
            keys = loc.fs.find(loc.key)
            if keys:
                loc.fs.rm(keys)
    elif loc.is_dir() and not loc.is_symlink():
        shutil.rmtree(loc)
    elif loc.exists() or loc.is_symlink():
        loc.unlink()


@dataclass(frozen=True)
class Entry:
    """One file in a listing: its size and, where the backend reports it, the MD5 of its bytes."""

    size: int
    md5: str | None = None


def listing(loc: Location) -> dict[str, Entry]:
    """Every file under `loc`, by path relative to it: one recursive listing (paged LIST calls remotely),
    no file read. Local sizes come from lstat and carry no MD5."""
    if isinstance(loc, StoreURL):
        with remote_errors(loc):
            try:
                found = loc.fs.find(loc.key, detail=True)
            except FileNotFoundError:
                return {}
        base = loc.key.rstrip("/") + "/"
        return {k[len(base) :]: Entry(int(v.get("size") or 0), listed_md5(v)) for k, v in found.items()
                if k.startswith(base) and v.get("type", "file") == "file"}
    out = {}
    for root, _, files in os.walk(loc):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a writer may be renaming files right now
                full = os.path.join(root, name)
                out[os.path.relpath(full, loc)] = Entry(os.lstat(full).st_size)
    return out


def listed_md5(info: dict[str, Any]) -> str | None:
    """The MD5 of an object's bytes as its listing reports it, where that is what the listing holds:
    S3's ETag of a single-part, unencrypted-or-SSE-S3 upload (32 hex digits, no "-N" part count), or GCS's
    md5Hash. None otherwise (a multipart ETag, SSE-KMS, a backend that lists no hash)."""
    etag = info.get("ETag") or info.get("etag")
    if isinstance(etag, str):
        etag = etag.strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{32}", etag):
            return etag
    md5b64 = info.get("md5Hash")
    if isinstance(md5b64, str):
        import base64

        with contextlib.suppress(ValueError):
            return base64.b64decode(md5b64).hex()
    return None


def file_md5(path: Path) -> str:
    """The MD5 of a local file's bytes (what S3 reports as the ETag of a single-part upload)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
