"""Stage-1 writing: encoded shards committed to a store (skip list first, then the shard) on a background
thread, and the one-line message when the disk or the folder refuses a write."""

from __future__ import annotations

import errno
from typing import Any

import numpy as np

from m3jepa.encode.jobs import StoreJob
from m3jepa.encode.mapper import ShardOutput
from m3jepa.location import Location
from m3jepa.store.manifest import RAGGED_KINDS
from m3jepa.store.skiplist import write_skip_list
from m3jepa.store.writer import BackgroundWrites, StoreWriter


class ShardSink:
    """Commits ShardOutputs to a StoreWriter in order, each on a background thread while the next one is
    encoded (`threaded` False: inside submit, the plain reference). At most one commit is pending, so at
    most two shards are held; a shard above `overlap_max_bytes` is committed before the next is encoded.
    Leaving the context commits what is pending (also on an error)."""

    def __init__(self, writer: StoreWriter, kind: str, threaded: bool = True,
                 overlap_max_bytes: int = 256 * 2**20):
        self.writer, self.kind, self.overlap_max_bytes = writer, kind, overlap_max_bytes
        self._writes = BackgroundWrites(depth=1, threaded=threaded)

    def submit(self, out: ShardOutput) -> list[tuple[int, float]]:
        """Queue one shard's commit; (bytes on disk, seconds) of the commits that finished meanwhile."""
        done = self._writes.submit(write_shard, self.writer, out, self.kind)
        if out.nbytes > self.overlap_max_bytes:
            done += self._writes.drain()  # a huge shard is written before the next one is allocated
        return done  # type: ignore[return-value]

    def drain(self) -> list[tuple[int, float]]:
        """Wait for the pending commit; (bytes on disk, seconds) of each."""
        return self._writes.drain()  # type: ignore[return-value]

    def __enter__(self) -> ShardSink:
        self._writes.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._writes.__exit__(*exc)


def write_shard(writer: StoreWriter, out: ShardOutput, kind: str) -> int:
    """Commit one shard (its skip list first, so a committed shard always has its list); bytes on disk."""
    write_skip_list(writer.path, out.index, out.skipped)
    if kind in RAGGED_KINDS:
        empty = np.zeros((0, writer.manifest.token_width), dtype=np.float32)
        parts = [t if t is not None else empty for t in out.tokens]  # a skipped row has no tokens
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([p.shape[0] for p in parts])
        info = writer.write_shard(out.index, out.features, np.concatenate(parts), offsets)
    else:
        info = writer.write_shard(out.index, out.features)
    return disk_bytes(writer.path, info)


def disk_bytes(store: Location, info: Any) -> int:
    """Bytes a shard takes on disk (an HDF5 file, or a Zarr folder's files), or in the bucket."""
    if info.files:  # recorded by the writer: sizes of the files it wrote (local or uploaded)
        return sum(size for size, _ in info.files.values())
    path = store / info.file
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# A write that fails with one of these is the disk's or the folder's fault, not the data's: one line.
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the folder is read-only", errno.EACCES: "the folder is not writable",
               errno.EPERM: "the folder is not writable"}


def disk_error_message(job: StoreJob, e: OSError) -> str:
    """One line for a failed store write: the path, the cause, the shards kept and how to go on."""
    from m3jepa.store.manifest import plan_shards, shard_file, sidecar_file

    plan, fmt = plan_shards(job.manifest.rows, job.manifest.shard_size), job.manifest.format
    kept = sum((job.path / sidecar_file(i)).is_file() and (job.path / shard_file(i, fmt)).exists()
               for i, _, _ in plan)
    fix = "free space on it" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    return (f"cannot write {e.filename or job.path}: {DISK_ERRNOS[e.errno]} ({e.strerror}); kept: {kept} of "
            f"{len(plan)} finished shards of {job.path} and every store finished before it; {fix}, then "
            f"rerun the same command: it resumes from the finished shards")
