"""Stage 1: reader -> encoder -> writer, shard by shard, resumable, and shared among torchrun ranks.

The parts are built separately and handed to a short loop (`run_shards`), as in clip-retrieval's
clip_inference: the reader (`m3jepa.encode.reader`: the stream's records of the pending shards, decoded
into batches ahead of the encoder), the mapper (`m3jepa.encode.mapper`: the encoder's forward pass) and the
writer (`m3jepa.encode.writer`: shard commits on a background thread). Planning is `m3jepa.encode.jobs`;
which rank writes which shard is `m3jepa.encode.plan.shard_owners`.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from m3jepa.config import EncodeConfig, check_machine
from m3jepa.data.records import encoder_modality
from m3jepa.device_table import kind_of
from m3jepa.distributed import ENCODE_BARRIER_TIMEOUT, DistInfo, process_group
from m3jepa.encode.jobs import StoreJob, cache_state, plan_jobs
from m3jepa.encode.mapper import Mapper, load_encoder
from m3jepa.encode.plan import shard_owners
from m3jepa.encode.reader import DecodedShard, decode_shards, read_ahead, shard_works
from m3jepa.encode.summary import EncodeSummary, StoreResult
from m3jepa.encode.writer import DISK_ERRNOS, ShardSink, disk_error_message
from m3jepa.encoders.base import Encoder
from m3jepa.location import remove_tree
from m3jepa.progress import progress
from m3jepa.store.manifest import MANIFEST, WRITING, StoreError, StoreMismatchError, plan_shards
from m3jepa.store.skiplist import read_skip_lists
from m3jepa.store.writer import StoreWriter

log = logging.getLogger(__name__)

# A shard above this many bytes (features plus tokens) is written before the next one is encoded, so
# at most one such shard is held in memory; smaller ones are committed while the next one encodes.
OVERLAP_MAX_BYTES = 256 * 2**20

THREAD_READ_MODALITIES = ("text", "label")  # see reader_workers
BACKGROUND_WRITES = True  # False: commit each shard before encoding the next (the reference, for tests)


def run_encode(cfg: EncodeConfig) -> EncodeSummary:
    """Encode every requested (split, modality) store that is not already complete; see docs/encode.md."""
    check_machine(cfg)  # workers and threads within this machine's ceiling, before any process starts
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # float results depend on the thread count: see docs/encode.md
    with process_group(cfg.device, ENCODE_BARRIER_TIMEOUT) as ctx:
        from m3jepa.data import get_dataset

        dataset = get_dataset(cfg.dataset, cfg.root, seed=cfg.seed, limit=cfg.limit, skip_bad=cfg.skip_bad,
                              rerender=cfg.force, options=cfg.dataset_options())  # --force: SVGs too
        jobs = plan_jobs(cfg, dataset)
        dropped = jobs[0].dropped if jobs else []
        for sample_id, reason in dropped:
            log.warning("dropped while loading %s (--skip-bad): %s: %s", cfg.dataset, sample_id, reason)
        if ctx.is_main and hasattr(dataset, "join_table"):  # VQA: question -> image and answer links
            from m3jepa.data.vqa import write_join_tables

            splits = list(dict.fromkeys(j.split for j in jobs))
            write_join_tables(cfg.store_root, cfg.dataset, dataset, splits)
        # Rank 0's view decides, so all ranks agree on which stores to enter (each store has barriers).
        states = ctx.gather([cache_state(job, cfg) for job in jobs])[0]
        stale = [s for s in states if isinstance(s, str)]
        if stale and not cfg.force:
            more = f" (and {len(stale) - 1} more stale stores)" if len(stale) > 1 else ""
            raise StoreMismatchError(
                f"{stale[0]}{more}; re-encode: rerun this `m3jepa encode` command with --force"
            )
        cached = [s is True and not cfg.force for s in states]
        summary = EncodeSummary(world_size=ctx.world_size, rank=ctx.rank)
        if dropped:
            _note(summary, f"{len(dropped)} item(s) dropped while loading the dataset (named in the log)")
        if all(cached):
            _note(summary, f"all {len(jobs)} stores cached; no encoder loaded")
            log.info("all %d stores cached; no encoder loaded", len(jobs))
            summary.stores = [_cached_result(job) for job in jobs]
            return summary
        summary.stores = list(_encode_jobs(cfg, ctx, jobs, cached))
        return summary


def _note(summary: EncodeSummary, text: str) -> None:
    summary.note = f"{summary.note}\n{text}" if summary.note else text


def _cached_result(job: StoreJob) -> StoreResult:
    from m3jepa.store.manifest import load_manifest

    skipped = len(load_manifest(job.path).skipped)
    return StoreResult(job.split, job.modality, job.spec.name, str(job.path), job.manifest.rows,
                       skipped=skipped, cached=True)


def _encode_jobs(
    cfg: EncodeConfig, ctx: DistInfo, jobs: list[StoreJob], cached: list[bool]
) -> Iterator[StoreResult]:
    from m3jepa.encoders import resolve_device

    device, compute_dtype = resolve_device(cfg.device)
    last_use = {job.spec.name: i for i, job in enumerate(jobs) if not cached[i]}
    encoders: dict[str, Encoder] = {}
    for i, (job, done) in enumerate(zip(jobs, cached, strict=True)):
        if done:
            log.info("cached: %s", job.path)
            yield _cached_result(job)
            continue
        if job.spec.name not in encoders:
            start = time.perf_counter()
            encoders[job.spec.name] = load_encoder(job, cfg, device, compute_dtype)
            log.info("loaded encoder %s on %s in %.1f s", job.spec.name, device, time.perf_counter() - start)
        yield encode_store(job, encoders[job.spec.name], cfg, ctx)
        if last_use[job.spec.name] == i:  # free a large model before loading the next one
            del encoders[job.spec.name]
            gc.collect()


def encode_store(job: StoreJob, encoder: Encoder, cfg: EncodeConfig, ctx: DistInfo) -> StoreResult:
    """Write this rank's pending shards of one store; after a barrier rank 0 finalizes it.

    A full disk or a read-only folder is a StoreError naming the path and what was kept.
    """
    try:
        return _encode_store(job, encoder, cfg, ctx)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise StoreError(disk_error_message(job, e)) from None


def _encode_store(job: StoreJob, encoder: Encoder, cfg: EncodeConfig, ctx: DistInfo) -> StoreResult:
    result = StoreResult(job.split, job.modality, job.spec.name, str(job.path), job.manifest.rows)
    start = time.perf_counter()
    if cfg.force:
        if ctx.is_main and any((job.path / name).is_file() for name in (MANIFEST, WRITING)):
            log.info("--force: removing %s to re-encode it", job.path)
            remove_tree(job.path)
        ctx.barrier()  # no rank opens the store before it is gone
    parts = job.stream.parts() if ctx.world_size > 1 else None  # one process reads every part anyway
    owners = shard_owners(plan_shards(job.manifest.rows, job.manifest.shard_size), parts, ctx.world_size)
    if parts is not None:
        _log_share(job, ctx, parts, owners)
    with StoreWriter(job.path, job.manifest, rank=ctx.rank, world_size=ctx.world_size,
                     owners=owners) as writer:
        done = writer.done_shards()
        mine = writer.my_shards()
        pending = [s for s in mine if s[0] not in done]
        if len(pending) < len(mine):
            log.info("%s: %d of this rank's %d shards already written; resuming",
                     job.path, len(mine) - len(pending), len(mine))
        if pending:
            encode_shards(job, encoder, cfg, writer, pending, result, show=ctx.is_main)
        ctx.barrier()  # every rank's shards are committed
        if ctx.is_main:
            skipped = read_skip_lists(job.path, len(writer.planned_shards()))
            rows = job.rows({s["row_id"] for s in skipped})  # streamed into rows.jsonl
            result.skipped = len(writer.finalize(rows, skipped, job.dropped).skipped)
        ctx.barrier()  # nobody moves on (or exits) before the manifest is complete
    result.seconds = time.perf_counter() - start
    if result.encoded:
        log.info(
            "%s/%s: %d rows in %.1f s (%.1f rows/s): read (waiting for decoded batches) %.1f s, "
            "compute %.1f s, write (on its own thread) %.1f s", job.split, job.modality, result.encoded,
            result.seconds, result.rows_per_s, result.read_s, result.compute_s, result.write_s,
        )
    return result


def _log_share(job: StoreJob, ctx: DistInfo, parts: list[tuple[int, int]], owners: list[int] | None) -> None:
    """One line per rank: the dataset's parts (tar shards) it takes, and its rows and store shards."""
    mine = [p for p in range(len(parts)) if p % ctx.world_size == ctx.rank]
    shards = [i for i, o in enumerate(owners or []) if o == ctx.rank]
    rows = sum(parts[p][1] - parts[p][0] for p in mine)
    log.info("%s/%s: rank %d of %d takes whole parts %s of the dataset's %d (%d rows); writes %d of %d "
             "store shards", job.split, job.modality, ctx.rank, ctx.world_size,
             ", ".join(map(str, mine)) or "none", len(parts), rows, len(shards), len(owners or []))


