"""StoreWriter: commit shards one at a time, resume, and finalize a store, in a local folder or at a URL.

Locally a shard is written under a temporary name and renamed, then its sidecar is written; at a URL
(object storage: no rename) its objects are uploaded under their final keys, then its sidecar. Either way
the sidecar is the shard's commit and the complete manifest the store's (docs/feature-store.md).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from m3jepa.data.records import LineDigest
from m3jepa.location import Location, StoreURL, listing, location, remote_errors, write_lines, write_text
from m3jepa.store.backends import checksum, remove_path, shard_files, write_shard_file
from m3jepa.store.lease import StoreLease
from m3jepa.store.lock import StoreLock
from m3jepa.store.manifest import (
    MANIFEST,
    ROWS,
    SHARDS,
    WRITING,
    IncompleteStoreError,
    Manifest,
    RowMeta,
    ShardInfo,
    StoreError,
    StoreMismatchError,
    assign_shards,
    load_manifest,
    mismatches,
    plan_shards,
    save_manifest,
    shard_file,
    shard_stem,
    sidecar_file,
)

log = logging.getLogger(__name__)


class StoreWriter:
    """Writes the shards of one store; a context manager holding the store's lock for this rank.

    Opening an existing store resumes it when its manifest agrees with `manifest` on every identity
    field and raises StoreMismatchError otherwise. Each rank writes `my_shards()`: shard i goes to rank
    `owners[i]` when `owners` is given (one rank per planned shard, the same on every rank), else to
    rank i % world_size. Rank 0 finalizes.
    """

    def __init__(self, path: str | Location, manifest: Manifest, *, rank: int = 0, world_size: int = 1,
                 owners: Sequence[int] | None = None):
        self.path = location(path)
        self.remote = isinstance(self.path, StoreURL)
        self.manifest = manifest
        self.rank = rank
        self.world_size = world_size
        self._plan = plan_shards(manifest.rows, manifest.shard_size)
        assign_shards(self._plan, rank, world_size)  # validates rank / world_size early
        if owners is not None and (len(owners) != len(self._plan)
                                   or any(not 0 <= o < world_size for o in owners)):
            raise ValueError(f"owners must name one rank in [0, {world_size}) for each of the "
                             f"{len(self._plan)} planned shards, got {len(owners)}")
        self._owners = list(owners) if owners is not None else None
        # a local folder: an flock the OS frees on death; a URL: a lease object with holder and expiry
        self._lock = StoreLease(self.path, rank) if self.remote else StoreLock(self.path, rank)
        # where the start record lives: the incomplete manifest locally, writing.json at a URL, whose
        # manifest.json appears only complete (the commit marker)
        self._start = WRITING if self.remote else MANIFEST

    # ------------------------------------------------------------ lifecycle

    def open(self) -> StoreWriter:
        if not self.remote:
            (self.path / SHARDS).mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._check_or_start()
        except BaseException:
            self._lock.release()
            raise
        return self

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_or_start(self) -> None:
        name = next((n for n in dict.fromkeys((MANIFEST, self._start)) if (self.path / n).is_file()), None)
        if name is not None:
            found = load_manifest(self.path, name)
            diffs = mismatches(self.manifest, found)
            if diffs:
                raise StoreMismatchError(_mismatch_message(self.path, diffs))
            if None not in (found.content, self.manifest.content) and found.content != self.manifest.content:
                # the same rows by id, other inputs: resuming would mix features of the old and new inputs
                raise StoreMismatchError(
                    f"{self.path} was started from other captions or media files than the dataset holds now "
                    f"(its content fingerprint differs); re-encode it: rerun `m3jepa encode` with --force"
                )
            # rank 0 writes the start record, so another rank finds one on a fresh run too: only rank 0's
            # line says "resuming" (the runner names each rank's own resumed shards)
            (log.info if self.rank == 0 else log.debug)(
                "resuming %s (%d of %d shards committed)", self.path, len(self.done_shards()), len(self._plan)
            )
            if self.rank == 0 and not self.remote:
                for tmp in self.path.glob("*.tmp-*"):  # manifest/rows temporaries of a killed rank 0
                    tmp.unlink()
            return
        if self.rank != 0:
            return  # rank 0 alone writes store-level files, so it alone may clear their temporaries
        # Written before any shard so a half-written directory is recognisably an incomplete store.
        start = Manifest.from_json(self.manifest.to_json())
        start.shards, start.skipped, start.complete = [], [], False
        save_manifest(self.path, start, self._start)

    # ------------------------------------------------------------ planning

    def planned_shards(self) -> list[tuple[int, int, int]]:
        """(index, row_start, row_end) of every shard of the store."""
        return list(self._plan)

    def my_shards(self) -> list[tuple[int, int, int]]:
        """The planned shards this rank writes (owners[index] == rank, or index % world_size == rank)."""
        if self._owners is not None:
            return [s for s in self._plan if self._owners[s[0]] == self.rank]
        return assign_shards(self._plan, self.rank, self.world_size)

    def done_shards(self) -> set[int]:
        """Indices of committed shards (sidecar and shard file both present); clears this rank's debris."""
        if self.remote:
            return self._remote_done()
        mine = {i for i, _, _ in self.my_shards()}
        self._remove_stray_tmp(mine)
        done = set()
        for index, start, end in self._plan:
            info = self._read_sidecar(index)
            if info is None or (info.row_start, info.row_end) != (start, end):
                continue
            if (self.path / info.file).exists():
                done.add(index)
        return done

    def _remote_done(self) -> set[int]:
        """At a URL: shards whose sidecar is listed and every file it records is listed at its size (one
        listing; a sidecar is read only for a shard that has one)."""
        listed = listing(self.path)
        done = set()
        for index, start, end in self._plan:
            if sidecar_file(index) not in listed:
                continue
            info = self._read_sidecar(index)
            if info is None or (info.row_start, info.row_end) != (start, end):
                continue
            files = info.files or {}
            if files and all(rel in listed and listed[rel].size == size for rel, (size, _) in files.items()):
                done.add(index)
        return done

    def _remove_stray_tmp(self, mine: set[int]) -> None:
        # Only this rank's shards: another rank may be writing its own temporaries right now.
        for tmp in (self.path / SHARDS).glob("*.tmp-*"):
            stem = tmp.name.split(".", 1)[0]
            if stem.isdigit() and int(stem) in mine:
                log.info("removing leftover %s of an interrupted run", tmp)
                remove_path(tmp)

    def _read_sidecar(self, index: int) -> ShardInfo | None:
        path = self.path / sidecar_file(index)
        try:
            return ShardInfo.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
            return None

    # ------------------------------------------------------------ writing

    def write_shard(
        self,
        index: int,
        features: np.ndarray,
        tokens: np.ndarray | None = None,
        offsets: np.ndarray | None = None,
    ) -> ShardInfo:
        """Validate, write and commit shard `index`; features (n, D), tokens (sum T_i, D), offsets (n+1,)."""
        if not self._lock.held:
            raise StoreError(
                f"{self.path}: open the StoreWriter (use it as a context manager) before writing"
            )
        if not 0 <= index < len(self._plan):
            raise ValueError(f"shard {index} is not planned; the store has {len(self._plan)} shards")
        _, start, end = self._plan[index]
        arrays = self._validated(index, end - start, features, tokens, offsets)
        digest, nbytes = checksum(arrays)
        info = ShardInfo(
            index=index,
            row_start=start,
            row_end=end,
            file=shard_file(index, self.manifest.format),
            sha256=digest,
            nbytes=nbytes,
            tokens=int(arrays["tokens"].shape[0]) if "tokens" in arrays else None,
        )
        final = self.path / info.file
        # Uncommit first, so a crash anywhere below leaves this shard "not done" rather than stale.
        (self.path / sidecar_file(index)).unlink(missing_ok=True)
        if self.remote:
            self._upload_shard(info, arrays)
        else:
            remove_path(final)
            tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
            remove_path(tmp)
            write_shard_file(self.manifest.format, tmp, arrays)
            info.files = shard_files(tmp, info.file)
            os.replace(tmp, final)
        self._lock.check()  # a writer that lost its lease must not commit (a URL's lease; an flock holds)
        sidecar = json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n"
        write_text(self.path / sidecar_file(index), sidecar)
        log.debug("committed shard %s of %s (%d rows)", shard_stem(index), self.path, end - start)
        return info

    def _upload_shard(self, info: ShardInfo, arrays: dict[str, np.ndarray]) -> None:
        """Write the shard to a local temporary folder, record its files' sizes and MD5s, and upload each
        file to its final key (one PUT each: an object is whole or absent). Objects under the shard's key
        that the new shard does not have (debris of another attempt) are deleted first."""
        final = self.path / info.file
        with tempfile.TemporaryDirectory(prefix="m3jepa-shard-") as tmp:
            local = Path(tmp) / final.name
            write_shard_file(self.manifest.format, local, arrays)
            info.files = shard_files(local, info.file)
            fs = final.fs
            with remote_errors(final):
                stale = set(listing(final)) - {rel.removeprefix(info.file).lstrip("/") for rel in info.files}
                if stale:
                    fs.rm([(final / rel).key if rel else final.key for rel in sorted(stale)])
                sources = [str(Path(tmp) / rel.removeprefix(f"{SHARDS}/")) for rel in info.files]
                fs.put(sources, [(self.path / rel).key for rel in info.files])

    def _validated(self, index, n, features, tokens, offsets) -> dict[str, np.ndarray]:
        m, where = self.manifest, f"{self.path} shard {shard_stem(index)}"
        features = _cast(np.asarray(features), m.dtype, "features", where)
        if features.shape != (n, m.dim):
            raise ValueError(f"{where}: features have shape {features.shape}, expected ({n}, {m.dim})")
        arrays = {"features": features}
        if m.kind == "pooled":
            if tokens is not None or offsets is not None:
                raise ValueError(f"{where}: tokens/offsets given but the store's kind is 'pooled'")
            return arrays
        if tokens is None or offsets is None:
            raise ValueError(f"{where}: kind {m.kind!r} needs tokens (sum T_i, D) and offsets (n+1,)")
        tokens = _cast(np.asarray(tokens), m.dtype, "tokens", where)
        offsets = np.asarray(offsets)
        if tokens.ndim != 2 or tokens.shape[1] != m.token_width:
            raise ValueError(f"{where}: tokens have shape {tokens.shape}, expected (T, {m.token_width})")
        if offsets.shape != (n + 1,) or not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(
                f"{where}: offsets must be {n + 1} integers, got {offsets.dtype} {offsets.shape}"
            )
        if offsets[0] != 0 or offsets[-1] != tokens.shape[0] or np.any(np.diff(offsets) < 0):
            raise ValueError(f"{where}: offsets must rise from 0 to len(tokens)={tokens.shape[0]}")
        arrays["tokens"] = tokens
        arrays["offsets"] = offsets.astype(np.int64)
        return arrays

    # ------------------------------------------------------------ finishing

    def finalize(
        self, rows: Iterable[RowMeta], skipped: list[dict], dropped: list[tuple[str, str]] = ()
    ) -> Manifest:
        """Rank 0, after every rank is done: check all shards, write rows.jsonl and the complete manifest.

        `rows` may be a stream (one row at a time: rows.jsonl is written as they come, checked on the way).
        `dropped` are (sample_id, reason) of items the dataset left out while loading (no row of their own).
        """
        if self.rank != 0:
            raise StoreError(f"{self.path}: only rank 0 finalizes a store (this is rank {self.rank})")
        missing = sorted({i for i, _, _ in self._plan} - self.done_shards())
        if missing:
            raise IncompleteStoreError(
                f"{self.path}: cannot finalize, {len(missing)} of {len(self._plan)} shards are not "
                f"committed (first: {', '.join(shard_stem(i) for i in missing[:5])})"
            )
        skipped = sorted(skipped, key=lambda s: int(s["row_id"]))
        lines = self._checked_lines(rows, {int(s["row_id"]) for s in skipped})
        digest = write_lines(self.path / ROWS, lines)
        final = Manifest.from_json(self.manifest.to_json())
        final.rows_sha256 = digest  # of rows.jsonl's bytes, checked whenever the rows are read
        final.shards = [self._read_sidecar(i) for i, _, _ in self._plan]
        final.skipped = [
            {"row_id": int(s["row_id"]), "sample_id": str(s["sample_id"]), "reason": str(s["reason"])}
            for s in skipped
        ]
        final.dropped = [{"sample_id": str(i), "reason": str(r)} for i, r in dropped]
        final.complete = True
        self._lock.check()
        save_manifest(self.path, final)  # the store's commit: at a URL it is invisible until this PUT
        if self.remote:
            (self.path / WRITING).unlink(missing_ok=True)
        self.manifest = final
        log.info(
            "finalized %s: %d rows in %d shards, %d skipped",
            self.path,
            final.rows,
            len(final.shards),
            len(final.skipped),
        )
        return final

    def _checked_lines(self, rows: Iterable[RowMeta], skipped_ids: set[int]) -> Iterator[str]:
        """rows.jsonl's lines, each row checked as it passes; the count and membership checked at the end."""
        m, members, n = self.manifest, LineDigest(), 0
        for i, r in enumerate(rows):
            n += 1
            if i >= m.rows:
                raise ValueError(f"{self.path}: finalize got more than the {m.rows} rows the manifest plans")
            if r.row_id != i:
                raise ValueError(
                    f"{self.path}: rows must be in row order; position {i} has row_id {r.row_id}"
                )
            if r.valid == (i in skipped_ids):
                raise ValueError(
                    f"{self.path}: row {i} ({r.sample_id}) is valid={r.valid} but "
                    f"{'is' if i in skipped_ids else 'is not'} listed as skipped"
                )
            members.add(r.sample_id)
            yield r.dumps() + "\n"
        if n != m.rows:
            raise ValueError(f"{self.path}: finalize got {n} rows, the manifest plans {m.rows}")
        if members.hexdigest() != m.membership:
            raise ValueError(f"{self.path}: the rows' sample ids do not match the manifest's membership")


