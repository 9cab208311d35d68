"""Checks on read: a store's shard list, shard files, arrays and bytes against what its manifest says."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from m3jepa.location import Entry, Location, StoreURL, listing
from m3jepa.store.backends import ShardHandle, checksum, hash_rows, little_endian, open_shard, raw_layout
from m3jepa.store.manifest import (
    RAGGED_KINDS,
    Manifest,
    ShardInfo,
    StoreError,
    plan_shards,
    shard_file,
    shard_stem,
)

Listing = dict[str, Entry]  # files under a store at a URL, by path relative to the store


def verify_hint(path: Location) -> str:
    return f"run `m3jepa stores verify {path}`"


def check_layout(path: Location, m: Manifest) -> None:
    """The manifest's shard list is the planned one and names only the store's own shard files.

    A `file` that is absolute or climbs out with `..` would read another store's rows: refused.
    """
    plan = plan_shards(m.rows, m.shard_size)
    have = [(s.index, s.row_start, s.row_end) for s in m.shards]
    if have != plan:
        raise StoreError(
            f"store {path}: the manifest lists {len(have)} shards {have[:2]}..., but {m.rows} rows in shards "
            f"of {m.shard_size} are {len(plan)} shards {plan[:2]}...; {verify_hint(path)}"
        )
    for s in m.shards:
        own = shard_file(s.index, m.format)
        if s.file != own:
            raise StoreError(
                f"store {path}: shard {shard_stem(s.index)} (rows {s.row_start}-{s.row_end - 1}) names file "
                f"{s.file!r}, not its own {own!r}; a manifest may not point outside its store; "
                f"{verify_hint(path)}"
            )


def shard_problems(path: Location, m: Manifest, info: ShardInfo, listed: Listing | None = None) -> list[str]:
    """What is wrong with one shard's files, found without reading its data (empty: nothing).

    The file exists and opens; its arrays have the manifest's names, shapes and dtypes; every zarr chunk
    file is present with its full size, and every HDF5 chunk lies inside the file. At a URL, `listed` (the
    store's listing) gives the sizes, and a shard that records its files (ShardInfo.files) is checked
    against the listing alone: every file present with its size and, where the listing reports an MD5
    (S3's single-part ETag), that MD5. Its metadata files then match what was written byte for byte, so
    they are not opened.
    """
    file = path / info.file
    remote = isinstance(path, StoreURL)
    if remote and listed is None:
        listed = listing(path)
    if remote and info.files:
        return listed_problems(listed, info)
    if remote and not any(k == info.file or k.startswith(info.file + "/") for k in listed):
        return [f"{info.file} is missing"]
    if not remote and not file.exists():
        return [f"{info.file} is missing"]
    try:
        handle = open_shard(m.format, file)
    except Exception as e:  # a damaged file can raise anything from the backend library
        return [f"{info.file} cannot be opened ({type(e).__name__}: {e})"]
    try:
        problems = array_problems(handle.arrays, m, info)
        if not problems:
            sizes = _sizes(path, listed)
            problems = (_zarr_chunk_problems if m.format == "zarr" else _hdf5_chunk_problems)(
                info.file, sizes, handle, info
            )
        return problems
    finally:
        handle.close()


def listed_problems(listed: Listing, info: ShardInfo) -> list[str]:
    """A shard's recorded files (ShardInfo.files) against a listing: present, same size, same MD5 where the
    listing reports one."""
    problems = []
    for rel, (size, md5) in (info.files or {}).items():
        got = listed.get(rel)
        if got is None:
            problems.append(f"{rel} is missing")
        elif got.size != size:
            problems.append(f"{rel} has {got.size} bytes, {size} were written")
        elif got.md5 is not None and got.md5 != md5:
            problems.append(f"{rel} is not the object that was written (its ETag/MD5 {got.md5[:12]}… differs "
                            f"from the recorded {md5[:12]}…)")
    return problems


def _sizes(path: Location, listed: Listing | None) -> Any:
    """rel path -> size in bytes, or None when absent: from the listing at a URL, else from stat."""
    if listed is not None:
        return lambda rel: listed[rel].size if rel in listed else None

    def local(rel: str) -> int | None:
        f = Path(path) / rel
        return f.stat().st_size if f.is_file() else None

    return local


def array_problems(arrays: dict[str, Any], m: Manifest, info: ShardInfo) -> list[str]:
    """Array names, shapes and dtypes against the manifest, each problem naming the manifest field."""
    names = {"features", "tokens", "offsets"} if m.kind in RAGGED_KINDS else {"features"}
    if set(arrays) != names:
        return [
            f"{info.file} holds arrays {sorted(arrays)}, the manifest's kind {m.kind!r} needs {sorted(names)}"
        ]
    problems = []
    feats = arrays["features"]
    if tuple(feats.shape) != (info.rows, m.dim):
        problems.append(
            f"{info.file} features have shape {tuple(feats.shape)}, the manifest says ({info.rows}, {m.dim}) "
            f"(rows {info.row_start}-{info.row_end - 1}, dim {m.dim})"
        )
    problems += _dtype_problem(info, "features", feats, m.dtype, "dtype")
    if m.kind in RAGGED_KINDS:
        tokens, offsets = arrays["tokens"], arrays["offsets"]
        width_field = "state_dim" if m.kind == "prefix" else "dim"
        if len(tokens.shape) != 2 or tokens.shape[1] != m.token_width or tokens.shape[0] != info.tokens:
            problems.append(
                f"{info.file} tokens have shape {tuple(tokens.shape)}, the manifest says ({info.tokens}, "
                f"{m.token_width}) (shard tokens, {width_field})"
            )
        problems += _dtype_problem(info, "tokens", tokens, m.dtype, "dtype")
        if tuple(offsets.shape) != (info.rows + 1,):
            problems.append(
                f"{info.file} offsets have shape {tuple(offsets.shape)}, the manifest's rows need "
                f"({info.rows + 1},)"
            )
        problems += _dtype_problem(info, "offsets", offsets, "int64", "(offsets are always int64)")
    return problems


def _dtype_problem(info: ShardInfo, name: str, array: Any, want: str, field: str) -> list[str]:
    if np.dtype(array.dtype) == np.dtype(want):
        return []
    return [f"{info.file} {name} are {np.dtype(array.dtype)}, the manifest says {want} ({field})"]


def _rows_of(info: ShardInfo, name: str, lo: int, hi: int) -> str:
    if name == "features":
        return f"rows {info.row_start + lo}-{info.row_start + min(hi, info.rows) - 1}"
    return f"the token rows of rows {info.row_start}-{info.row_end - 1}"  # tokens and offsets span the shard


def _zarr_chunk_problems(file: str, sizes: Any, handle: ShardHandle, info: ShardInfo) -> list[str]:
    """Each chunk file of each array exists and has the full chunk's bytes (zarr writes every chunk)."""
    problems = []
    for name, arr in handle.arrays.items():
        chunks = tuple(arr.chunks)
        nbytes = math.prod(chunks) * np.dtype(arr.dtype).itemsize
        grid = tuple(-(-n // c) for n, c in zip(arr.shape, chunks, strict=True)) if arr.shape[0] else ()
        for coords in np.ndindex(grid) if grid else ():
            key = arr.metadata.encode_chunk_key(coords)
            size = sizes(f"{file}/{name}/{key}")
            lo = coords[0] * chunks[0]
            where = f"{info.file}/{name}/{key} ({_rows_of(info, name, lo, lo + chunks[0])})"
            if size is None:
                problems.append(f"chunk {where} is missing")
            elif size != nbytes:
                problems.append(f"chunk {where} has {size} bytes, a chunk has {nbytes}")
    return problems


def _hdf5_chunk_problems(file: str, sizes: Any, handle: ShardHandle, info: ShardInfo) -> list[str]:
    """Every chunk of each dataset is allocated and lies inside the file (a truncated file fails here)."""
    size = sizes(file) or 0
    problems = []
    for name, ds in handle.arrays.items():
        if not ds.shape[0]:
            continue
        if ds.chunks is None:  # contiguous
            offset = ds.id.get_offset()
            if offset is None or offset + ds.id.get_storage_size() > size:
                problems.append(f"{info.file} {name} ({_rows_of(info, name, 0, info.rows)}) lie past its end")
            continue
        chunk_rows = ds.chunks[0]
        expected = -(-ds.shape[0] // chunk_rows)
        present = set()
        for i in range(ds.id.get_num_chunks()):
            c = ds.id.get_chunk_info(i)
            start = c.chunk_offset[0]
            present.add(start // chunk_rows)
            if c.byte_offset + c.size > size:
                where = _rows_of(info, name, start, start + chunk_rows)
                problems.append(
                    f"{info.file} {name} chunk ({where}) lies past the end of the file (truncated)"
                )
        for k in sorted(set(range(expected)) - present):
            where = _rows_of(info, name, k * chunk_rows, (k + 1) * chunk_rows)
            problems.append(f"{info.file} {name} chunk {k} ({where}) is missing")
    return problems


def check_files(path: Location, m: Manifest) -> None:
    """Every shard's files as `shard_problems` checks them (at a URL from one listing of the store); the
    first problem is a StoreError."""
    listed = listing(path) if isinstance(path, StoreURL) else None
    for info in m.shards:
        problems = shard_problems(path, m, info, listed)
        if problems:
            more = f" (and {len(problems) - 1} more problems in this shard)" if len(problems) > 1 else ""
            raise StoreError(
                f"store {path}: shard {shard_stem(info.index)} (rows {info.row_start}-{info.row_end - 1}): "
                f"{problems[0]}{more}; {verify_hint(path)}"
            )


def read_features_checked(path: Location, m: Manifest, handle_of: Any) -> np.ndarray:
    """Every row's features in the stored dtype, (rows, D), each shard's sha256 checked on the bytes read.

    The checksum covers features, then tokens and offsets (ragged kinds), so those are hashed too; the
    features are read once, into the result, and hashed from there.
    """
    out = np.empty((m.rows, m.dim), dtype=np.dtype(m.dtype))  # (N, D)
    for info in m.shards:
        handle = handle_of(info.index)
        part = out[info.row_start : info.row_end]  # (n, D), C-contiguous rows of `out`
        part[...] = handle["features"][:]
        _check_part(path, info, part, handle)
    return out


def _check_part(path: Location, info: ShardInfo, part: np.ndarray, handle: Any) -> None:
    """Hash a shard's features as read (`part`, (n, D)), then its tokens and offsets, against its manifest."""
    h = hashlib.sha256()
    h.update(little_endian(part))
    nbytes = part.nbytes
    for name in ("tokens", "offsets"):
        if name in handle:
            nbytes += hash_rows(h, handle[name])
    _check_digest(path, info, h.hexdigest(), nbytes)


def _check_digest(path: Location, info: ShardInfo, digest: str, nbytes: int) -> None:
    if digest != info.sha256 or nbytes != info.nbytes:
        raise StoreError(
            f"store {path}: shard {shard_stem(info.index)} (rows {info.row_start}-{info.row_end - 1}) "
            f"does not match the sha256 in its manifest (its data changed on disk); {verify_hint(path)}, "
            f"and re-encode it: rerun the `m3jepa encode` command that wrote it with --force"
        )


def read_shard_checked(path: Location, m: Manifest, info: ShardInfo, handle: ShardHandle) -> np.ndarray:
    """One shard's features in the stored dtype, (n, D), its sha256 checked on the bytes read (the tokens
    and offsets of ragged kinds are hashed too): a reader that streams a store shard by shard."""
    part = np.ascontiguousarray(handle["features"][:], dtype=np.dtype(m.dtype))  # (n, D)
    _check_part(path, info, part, handle)
    return part


Fingerprint = tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns) of a local file


def verify_shards(path: Location, m: Manifest, handle_of: Any) -> dict[str, Fingerprint]:
    """Recompute every shard's sha256 from its bytes (a read of the whole store, in bounded memory) and
    refuse a mismatch; returns the fingerprint of every local shard file it hashed, by path relative to the
    store, so a reader that reopens a file later can tell it was replaced since (empty at a URL).

    Each shard's files are fingerprinted before and after they are hashed: a file swapped in between is an
    error too, so the fingerprints always describe the bytes that were hashed."""
    prints: dict[str, Fingerprint] = {}
    for info in m.shards:
        before = _fingerprints(path, info)
        digest, nbytes = _raw_digest(path, m, info) or checksum(handle_of(info.index).arrays)
        _check_digest(path, info, digest, nbytes)
        after = _fingerprints(path, info)
        if before != after:
            raise StoreError(
                f"store {path}: shard {shard_stem(info.index)} (rows {info.row_start}-{info.row_end - 1}) "
                f"changed while it was being verified; {verify_hint(path)}"
            )
        prints.update(after)
    return prints


def _raw_digest(path: Location, m: Manifest, info: ShardInfo) -> tuple[str, int] | None:
    """The shard's (sha256, bytes) straight from its chunk files, for a local pooled zarr shard in the raw
    layout (backends.raw_layout): the features' C-order bytes are the chunk files' bytes in order, the last
    cut to the shard's rows. None when that does not apply (then the arrays are read through zarr).

    Measured with `python -m bench.store_feed --rounds 3 --steps 6 --paired-steps 0 --precision fp32` (its
    `verify_s`, docs/benchmarks.md §3): 0.29 s against 0.42 s through zarr for the 0.18 GB train stores."""
    if isinstance(path, StoreURL) or m.format != "zarr" or m.kind != "pooled":
        return None
    array = Path(path) / info.file / "features"
    try:
        chunk_rows, dim = raw_layout(array)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if dim != m.dim:
        return None
    row_bytes = dim * np.dtype(m.dtype).itemsize
    h, nbytes = hashlib.sha256(), 0
    for k in range(-(-info.rows // chunk_rows)):
        want = min(chunk_rows, info.rows - k * chunk_rows) * row_bytes
        try:
            with open(array / "c" / str(k) / "0", "rb") as f:
                data = f.read(want)
        except OSError:
            return None  # check_files names what is missing
        if len(data) != want:
            return None
        h.update(data)
        nbytes += want
    return h.hexdigest(), nbytes


def _fingerprints(path: Location, info: ShardInfo) -> dict[str, Fingerprint]:
    if isinstance(path, StoreURL):
        return {}
    out = {}
    root = Path(path)
    for rel in info.files or _walk(root / info.file, info.file):
        st = (root / rel).stat()  # follows links: the file whose bytes a reader gets
        out[rel] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _walk(file: Path, rel: str) -> list[str]:
    if not file.is_dir():
        return [rel] if file.exists() else []
    return sorted(f"{rel}/{p.relative_to(file).as_posix()}" for p in file.rglob("*") if p.is_file())