def encode_shards(
    job: StoreJob, encoder: Encoder, cfg: EncodeConfig, writer: StoreWriter,
    shards: list[tuple[int, int, int]], result: StoreResult, show: bool = True,
) -> None:
    """Encode and commit `shards` (index, row_start, row_end) of one store; batches never cross shards.

    Builds the three parts and runs them: the records of `shards` read in one pass over the stream (a
    shard ahead, on a thread) and decoded ahead of the encoder, the encoder, and the shard commits on a
    background thread. Adds rows encoded, bytes written and read / compute / write seconds to `result`.
    """
    from m3jepa.encoders import resolve_device

    pin = kind_of(resolve_device(cfg.device)[0]).pins  # the device table: page-locked for a GPU's copies
    low = {"auto": None, "low": True, "normal": False}[cfg.decode_priority]  # None: low unless pinning
    works = read_ahead(shard_works(job.stream, shards, cfg.batch_size, job.modality), len(shards))
    workers = reader_workers(job.modality, cfg.workers)
    decoded = decode_shards(works, encoder.preprocessor, job.refused, workers, pin, yield_cpu=low)
    mapper = Mapper(encoder, cfg.kind, cfg.skip_bad, f"{job.split}/{job.modality}")
    try:
        with ShardSink(writer, cfg.kind, BACKGROUND_WRITES, OVERLAP_MAX_BYTES) as sink, progress(
            sum(hi - lo for _, lo, hi in shards), unit="row", desc=f"{job.split}/{job.modality}",
            disable=not show,
        ) as bar:
            run_shards(decoded, mapper, sink, result, bar)
    finally:
        close = getattr(decoded, "close", None)
        if close is not None:
            close()


def run_shards(decoded: Iterable[DecodedShard], mapper: Mapper, sink: ShardSink, result: StoreResult,
               bar: Any = None) -> None:
    """The loop: each decoded shard through the mapper into the sink; what is pending drained at the end."""
    for shard in decoded:
        out = mapper(shard, result, bar)
        _count_writes(result, sink.submit(out))
        result.encoded += shard.work.hi - shard.work.lo
    _count_writes(result, sink.drain())


def reader_workers(modality: str, workers: int) -> int:
    """DataLoader worker processes for a modality: `workers`, except 0 (a reading thread) for cheap inputs.

    Tokenizing a caption costs about 0.1 ms; worker processes (a fork each, a tokenizer loaded in each,
    batches sent back through shared memory) cost more than they hide, so text and labels are read on a
    thread of this process whatever --workers says (measured: bench/encode.py, docs/benchmarks.md).
    """
    return 0 if encoder_modality(modality) in THREAD_READ_MODALITIES else workers


def _count_writes(result: StoreResult, done: list[tuple[int, float]]) -> None:
    for nbytes, seconds in done:
        result.bytes_written += int(nbytes)
        result.write_s += seconds