class BackgroundWrites:
    """Runs shard commits on one background thread, in submission order, off the encoder's critical path.

    At most `depth` commits wait or run at once: submit() first waits for the oldest when that many are
    pending, so memory stays bounded (each pending commit holds its shard's arrays). An error in a commit
    is raised in the caller's thread by the submit() or drain() that collects it. Leaving the context
    drains what is pending, also on an error, so every fully encoded shard is committed as it would have
    been without the thread, and the store's lock is held until its last write ends.
    """

    def __init__(self, depth: int = 1, threaded: bool = True):
        if depth < 1:
            raise ValueError(f"depth={depth} must be at least 1")
        self.depth = depth
        self.threaded = threaded  # False: every commit runs inside submit() (the plain reference)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3jepa-store-write")
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable[..., object], *args: object) -> list[tuple[object, float]]:
        """Queue fn(*args); returns the (result, seconds) of the commits that finished meanwhile, in order."""
        if not self.threaded:
            return [_timed(fn, *args)]
        done = []
        while len(self._pending) >= self.depth:
            done.append(self._pending.popleft().result())
        self._pending.append(self._pool.submit(_timed, fn, *args))
        return done

    def drain(self) -> list[tuple[object, float]]:
        """Wait for every pending commit; (result, seconds) of each, in submission order."""
        done = []
        while self._pending:
            done.append(self._pending.popleft().result())
        return done

    def __enter__(self) -> BackgroundWrites:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is not None:  # keep the first error; still finish the commits already queued
                for future in self._pending:
                    future.exception()
                self._pending.clear()
            else:
                self.drain()
        finally:
            self._pool.shutdown(wait=True)


