"""Store-fed training: rows pread per batch from the feature stores (or fetched by ranged GETs from a
bucket), read ahead on a background thread, so a split larger than RAM trains in bounded memory and the
step never waits on I/O (train.feed). Every store is verified once, by its checksums, before a batch."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from m3jepa.core.errors import StoreDataError
from m3jepa.core.order import batch_indices
from m3jepa.location import StoreURL, remote_errors
from m3jepa.prefetch import Prefetcher
from m3jepa.store.backends import raw_layout
from m3jepa.store.integrity import Fingerprint
from m3jepa.store.reader import FeatureStore

T = TypeVar("T")
# (x (b, D_s) or {m: (b, D_m)}, y (b, D_t)), in the stored dtype
Batch = tuple["torch.Tensor | dict[str, torch.Tensor]", torch.Tensor]

# Chunk files kept open per store. Random batches touch a new chunk per row, so an unbounded cache
# would hold one descriptor per chunk file of the store (thousands for a 30 GB store).
MAX_OPEN_CHUNKS = 512


class RawRows:
    """Random rows of an uncompressed zarr store read with one pread each (8 KiB for a 4096-d float16
    row) instead of decoding the row's whole chunk (1024 rows) through zarr.

    Only for the layout m3jepa writes (zarr v3, regular row chunks, one little-endian `bytes` codec,
    C order, "/" chunk keys); `RawRows.supports(store)` says whether it applies, and the test suite
    checks it against `FeatureStore.read`. At a URL each batch is one `cat_ranges` call (concurrent
    ranged GETs, adjacent rows merged), or with a read cache (encode.store_cache) preads of the cached
    chunk files. `verified`: the fingerprints of the local chunk files the store feed hashed at start
    (FeatureStore.verify_data); a chunk file opened later must still be that file.
    """

    def __init__(self, store: FeatureStore, verified: dict[str, Fingerprint] | None = None) -> None:
        if not self.supports(store):
            raise ValueError(f"{store.path}: not an uncompressed zarr v3 store; use FeatureStore.read")
        m = store.manifest
        self.dim, self.dtype = m.dim, np.dtype(m.dtype).newbyteorder("<")
        self.shard_size = m.shard_size
        self.store_path = store.path
        self._dirs = [store.path / "shards" / f"{s.index:05d}.zarr" / "features" for s in m.shards]
        self._chunk_rows = [raw_layout(d)[0] for d in self._dirs]
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()  # LRU of MAX_OPEN_CHUNKS
        self._files: dict[tuple[int, int], object] = {}  # cached remote chunk files behind the fds
        self._ranged = isinstance(store.path, StoreURL) and store.path.cache is None
        self._verified = verified or {}

    @staticmethod
    def supports(store: FeatureStore) -> bool:
        m = store.manifest
        if m.format != "zarr" or m.kind != "pooled" or not m.shards:
            return False
        try:
            raw_layout(store.path / "shards" / f"{m.shards[0].index:05d}.zarr" / "features")
        except (OSError, ValueError, KeyError):
            return False
        return True

    def read(self, row_ids: np.ndarray) -> np.ndarray:
        """(n, D) rows in the stored dtype, in the order given."""
        if self._ranged:
            return self._read_ranges(row_ids)
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
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        if len(self._fds) >= MAX_OPEN_CHUNKS:
            self._close(*self._fds.popitem(last=False))
        path = self._dirs[shard] / "c" / str(chunk) / "0"
        try:
            fd = self._open(key, path)
        except OSError as e:  # checked at open, so the store changed while training
            raise StoreDataError(
                f"{self._where(shard, chunk)}: cannot open it: {e.strerror}; run `m3jepa stores verify "
                f"{self.store_path}`"
            ) from None
        self._fds[key] = fd
        return fd

    def _open(self, key: tuple[int, int], path) -> int:
        if isinstance(path, StoreURL):  # through the read cache: a local copy of the whole chunk file
            with remote_errors(path):
                f = path.read_fs.open(path.key, "rb")
            self._files[key] = f
            return f.fileno()
        fd = os.open(path, os.O_RDONLY)
        rel = path.relative_to(self.store_path).as_posix()
        want = self._verified.get(rel)
        if want is not None:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != want:
                os.close(fd)
                raise StoreDataError(
                    f"{self._where(*key)}: {rel} was replaced or written to after the store feed verified "
                    "it; "
                    f"run `m3jepa stores verify {self.store_path}`, and re-encode the store (rerun the "
                    "`m3jepa encode` command that wrote it with --force) if it is corrupt"
                )
        return fd

    def _close(self, key: tuple[int, int], fd: int) -> None:
        f = self._files.pop(key, None)
        if f is not None:
            f.close()  # closes fd
        else:
            os.close(fd)

    def _where(self, shard: int, chunk: int) -> str:
        rows = f"{shard * self.shard_size + chunk * self._chunk_rows[shard]}.."
        return f"store {self.store_path}: chunk {chunk} of shard {shard:05d} (rows {rows})"

    def _read_ranges(self, row_ids: np.ndarray) -> np.ndarray:
        """At a URL without a cache: every row's bytes by ranged GETs, one `cat_ranges` call per batch (s3fs
        sends them concurrently), rows adjacent in a chunk file merged into one range."""
        ids = np.asarray(row_ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=self.dtype)
        if not len(ids):
            return out
        row_bytes = self.dim * self.dtype.itemsize
        order = np.argsort(ids, kind="stable")
        runs: list[tuple[int, int, int, list[int]]] = []  # (shard, chunk, first row in chunk, positions)
        for pos in order.tolist():
            shard, local = divmod(int(ids[pos]), self.shard_size)
            chunk, r = divmod(local, self._chunk_rows[shard])
            if runs and runs[-1][:2] == (shard, chunk) and r == runs[-1][2] + len(runs[-1][3]):
                runs[-1][3].append(pos)  # the next row of the same chunk file: one range
            else:
                runs.append((shard, chunk, r, [pos]))
        paths = [(self._dirs[s] / "c" / str(c) / "0").key for s, c, _, _ in runs]
        starts = [r * row_bytes for _, _, r, _ in runs]
        ends = [(r + len(p)) * row_bytes for _, _, r, p in runs]
        fs = self.store_path.fs
        with remote_errors(self.store_path):
            blobs = fs.cat_ranges(paths, starts, ends)
        for (shard, chunk, _, positions), blob in zip(runs, blobs, strict=True):
            if isinstance(blob, Exception) or len(blob) != len(positions) * row_bytes:
                want = len(positions) * row_bytes
                got = blob if isinstance(blob, Exception) else f"{len(blob)} of {want} bytes"
                raise StoreDataError(f"{self._where(shard, chunk)}: a ranged read failed ({got}); run "
                                     f"`m3jepa stores verify {self.store_path}`")
            out[positions] = np.frombuffer(blob, dtype=self.dtype).reshape(len(positions), self.dim)
        return out

    def close(self) -> None:
        while self._fds:
            self._close(*self._fds.popitem())


class RowReader:
    """One store's rows as tensors in the stored dtype, read on demand and checked finite.

    Store feeding's stand-in for the (N, D) tensor the in-memory path indexes. The read-ahead thread and
    the loop may share it, so reads hold a lock (RawRows keeps an LRU of open chunk files).
    """

    def __init__(self, store: FeatureStore) -> None:
        # shard files, shapes, dtypes and every chunk file's size, before any batch: a missing chunk would
        # otherwise read as zeros (zarr's fill value) or fail mid-run with a raw OSError
        store.check_files()
        # every shard's sha256 over its bytes, once, before any batch: the rows read later by offset are
        # those bytes (a flipped byte, chunks swapped between shards or a shard swapped for a modified
        # copy are refused here; a chunk file replaced later is refused when it is opened, by fingerprint)
        verified = store.verify_data()
        self.store, self.dim = store, store.dim
        # pread per row where the layout allows it, zarr/hdf5 chunk decoding otherwise.
        raw = RawRows(store, verified) if RawRows.supports(store) else None
        self._raw = raw
        self._read = raw.read if raw is not None else (lambda ids: store.read(ids, dtype=None))
        self._lock = threading.Lock()

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        """(b, D) features of `rows` (b,) in the stored dtype, in the order given; NaN/inf is an error.

        The cast to float32 is left to the loop's thread, where the in-memory path casts too: numpy's
        float16 cast is 4x slower than torch's, and a torch cast here would start a second OpenMP team.
        """
        with self._lock:
            stored = self._read(rows)  # (b, D) in the stored dtype
        bad = _nonfinite_rows(stored)
        if bad.any():
            row = int(rows[int(np.flatnonzero(bad)[0])])
            raise StoreDataError(
                f"store {self.store.path} has NaN or infinite features in row {row} "
                f"(sample {self.store.rows.sample_ids[row]}); re-encode it"
            )
        return torch.from_numpy(stored)

    def close(self) -> None:
        with self._lock:
            if self._raw is not None:
                self._raw.close()


def _nonfinite_rows(a: np.ndarray) -> np.ndarray:
    """(b,) bool: rows of the (b, D) array holding a NaN or inf."""
    if a.dtype == np.float16:  # all exponent bits set; 6x faster than np.isfinite's float16 path
        return ((a.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
    return ~np.isfinite(a).all(axis=1)


@dataclass
class StorePairs:
    """One direction read straight from two stores: pair i is (source row, target row)."""

    source: FeatureStore
    target: FeatureStore
    rows_s: np.ndarray  # (P,) int64 source rows of each pair
    rows_t: np.ndarray  # (P,) int64 target rows of each pair

    def __post_init__(self) -> None:
        self._readers = [RowReader(self.source), RowReader(self.target)]

    def batch(self, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1):
        """(x (b, D_s), y (b, D_t)) float32 for `step`: the same rows as the in-memory loop's `_batch`."""
        idx = batch_indices(len(self.rows_s), batch_size, seed, step)
        idx = np.array_split(idx, world)[rank]
        return self._readers[0](self.rows_s[idx]).float(), self._readers[1](self.rows_t[idx]).float()


