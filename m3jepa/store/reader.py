"""FeatureStore: random, sequential and ragged-token reads of a complete store, in bounded memory."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3jepa.data.records import membership_fingerprint
from m3jepa.location import Location, StoreURL, location
from m3jepa.store.backends import ShardHandle, open_shard
from m3jepa.store.integrity import (
    Fingerprint,
    check_files,
    check_layout,
    read_features_checked,
    read_shard_checked,
    verify_hint,
    verify_shards,
)
from m3jepa.store.manifest import (
    MANIFEST,
    RAGGED_KINDS,
    ROWS,
    WRITING,
    IncompleteStoreError,
    Manifest,
    RowMeta,
    StoreError,
    load_manifest,
    parse_rows,
    rows_digest,
    sidecar_file,
)

log = logging.getLogger(__name__)

MAX_OPEN_SHARDS = 64  # open shard handles kept between reads (an LRU; a handle costs little memory)
_WARNED_UNHASHED: set[str] = set()  # stores already warned about (once per process) for lacking rows_sha256


@dataclass
class RowTable:
    """rows.jsonl as columns: position i describes row i of the store."""

    sample_ids: list[str]
    group_ids: list[str]
    texts: list[str | None]
    valid: np.ndarray  # (rows,) bool; False for skipped rows (their features are zeros)

    def __len__(self) -> int:
        return len(self.sample_ids)


class FeatureStore:
    """A complete store opened for reading; works the same for zarr and hdf5 shards.

    Picklable (open handles are dropped and reopened lazily), so it can be handed to DataLoader workers.
    """

    def __init__(self, path: str | Location, manifest: Manifest):
        self.path = location(path)
        self.manifest = manifest
        self._rows: RowTable | None = None
        self._handles: OrderedDict[int, ShardHandle] = OrderedDict()
        self._offsets: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.manifest.rows

    def __repr__(self) -> str:
        m = self.manifest
        return f"FeatureStore({self.path}, rows={m.rows}, dim={m.dim}, {m.kind}, {m.dtype}, {m.format})"

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def rows(self) -> RowTable:
        """The store's row metadata (loaded once, on first use), checked against the manifest."""
        if self._rows is None:
            meta = self._checked_rows()
            self._rows = RowTable(
                sample_ids=[r.sample_id for r in meta],
                group_ids=[r.group_id for r in meta],
                texts=[r.text for r in meta],
                valid=np.array([r.valid for r in meta], dtype=bool),
            )
        return self._rows

    def _checked_rows(self) -> list[RowMeta]:
        # rows.jsonl joins modalities (group ids) and marks skipped rows: a swapped id would pair wrong rows
        data = (self.path / ROWS).read_bytes()
        m, where = self.manifest, self.path / ROWS
        if m.rows_sha256 is None:
            _warn_unhashed(self.path)
        elif rows_digest(data) != m.rows_sha256:
            raise StoreError(
                f"store {self.path}: {ROWS} does not match the manifest's rows_sha256 (its ids, group ids, "
                f"captions or validity changed on disk); {verify_hint(self.path)}"
            )
        meta = parse_rows(data, where)
        if len(meta) != m.rows:
            raise StoreError(
                f"{where} has {len(meta)} lines, the manifest says {m.rows}; {verify_hint(self.path)}"
            )
        bad = next((i for i, r in enumerate(meta) if r.row_id != i), None)
        if bad is not None:
            raise StoreError(f"{where} line {bad + 1} holds row {meta[bad].row_id}; {verify_hint(self.path)}")
        if membership_fingerprint(meta) != m.membership:  # type: ignore[arg-type]  (reads .sample_id)
            raise StoreError(
                f"{where}: the sample ids do not match the manifest's membership; {verify_hint(self.path)}"
            )
        return meta

    def check_files(self) -> None:
        """Every shard file present, with the manifest's arrays, shapes and dtypes and all chunk files at
        full size (no data read); a StoreError names the store, the shard and its rows."""
        check_files(self.path, self.manifest)

    def read_checked(self) -> np.ndarray:
        """Every row's features in the stored dtype, (rows, D), after `check_files`, with each shard's
        sha256 recomputed over the bytes read (StoreError naming the shard's rows when one differs)."""
        self.check_files()
        return read_features_checked(self.path, self.manifest, self._handle)

    def verify_data(self) -> dict[str, Fingerprint]:
        """Every shard's sha256 recomputed from its bytes (the whole store read once, in bounded memory),
        for a reader that then reads rows by offset (the store feed); returns the (dev, inode, size, mtime)
        of each local shard file hashed, by path relative to the store, to refuse a file replaced later."""
        return verify_shards(self.path, self.manifest, self._handle)

    def read_shard_checked(self, index: int) -> np.ndarray:
        """Shard `index`'s features in the stored dtype, (n, D), its sha256 checked on the bytes read."""
        return read_shard_checked(self.path, self.manifest, self.manifest.shards[index], self._handle(index))

    # ------------------------------------------------------------ features

    def read(self, row_ids: Any, dtype: Any = np.float32) -> np.ndarray:
        """Features of `row_ids` in the order given, (n, D); `dtype=None` keeps the stored dtype.

        Rows are sorted, grouped by shard and then by chunk, and each touched chunk is read once.
        """
        ids = self._check_ids(row_ids)
        out = np.empty((len(ids), self.dim), dtype=self._out_dtype(dtype))
        if not len(ids):
            return out
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        shard_of = sorted_ids // self.manifest.shard_size
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for sel in np.split(np.arange(len(ids)), bounds):
            shard = int(shard_of[sel[0]])
            self._gather(shard, sorted_ids[sel] - self.manifest.shards[shard].row_start, out, order[sel])
        return out

    def _gather(self, shard: int, local: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        features = self._handle(shard)["features"]
        chunk = _chunk_rows(features)
        window = local // chunk
        bounds = np.flatnonzero(np.diff(window)) + 1
        for sel in np.split(np.arange(len(local)), bounds):
            lo, hi = int(local[sel[0]]), int(local[sel[-1]]) + 1
            # Only the touched span of one chunk is read, so at most one chunk window is resident.
            out[dest[sel]] = features[lo:hi][local[sel] - lo]

    def read_range(self, start: int, stop: int, dtype: Any = np.float32) -> np.ndarray:
        """Features of rows [start, stop) as one (stop - start, D) array."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"row range [{start}, {stop}) is outside [0, {len(self)})")
        out = np.empty((stop - start, self.dim), dtype=self._out_dtype(dtype))
        size = self.manifest.shard_size
        row = start
        while row < stop:
            shard = row // size
            info = self.manifest.shards[shard]
            end = min(stop, info.row_end)
            out[row - start : end - start] = self._handle(shard)["features"][
                row - info.row_start : end - info.row_start
            ]
            row = end
        return out

    def read_all(self, dtype: Any = np.float32) -> np.ndarray:
        """Every row's features, (rows, D): the one call that loads the whole store."""
        return self.read_range(0, len(self), dtype)

    def iter_batches(
        self, batch_rows: int, dtype: Any = np.float32
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row ids, features) for consecutive batches of `batch_rows` rows, in row order."""
        if batch_rows <= 0:
            raise ValueError(f"batch_rows must be positive, got {batch_rows}")
        for start in range(0, len(self), batch_rows):
            stop = min(start + batch_rows, len(self))
            yield np.arange(start, stop, dtype=np.int64), self.read_range(start, stop, dtype)

    # ------------------------------------------------------------ tokens

    def read_tokens(self, row_ids: Any, dtype: Any = np.float32) -> list[np.ndarray]:
        """For kind = tokens (or prefix): one (T_i, width) array per row id, in the order given."""
        if self.manifest.kind not in RAGGED_KINDS:
            raise StoreError(
                f"{self.path} holds pooled features only (kind 'pooled'); encode with "
                f"--kind tokens to get token latents"
            )
        out_dtype = self._out_dtype(dtype)
        out = []
        for row in self._check_ids(row_ids).tolist():
            shard = row // self.manifest.shard_size
            local = row - self.manifest.shards[shard].row_start
            offsets = self._shard_offsets(shard)
            a, b = int(offsets[local]), int(offsets[local + 1])
            out.append(np.asarray(self._handle(shard)["tokens"][a:b], dtype=out_dtype))
        return out

    def read_prefix(self, row_ids: Any, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """For kind = prefix: the rows' states right-padded to (B, T, state_dim), and their mask (B, T).

        The mask is implied by each row's length (offsets): True on the row's own positions. A convnet's
        rows all have H*W positions (manifest.state_grid), so its mask is all True.
        """
        if self.manifest.kind != "prefix":
            raise StoreError(
                f"{self.path} is a {self.manifest.kind!r} store; encode with --kind prefix for prefix states"
            )
        rows = self.read_tokens(row_ids, dtype)
        return pad_rows(rows, self.manifest.token_width, self._out_dtype(dtype))

    def token_counts(self) -> np.ndarray:
        """(rows,) int64: T_i of every row (kind = tokens or prefix)."""
        if self.manifest.kind not in RAGGED_KINDS:
            raise StoreError(f"{self.path} holds pooled features only (kind 'pooled')")
        return np.concatenate(
            [np.diff(self._shard_offsets(s.index)) for s in self.manifest.shards] or [np.zeros(0, np.int64)]
        )

    def _shard_offsets(self, shard: int) -> np.ndarray:
        if shard not in self._offsets:
            self._offsets[shard] = np.asarray(self._handle(shard)["offsets"][:], dtype=np.int64)
        return self._offsets[shard]

    # ------------------------------------------------------------ handles

    def _handle(self, shard: int) -> ShardHandle:
        if self._pid != os.getpid():  # forked: handles opened by the parent must not be shared
            self._handles.clear()
            self._pid = os.getpid()
        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        handle = open_shard(self.manifest.format, self.path / self.manifest.shards[shard].file)
        self._handles[shard] = handle
        if len(self._handles) > MAX_OPEN_SHARDS:
            self._handles.popitem(last=False)[1].close()
        return handle

    def close(self) -> None:
        """Close the open shard files (reads reopen them as needed)."""
        while self._handles:
            self._handles.popitem()[1].close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state

    def _check_ids(self, row_ids: Any) -> np.ndarray:
        ids = np.asarray(row_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"row_ids must be a 1-d integer array, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row ids must be in [0, {len(self)}), got [{ids.min()}, {ids.max()}]")
        return ids

    def _out_dtype(self, dtype: Any) -> np.dtype:
        return np.dtype(self.manifest.dtype if dtype is None else dtype)


def _chunk_rows(array: Any) -> int:
    chunks = getattr(array, "chunks", None)  # zarr: tuple; h5py: tuple or None (contiguous)
    return int(chunks[0]) if chunks else max(int(array.shape[0]), 1)


def open_store(path: str | Location) -> FeatureStore:
    """Open a complete store for reading; refuses incomplete stores and unknown schema versions.

    At a URL a store is complete exactly when its manifest.json exists (the writer puts it last); one
    being written has only writing.json, and is refused here as incomplete."""
    path = location(path)
    if isinstance(path, StoreURL) and not (path / MANIFEST).is_file() and (path / WRITING).is_file():
        _refuse_incomplete(path, load_manifest(path, WRITING))
    manifest = load_manifest(path)
    if not manifest.complete:
        _refuse_incomplete(path, manifest)
    if not (path / ROWS).is_file():
        raise IncompleteStoreError(f"{path} has a complete manifest but no {ROWS}; delete it and re-encode")
    check_layout(path, manifest)
    return FeatureStore(path, manifest)


def _refuse_incomplete(path: Location, manifest: Manifest) -> None:
    planned = -(-manifest.rows // manifest.shard_size)
    done = sum((path / sidecar_file(i)).exists() for i in range(planned))
    raise IncompleteStoreError(
        f"{path} is an incomplete store ({done} of {planned} shards committed); finish it by rerunning "
        f"`m3jepa encode` with the same settings (it resumes), or delete the directory"
    )


def _warn_unhashed(path: Location) -> None:
    if str(path) in _WARNED_UNHASHED:
        return
    _WARNED_UNHASHED.add(str(path))
    log.warning(
        "store %s was written before rows.jsonl was hashed into its manifest, so edits to its ids, group ids "
        "or captions cannot be detected; refresh it: rerun the `m3jepa encode` command that wrote it with "
        "--force",
        path,
    )


def list_stores(root: str | Location) -> list[tuple[Location, Manifest]]:
    """(path, manifest) of every store under `root` (<dataset>/<split>/<modality>/<encoder>/), sorted.

    A store is found by its manifest.json, so at a URL a store still being written (writing.json only)
    is not listed: its manifest appears last, as the commit marker."""
    out = []
    for manifest_path in sorted(location(root).glob(f"*/*/*/*/{MANIFEST}"), key=str):
        try:
            out.append((manifest_path.parent, load_manifest(manifest_path.parent)))
        except StoreError as e:
            log.warning("skipping %s: %s", manifest_path.parent, e)
    return out


def pad_rows(rows: list[np.ndarray], width: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """B arrays (T_i, width) → right-padded (B, T_max, width) in `dtype` and a (B, T_max) bool mask."""
    longest = max((r.shape[0] for r in rows), default=0)
    states = np.zeros((len(rows), longest, width), dtype=dtype)  # (B, T_max, width)
    mask = np.zeros((len(rows), longest), dtype=bool)  # (B, T_max)
    for i, r in enumerate(rows):
        states[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return states, mask