def _timed(fn: Callable[..., object], *args: object) -> tuple[object, float]:
    tick = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - tick


def is_complete(path: str | Location, expected: Manifest) -> bool:
    """True when `path` holds a complete store whose identity fields all equal `expected`'s."""
    path = location(path)
    try:
        found = load_manifest(path)
    except StoreError:
        return False
    return found.complete and not mismatches(expected, found) and (path / ROWS).is_file()


def _cast(array: np.ndarray, dtype: str, name: str, where: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{where}: {name} must be floating point, got {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{where}: {name} contain NaN or inf; the encoder produced invalid values")
    with np.errstate(over="ignore"):  # overflow is reported below, with the fix
        out = array.astype(dtype, copy=False)
    if dtype == "float16" and not np.all(np.isfinite(out)):
        raise ValueError(f"{where}: {name} overflow float16 (|x| > 65504); write the store as float32")
    return out


def _mismatch_message(path: Location, diffs: list[tuple[str, object, object]]) -> str:
    lines = "; ".join(f"{k}: asked {a!r}, found {f!r}" for k, a, f in diffs)
    remote = isinstance(path, StoreURL)
    delete = f"`m3jepa encode ... --force` (it deletes {path})" if remote else f"rm -r {path}"
    return (
        f"{path} already holds a store written with different settings ({lines}). Its shards cannot be "
        f"mixed with new ones: delete the store directory ({delete}) to re-encode it, or pass a "
        f"different --store-root"
    )
