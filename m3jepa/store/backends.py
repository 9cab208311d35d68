"""Shard files in Zarr v3 or HDF5: write one shard whole, open it for sliced reads (local or at a URL),
checksum it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from m3jepa.location import Location, StoreURL, file_md5, remote_errors, remove_tree

FEATURE_CHUNK_ROWS = 1024  # rows per feature chunk: one chunk is the unit of a random read
TOKEN_CHUNK_ROWS = 4096  # token rows per token chunk
HASH_BLOCK_ROWS = 8192  # rows hashed at a time, so verifying a large shard stays in bounded memory
ARRAY_ORDER = ("features", "tokens", "offsets")  # the fixed order the checksum covers


class ShardArray(Protocol):
    """What readers use of an on-disk array (h5py.Dataset and zarr.Array both fit)."""

    shape: tuple[int, ...]
    dtype: Any

    def __getitem__(self, key: Any) -> np.ndarray: ...


class ShardHandle:
    """An open shard: its arrays by name and a close()."""

    def __init__(self, arrays: Mapping[str, ShardArray], closer: Any = None):
        self.arrays = dict(arrays)
        self._closer = closer

    def __getitem__(self, name: str) -> ShardArray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def close(self) -> None:
        if self._closer is not None:
            self._closer.close()
            self._closer = None


class _Closers:
    """Closes several things in order (an HDF5 file, then the remote file object under it)."""

    def __init__(self, *things: Any):
        self.things = things

    def close(self) -> None:
        for thing in self.things:
            thing.close()


def little_endian(array: np.ndarray) -> np.ndarray:
    """The array in the little-endian C-order layout the checksum and both backends use."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def checksum(arrays: Mapping[str, Any]) -> tuple[str, int]:
    """(sha256 hex, bytes hashed) over the arrays present, in ARRAY_ORDER, read in row blocks."""
    h = hashlib.sha256()
    nbytes = sum(hash_rows(h, arrays[name]) for name in ARRAY_ORDER if name in arrays)
    return h.hexdigest(), nbytes


def hash_rows(h: Any, array: Any) -> int:
    """Feed `array`'s little-endian C-order bytes to hasher `h`, a row block at a time; bytes hashed."""
    nbytes = 0
    for block in _row_blocks(array):
        data = little_endian(block)
        h.update(data)  # a C-contiguous array is a buffer: no bytes copy
        nbytes += data.nbytes
    return nbytes


def _row_blocks(array: Any) -> Iterator[np.ndarray]:
    n = array.shape[0]
    if n == 0:
        yield np.asarray(array[0:0])
    for start in range(0, n, HASH_BLOCK_ROWS):
        yield np.asarray(array[start : start + HASH_BLOCK_ROWS])


def _chunk_rows(name: str, n: int) -> int:
    limit = TOKEN_CHUNK_ROWS if name == "tokens" else FEATURE_CHUNK_ROWS
    if name == "offsets":
        limit = max(n, 1)  # offsets are read whole
    return max(1, min(limit, n))


def remove_path(path: Location) -> None:
    """Delete a shard file or directory (zarr shards are directories; remotely, a key prefix); missing is
    fine."""
    remove_tree(path)


def shard_files(path: Path, rel: str) -> dict[str, list]:
    """{`rel`/<sub path>: [size, MD5 hex]} of every file of the shard written at local `path` (an HDF5 file
    or a zarr folder), in sorted order: what ShardInfo.files records and a bucket's listing is checked
    against."""
    if path.is_file():
        return {rel: [path.stat().st_size, file_md5(path)]}
    out = {}
    for root, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            full = Path(root) / name
            out[f"{rel}/{full.relative_to(path).as_posix()}"] = [full.stat().st_size, file_md5(full)]
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- zarr