class BatchSource(Protocol):
    """What the read-ahead reads from (a store-fed `PairedSplit`): batches by (direction, step)."""

    feed: str

    def stored_batch(
        self, direction: str, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1
    ) -> Batch: ...


class ReadAhead:
    """The batches of a store- or memory-fed split, prepared `depth` steps ahead on one thread.

    `plan(step)` names the directions the loop will train at `step` (the AGD schedule). Only the dynamic
    schedule can plan wrong: its draw depends on recalls that a validation may change after the step was
    planned. A batch that was not prepared is read on the spot, so the batches never depend on the plan.
    Memory stays bounded at about `depth` + 2 steps of batches however large the stores are.
    """

    def __init__(
        self,
        data: BatchSource,
        plan: Callable[[int], list[str]],
        steps: range,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        depth: int = 2,
    ) -> None:
        self._key = (batch_size, seed, rank, world)

        def make(step: int) -> dict[str, Batch]:
            return {d: data.stored_batch(d, batch_size, seed, step, rank, world) for d in plan(step)}

        self._prefetch = Prefetcher(make, steps, depth)
        self._it = iter(self._prefetch)
        self._step, self._ready = steps.start - 1, {}
        self.misses = 0  # batches the loop had to read itself (wrong plan)

    def take(
        self, direction: str, batch_size: int, seed: int, step: int, rank: int, world: int
    ) -> Batch | None:
        """The prepared batch of (direction, step), or None when there is none (the caller reads it)."""
        if (batch_size, seed, rank, world) != self._key:
            return None
        while self._step < step:  # steps the loop skipped are dropped
            got = next(self._it, None)  # re-raises the thread's error (a NaN row, a failed read)
            if got is None:
                return None
            self._step, self._ready = got
        batch = self._ready.pop(direction, None) if self._step == step else None
        self.misses += batch is None
        return batch

    def close(self) -> None:
        self._prefetch.close()


def read_ahead(
    data: BatchSource,
    plan: Callable[[int], list[str]],
    steps: range,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
) -> ReadAhead | None:
    """A ReadAhead for a split fed from the stores or from memory (the thread indexes the rows and, for a
    GPU, pins them, so the loop only casts and copies); None for a split resident on the device (feed
    "device"), whose rows are indexed where they are."""
    if data.feed == "device":
        return None
    return ReadAhead(data, plan, steps, batch_size, seed, rank, world)
