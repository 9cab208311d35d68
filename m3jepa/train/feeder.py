"""Store-backed training batches, read ahead on a background thread so the step never waits on I/O."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from m3jepa.store.reader import FeatureStore
from m3jepa.train.data import batch_indices

T = TypeVar("T")


class RawRows:
    """Random rows of an uncompressed zarr store read with one pread each (8 KiB for a 4096-d float16
    row) instead of decoding the row's whole chunk (1024 rows) through zarr.

    Only for the layout m3jepa writes (zarr v3, regular row chunks, one little-endian `bytes` codec,
    C order, "/" chunk keys); `RawRows.supports(store)` says whether it applies, and the test suite
    checks it against `FeatureStore.read`.
    """

    def __init__(self, store: FeatureStore) -> None:
        if not self.supports(store):
            raise ValueError(f"{store.path}: not an uncompressed zarr v3 store; use FeatureStore.read")
        m = store.manifest
        self.dim, self.dtype = m.dim, np.dtype(m.dtype).newbyteorder("<")
        self.shard_size = m.shard_size
        self._dirs = [store.path / "shards" / f"{s.index:05d}.zarr" / "features" for s in m.shards]
        self._chunk_rows = [_layout(d)[0] for d in self._dirs]
        self._fds: dict[tuple[int, int], int] = {}

    @staticmethod
    def supports(store: FeatureStore) -> bool:
        m = store.manifest
        if m.format != "zarr" or m.kind != "pooled" or not m.shards:
            return False
        try:
            _layout(store.path / "shards" / f"{m.shards[0].index:05d}.zarr" / "features")
        except (OSError, ValueError, KeyError):
            return False
        return True

    def read(self, row_ids: np.ndarray) -> np.ndarray:
        """(n, D) rows in the stored dtype, in the order given."""
        out = np.empty((len(row_ids), self.dim), dtype=self.dtype)
        row_bytes = self.dim * self.dtype.itemsize
        for i, row in enumerate(np.asarray(row_ids, dtype=np.int64).tolist()):
            shard, local = divmod(row, self.shard_size)
            chunk, r = divmod(local, self._chunk_rows[shard])
            n = os.preadv(self._fd(shard, chunk), [memoryview(out[i]).cast("B")], r * row_bytes)
            if n != row_bytes:
                raise OSError(f"short read of row {row} in {self._dirs[shard]}: {n} of {row_bytes} bytes")
        return out

    def _fd(self, shard: int, chunk: int) -> int:
        key = (shard, chunk)
        if key not in self._fds:
            self._fds[key] = os.open(self._dirs[shard] / "c" / str(chunk) / "0", os.O_RDONLY)
        return self._fds[key]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _layout(array_dir) -> tuple[int, int]:
    """(chunk rows, dim) of a features array, if it has exactly the raw layout RawRows reads."""
    meta = json.loads((array_dir / "zarr.json").read_text())
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


@dataclass
class StorePairs:
    """One direction read straight from two stores: pair i is (source row, target row)."""

    source: FeatureStore
    target: FeatureStore
    rows_s: np.ndarray  # (P,) int64 source rows of each pair
    rows_t: np.ndarray  # (P,) int64 target rows of each pair

    def __post_init__(self) -> None:
        # pread per row where the layout allows it, zarr chunk decoding otherwise (hdf5, others).
        self._readers = [
            RawRows(s).read if RawRows.supports(s) else (lambda ids, s=s: s.read(ids, dtype=None))
            for s in (self.source, self.target)
        ]

    def batch(self, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1):
        """(x (b, D_s), y (b, D_t)) float32 for `step`: the same rows as the in-memory loop's `_batch`."""
        idx = batch_indices(len(self.rows_s), batch_size, seed, step)
        idx = np.array_split(idx, world)[rank]
        # Rows are read in stored dtype and cast here, as the in-memory path casts its float16 tensor.
        x = torch.from_numpy(self._readers[0](self.rows_s[idx])).float()
        y = torch.from_numpy(self._readers[1](self.rows_t[idx])).float()
        return x, y


class Prefetcher(Generic[T]):
    """Compute make(step) for steps in order, up to `depth` steps ahead, on one daemon thread.

    Store reads release the GIL (file I/O, numpy copies), so they overlap the training step's
    compute; memory stays bounded at `depth` + 1 batches however large the store is.
    """

    def __init__(self, make: Callable[[int], T], steps: range, depth: int = 2) -> None:
        self._make, self._steps = make, steps
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for step in self._steps:
            if self._stop.is_set():
                return
            try:
                item = (step, self._make(step), None)
            except BaseException as e:  # handed to the consumer, which re-raises it in the loop
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def __iter__(self) -> Iterator[tuple[int, T]]:
        for expected in self._steps:
            step, value, error = self._queue.get()
            if error is not None:
                raise error
            assert step == expected, f"prefetcher out of order: {step} != {expected}"
            yield step, value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