def write_zarr(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """A zarr v3 group with one uncompressed, row-chunked array per name."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    for name, data in arrays.items():
        chunks = (_chunk_rows(name, data.shape[0]), *data.shape[1:])
        arr = group.create_array(
            name,
            shape=data.shape,
            chunks=chunks,
            dtype=data.dtype,
            compressors=None,  # float latents barely compress; raw chunks read fastest
            fill_value=0,
            # Write all-zero chunks too (rows of skipped items), so a missing chunk file is corruption.
            config={"write_empty_chunks": True},
        )
        if data.shape[0]:
            arr[...] = data


def raw_layout(array_dir: Location) -> tuple[int, int]:
    """(chunk rows, dim) of a 2-d zarr array written as m3jepa writes it (zarr v3, regular row chunks of full
    width, one little-endian `bytes` codec, "/" chunk keys, no compression): chunk k of it is then the file
    `c/k/0`, holding rows [k * chunk rows, (k + 1) * chunk rows) as raw C-order bytes (the last padded with
    zeros). ValueError (or KeyError/OSError) for any other layout."""
    meta = json.loads((array_dir / "zarr.json").read_bytes())
    codecs = meta["codecs"]
    ok = (
        meta["zarr_format"] == 3
        and meta["chunk_grid"]["name"] == "regular"
        and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
        and len(codecs) == 1
        and codecs[0]["name"] == "bytes"
        and codecs[0].get("configuration", {}).get("endian", "little") == "little"
        and not meta.get("storage_transformers")
    )
    rows, dim = meta["chunk_grid"]["configuration"]["chunk_shape"]
    if not ok or dim != meta["shape"][1]:
        raise ValueError(f"{array_dir}: not a raw row-chunked zarr v3 array")
    return rows, dim


def open_zarr(path: Location) -> ShardHandle:
    import zarr

    if isinstance(path, StoreURL):
        with remote_errors(path):
            group = zarr.open_group(store=zarr_store(path), mode="r")
            return ShardHandle({name: group[name] for name in ARRAY_ORDER if name in group})
    group = zarr.open_group(str(path), mode="r")
    return ShardHandle({name: group[name] for name in ARRAY_ORDER if name in group})


def zarr_store(url: StoreURL) -> Any:
    """A read-only zarr store over the objects under `url`, through the read cache when one is set."""
    from zarr.storage import FsspecStore

    if url.cache is None:
        return FsspecStore.from_url(url.url, read_only=True)
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    # fsspec's file cache is synchronous; zarr reads through async filesystems, so it is wrapped
    return FsspecStore(AsyncFileSystemWrapper(url.read_fs, asynchronous=True), path=url.key, read_only=True)


# ---------------------------------------------------------------- hdf5


def write_hdf5(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """An HDF5 file with one uncompressed, row-chunked dataset per name and no timestamps."""
    import h5py

    with h5py.File(path, "w") as f:
        for name, data in arrays.items():
            # h5py refuses chunks on an empty dataset; an empty one is stored contiguous.
            chunks = (_chunk_rows(name, data.shape[0]), *data.shape[1:]) if data.shape[0] else None
            # track_times=False: HDF5 otherwise stamps each dataset with its creation time.
            f.create_dataset(name, data=data, chunks=chunks, track_times=False)


def open_hdf5(path: Location) -> ShardHandle:
    import h5py

    if isinstance(path, StoreURL):  # h5py reads a Python file object: ranged GETs, or the cached copy
        with remote_errors(path):
            fileobj = path.read_fs.open(path.key, "rb")
            f = h5py.File(fileobj, "r")
        return ShardHandle({name: f[name] for name in ARRAY_ORDER if name in f}, closer=_Closers(f, fileobj))
    f = h5py.File(path, "r")
    return ShardHandle({name: f[name] for name in ARRAY_ORDER if name in f}, closer=f)


_WRITERS = {"zarr": write_zarr, "hdf5": write_hdf5}
_OPENERS = {"zarr": open_zarr, "hdf5": open_hdf5}


def write_shard_file(fmt: str, path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write one shard's arrays (already in their stored dtypes) to `path` in format `fmt`."""
    ordered = {name: little_endian(arrays[name]) for name in ARRAY_ORDER if name in arrays}
    _WRITERS[fmt](Path(path), ordered)


def open_shard(fmt: str, path: Location) -> ShardHandle:
    """Open a shard file (a local path or a StoreURL) for reading; its arrays support numpy slicing."""
    return _OPENERS[fmt](path if isinstance(path, StoreURL) else Path(path))
