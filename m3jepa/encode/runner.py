"""Stage 1: reader -> encoder -> writer, shard by shard, resumable, and shared among torchrun ranks."""

from __future__ import annotations

import errno
import gc
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3jepa.config import EncodeConfig, check_machine
from m3jepa.data.records import (
    BadItemError,
    DatasetError,
    Record,
    content_digest,
    encoder_modality,
    membership_fingerprint,
    row_fingerprint,
)
from m3jepa.distributed import ENCODE_BARRIER_TIMEOUT, DistInfo, process_group
from m3jepa.encode.plan import batch_order
from m3jepa.encode.reader import Batch, read_batches
from m3jepa.encode.summary import EncodeSummary, StoreResult
from m3jepa.encoders.base import Encoder, EncoderError, EncoderSpec
from m3jepa.files import atomic_write_text
from m3jepa.progress import progress
from m3jepa.store.manifest import (
    FOLDER_DATASETS,
    RAGGED_KINDS,
    SHARDS,
    Manifest,
    StoreError,
    StoreMismatchError,
    resolved_root,
    rows_from_records,
    shard_stem,
    store_variant,
)
from m3jepa.store.writer import BackgroundWrites

log = logging.getLogger(__name__)

# A shard above this many bytes (features plus tokens) is written before the next one is encoded, so
# at most one such shard is held in memory; smaller ones are committed while the next one encodes.
OVERLAP_MAX_BYTES = 256 * 2**20

THREAD_READ_MODALITIES = ("text", "label")  # see reader_workers
BACKGROUND_WRITES = True  # False: commit each shard before encoding the next (the reference, for tests)

SKIP_HINT = "pass --skip-bad to write it as an invalid zero row and list it in the manifest's skipped"


@dataclass
class StoreJob:
    """One store to make: a split and modality, its records, its encoder spec and expected manifest."""

    split: str
    modality: str
    records: list[Record]
    spec: EncoderSpec
    path: Path
    manifest: Manifest
    dropped: list[tuple[str, str]] = field(default_factory=list)  # dataset-level drops (--skip-bad)
    refused: dict[int, str] = field(default_factory=dict)  # row -> reason: rows refused before reading
    content: list[str] | None = None  # each row's content fingerprint (records.row_fingerprint)


def run_encode(cfg: EncodeConfig) -> EncodeSummary:
    """Encode every requested (split, modality) store that is not already complete; see docs/encode.md."""
    check_machine(cfg)  # workers and threads within this machine's ceiling, before any process starts
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # float results depend on the thread count: see docs/encode.md
    with process_group(cfg.device, ENCODE_BARRIER_TIMEOUT) as ctx:
        from m3jepa.data import get_dataset

        dataset = get_dataset(cfg.dataset, cfg.root, seed=cfg.seed, limit=cfg.limit, skip_bad=cfg.skip_bad,
                              rerender=cfg.force)  # --force renders SVGs again too
        dropped = list(getattr(dataset, "skipped", []))
        for sample_id, reason in dropped:
            log.warning("dropped while loading %s (--skip-bad): %s: %s", cfg.dataset, sample_id, reason)
        jobs = plan_jobs(cfg, dataset)
        if ctx.is_main and hasattr(dataset, "join_table"):  # VQA: question -> image and answer links
            from m3jepa.data.vqa import write_join_tables

            splits = list(dict.fromkeys(j.split for j in jobs))
            write_join_tables(cfg.store_root, cfg.dataset, dataset, splits)
        # Rank 0's view decides, so all ranks agree on which stores to enter (each store has barriers).
        states = ctx.gather([_cache_state(job, cfg) for job in jobs])[0]
        stale = [s for s in states if isinstance(s, str)]
        if stale and not cfg.force:
            more = f" (and {len(stale) - 1} more stale stores)" if len(stale) > 1 else ""
            raise StoreMismatchError(
                f"{stale[0]}{more}; re-encode: rerun this `m3jepa encode` command with --force"
            )
        cached = [s is True and not cfg.force for s in states]
        summary = EncodeSummary(world_size=ctx.world_size)
        if dropped:
            _note(summary, f"{len(dropped)} item(s) dropped while loading the dataset (named in the log)")
        if all(cached):
            _note(summary, f"all {len(jobs)} stores cached; no encoder loaded")
            log.info("all %d stores cached; no encoder loaded", len(jobs))
            summary.stores = [_cached_result(job) for job in jobs]
            return summary
        summary.stores = list(_encode_jobs(cfg, ctx, jobs, cached))
        return summary


def plan_jobs(cfg: EncodeConfig, dataset: Any) -> list[StoreJob]:
    """The stores a config asks for, grouped by modality so each encoder is loaded once; no weights read."""
    from m3jepa.store import store_path

    splits = dataset.splits() if cfg.splits == ["all"] else list(cfg.splits)
    # a folder dataset is named by its folder (store_path), and the manifest says which folder it was
    data_root = str(resolved_root(cfg.root)) if cfg.dataset in FOLDER_DATASETS and cfg.root else None
    jobs = []
    for modality in _modalities(cfg, dataset):
        spec = _spec(cfg, modality, dataset)
        prefix = _prefix_fields(cfg, spec)
        for split in splits:
            records, refused = screen_text(cfg, split, modality, dataset.records(split, modality))
            content = [row_fingerprint(r, cfg.content_hash) for r in records]
            manifest = Manifest(
                dataset=cfg.dataset, split=split, modality=modality,
                membership=membership_fingerprint(records), rows=len(records), encoder=spec.name,
                encoder_revision=spec.revision, pooling=spec.pooling, layers=spec.layers, dim=spec.dim,
                dtype=cfg.dtype, kind=cfg.kind, format=cfg.format, shard_size=cfg.shard_size, **prefix,
                content=content_digest(content), content_hash=cfg.content_hash, data_root=data_root,
            )
            variant = store_variant(cfg.kind, cfg.tunable_layers)
            path = store_path(cfg.store_root, cfg.dataset, split, modality, spec.name, variant, cfg.root)
            dropped = list(getattr(dataset, "skipped", []))
            jobs.append(StoreJob(split, modality, records, spec, path, manifest, dropped, refused, content))
    return jobs


def text_problem(text: str) -> str | None:
    """Why `text` cannot be tokenized, or None: a lone surrogate (U+D800..U+DFFF) is no character."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        # ascii() so the message itself can be printed: a lone surrogate cannot be written to a terminal
        return (f"text holds a lone surrogate {ascii(text[e.start])} at character {e.start}, which is not a "
                f"character (an undecodable byte read with errors='surrogateescape', or a JSON \\u escape)")


def screen_text(
    cfg: EncodeConfig, split: str, modality: str, records: list[Record]
) -> tuple[list[Record], dict[int, str]]:
    """Check every text row once, before anything tokenizes it; (records, {row: reason} of refused rows).

    Without --skip-bad a bad row is a BadItemError naming the dataset, split and sample id. With it, the
    row stays (row ids and membership unchanged) with its text escaped (so rows.jsonl can be written) and
    is refused by the reader: a zero row, valid = false, listed in the manifest's skipped.
    """
    if encoder_modality(modality) != "text":
        return records, {}
    refused = {r.row_id: why for r in records if (why := text_problem(r.payload)) is not None}
    if refused and not cfg.skip_bad:
        row = min(refused)
        raise BadItemError(f"{cfg.dataset} {split}/{modality} {records[row].sample_id}",
                           f"{refused[row]}; fix the text in the dataset, or {SKIP_HINT} "
                           f"({len(refused)} such row(s) in {split}/{modality})")

    def escaped(r: Record) -> Record:
        return replace(r, payload=r.payload.encode("utf-8", "backslashreplace").decode("utf-8"))

    return [escaped(r) if r.row_id in refused else r for r in records], refused


def _prefix_fields(cfg: EncodeConfig, spec: EncoderSpec) -> dict[str, Any]:
    # kind = prefix: where the encoder is cut, from its config alone (no weights are read at planning)
    if cfg.kind != "prefix":
        return {}
    from m3jepa.encoders.layers import stack_geometry

    g = stack_geometry(spec, cfg.tunable_layers)
    return {"layer_index": g.layer_index, "tunable_layers": g.tunable_layers, "state_dim": g.state_dim,
            "state_grid": list(g.state_grid) if g.state_grid else None}


def _load_encoder(job: StoreJob, cfg: EncodeConfig, device: torch.device, dtype: torch.dtype) -> Encoder:
    """The job's encoder; for kind = prefix seen through its layer stack, checked against the manifest."""
    encoder = job.spec.factory(device, dtype)
    if cfg.kind != "prefix":
        return encoder
    from m3jepa.encoders.layers import PrefixEncoder, StackGeometry

    wrapped = PrefixEncoder(encoder, cfg.tunable_layers)
    m = job.manifest
    planned = StackGeometry(m.layer_index, m.tunable_layers, m.state_dim,  # type: ignore[arg-type]
                            tuple(m.state_grid) if m.state_grid else None)  # type: ignore[arg-type]
    if wrapped.stack.geometry != planned:
        raise EncoderError(f"{job.spec.name}: the loaded model's layer stack {wrapped.stack.geometry} "
                           f"disagrees with the one planned from its config, {planned}")
    return wrapped


def _modalities(cfg: EncodeConfig, dataset: Any) -> list[str]:
    if cfg.modalities != ["all"]:
        from m3jepa.data import closest

        has = dataset.modalities()
        for m in cfg.modalities:
            if m not in has:
                raise DatasetError(f"{cfg.dataset} has no modality {m!r}{closest(m, has)}; "
                                   f"pass --modality with some of {', '.join(has)} (comma-separated), or all")
        return list(cfg.modalities)
    # "all" means every modality the dataset has and an encoder exists for (tuxpaint's sounds need
    # --audio-encoder; there is no default audio encoder offline).
    out = [m for m in dataset.modalities() if _encoder_name(cfg, m) is not None]
    left = [m for m in dataset.modalities() if m not in out]
    if left:
        log.info("--modality all: skipping %s (no encoder; pass --%s-encoder)", ", ".join(left), left[0])
    return out


def _encoder_name(cfg: EncodeConfig, modality: str) -> str | None:
    from m3jepa.data import DEFAULT_ENCODERS

    # a question/answer store takes encode.text_encoder when set (there is no question_encoder key)
    chosen = getattr(cfg, f"{modality}_encoder", None)
    chosen = chosen or getattr(cfg, f"{encoder_modality(modality)}_encoder", None)
    return chosen or DEFAULT_ENCODERS.get(cfg.dataset, {}).get(modality)


def _spec(cfg: EncodeConfig, modality: str, dataset: Any) -> EncoderSpec:
    from m3jepa.encoders import get_encoder_spec

    name = _encoder_name(cfg, modality)
    if name is None:
        raise DatasetError(f"{cfg.dataset} has no default {modality} encoder; pass --{modality}-encoder")
    spec = get_encoder_spec(name)
    if spec.modality == "label":  # a label encoder's dimension is the dataset's class count
        from m3jepa.encoders.onehot import bind_to_dataset

        spec = bind_to_dataset(spec, dataset)
    if spec.modality != encoder_modality(modality):  # a question store takes a text encoder (docs/vqa.md)
        raise EncoderError(
            f"encoder {name!r} encodes {spec.modality}, not {encoder_modality(modality)}; pass a "
            f"{encoder_modality(modality)} encoder with --{encoder_modality(modality)}-encoder"
        )
    return spec


def _cache_state(job: StoreJob, cfg: EncodeConfig) -> bool | str:
    """True: complete and current (cached); False: to encode (absent, unfinished or --force); a str: the
    line saying why a complete store is stale (its rows' captions or media files changed)."""
    from m3jepa.store import is_complete
    from m3jepa.store.manifest import load_manifest
    from m3jepa.store.staleness import stale_reason

    if not is_complete(job.path, job.manifest):
        return False
    found = load_manifest(job.path)
    if found.content is None:
        log.warning("%s was written without content fingerprints, so edited captions or replaced media "
                    "files are not detected; rerun with --force to re-encode it and record them", job.path)
        return True
    rows = rows_from_records(job.records, content=job.content)
    return stale_reason(job.path, found, rows, cfg.content_hash) or True


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
            encoders[job.spec.name] = _load_encoder(job, cfg, device, compute_dtype)
            log.info("loaded encoder %s on %s in %.1f s", job.spec.name, device, time.perf_counter() - start)
        yield encode_store(job, encoders[job.spec.name], cfg, ctx)
        if last_use[job.spec.name] == i:  # free a large model before loading the next one
            del encoders[job.spec.name]
            gc.collect()


# A write that fails with one of these is the disk's or the folder's fault, not the data's: one line.
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the folder is read-only", errno.EACCES: "the folder is not writable",
               errno.EPERM: "the folder is not writable"}


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


def _encode_store(job: StoreJob, encoder: Encoder, cfg: EncodeConfig, ctx: DistInfo) -> StoreResult:
    from m3jepa.store import StoreWriter

    result = StoreResult(job.split, job.modality, job.spec.name, str(job.path), job.manifest.rows)
    start = time.perf_counter()
    if cfg.force:
        if ctx.is_main and (job.path / "manifest.json").is_file():
            log.info("--force: removing %s to re-encode it", job.path)
            shutil.rmtree(job.path)
        ctx.barrier()  # no rank opens the store before it is gone
    with StoreWriter(job.path, job.manifest, rank=ctx.rank, world_size=ctx.world_size) as writer:
        done = writer.done_shards()
        pending = [s for s in writer.my_shards() if s[0] not in done]
        if len(pending) < len(writer.my_shards()):
            log.info("%s: %d of this rank's %d shards already written; resuming",
                     job.path, len(writer.my_shards()) - len(pending), len(writer.my_shards()))
        if pending:
            encode_shards(job, encoder, cfg, writer, pending, result, show=ctx.is_main)
        ctx.barrier()  # every rank's shards are committed
        if ctx.is_main:
            skipped = read_skip_lists(job.path, len(writer.planned_shards()))
            rows = rows_from_records(job.records, {s["row_id"] for s in skipped}, job.content)
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


# ---------------------------------------------------------------- encoding and writing shards


def encode_shards(
    job: StoreJob, encoder: Encoder, cfg: EncodeConfig, writer: Any, shards: list[tuple[int, int, int]],
    result: StoreResult, show: bool = True,
) -> None:
    """Encode and commit `shards` (index, row_start, row_end) of one store; batches never cross shards.

    Batches are decoded ahead of the encoder (`read_batches`) and each shard is committed on a background
    thread while the next one is encoded (`BackgroundWrites`). Adds rows encoded, bytes written and
    read / compute / write seconds to `result` (write seconds are spent on that thread).
    """
    plans = [(index, lo, hi, _shard_batches(job, lo, hi, cfg.batch_size)) for index, lo, hi in shards]
    pin = cfg.device != "cpu" and torch.cuda.is_available()
    plan = [batch for *_, batches in plans for batch in batches]
    low = {"auto": None, "low": True, "normal": False}[cfg.decode_priority]  # None: low unless pinning
    batches = read_batches(job.records, encoder.preprocessor, plan, reader_workers(job.modality, cfg.workers),
                           pin, yield_cpu=low, refused=job.refused)
    try:
        with BackgroundWrites(depth=1, threaded=BACKGROUND_WRITES) as writes, progress(
            sum(hi - lo for _, lo, hi, _ in plans), unit="row", desc=f"{job.split}/{job.modality}",
            disable=not show,
        ) as bar:
            for index, lo, hi, shard_batches in plans:
                features, tokens, skipped = _encode_shard(job, encoder, cfg, batches, lo, hi, shard_batches,
                                                          result, bar)
                done = writes.submit(_write_shard, writer, job, index, features, tokens, skipped, cfg.kind)
                if _nbytes(features, tokens) > OVERLAP_MAX_BYTES:
                    done += writes.drain()  # a huge shard is written before the next one is allocated
                _count_writes(result, done)
                result.encoded += hi - lo
            _count_writes(result, writes.drain())
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def reader_workers(modality: str, workers: int) -> int:
    """DataLoader worker processes for a modality: `workers`, except 0 (a reading thread) for cheap inputs.

    Tokenizing a caption costs about 0.1 ms; worker processes (a fork each, a tokenizer loaded in each,
    batches sent back through shared memory) cost more than they hide, so text and labels are read on a
    thread of this process whatever --workers says (measured: bench/encode.py, docs/benchmarks.md).
    """
    return 0 if encoder_modality(modality) in THREAD_READ_MODALITIES else workers


def _encode_shard(
    job: StoreJob, encoder: Encoder, cfg: EncodeConfig, batches: Iterator[Batch], lo: int, hi: int,
    shard_batches: list[list[int]], result: StoreResult, bar: Any,
) -> tuple[np.ndarray, list[np.ndarray | None], list[dict[str, Any]]]:
    """Features (n, D), per-row tokens and skipped rows of one shard, from its planned batches."""
    features = np.zeros((hi - lo, job.spec.dim), dtype=np.float32)  # (n, D); bad rows stay zero
    tokens: list[np.ndarray | None] = [None] * (hi - lo)
    skipped: list[dict[str, Any]] = []
    for _ in shard_batches:
        tick = time.perf_counter()
        batch = next(batches)
        result.read_s += time.perf_counter() - tick
        skipped += _bad_rows(job, batch, cfg.skip_bad)
        if batch.rows:
            tick = time.perf_counter()
            _encode_batch(encoder, batch, cfg.kind, lo, features, tokens)
            result.compute_s += time.perf_counter() - tick
        bar.update(len(batch.rows) + len(batch.bad))
    return features, tokens, skipped


def _nbytes(features: np.ndarray, tokens: list[np.ndarray | None]) -> int:
    return features.nbytes + sum(t.nbytes for t in tokens if t is not None)


def _count_writes(result: StoreResult, done: list[tuple[object, float]]) -> None:
    for nbytes, seconds in done:
        result.bytes_written += int(nbytes)  # type: ignore[call-overload]
        result.write_s += seconds


def _shard_batches(job: StoreJob, lo: int, hi: int, batch_size: int) -> list[list[int]]:
    # Text is sorted by length so a batch pads little; character length is known without tokenizing.
    text = encoder_modality(job.modality) == "text"
    lengths = [len(r.payload) for r in job.records[lo:hi]] if text else None
    return [[lo + p for p in batch] for batch in batch_order(lengths, hi - lo, batch_size)]


def _bad_rows(job: StoreJob, batch: Batch, skip_bad: bool) -> list[dict[str, Any]]:
    out = []
    for row, reason in batch.bad:
        record = job.records[row]
        if not skip_bad:
            # Raised before this shard is written: the committed shards stay, so a rerun resumes.
            where = f"{job.split}/{job.modality} row {row}"
            raise BadItemError(record.sample_id, f"{reason} ({where}); {SKIP_HINT}")
        log.warning("skipping %s (%s/%s row %d): %s", record.sample_id, job.split, job.modality, row, reason)
        out.append({"row_id": row, "sample_id": record.sample_id, "reason": reason})
    return out


def _encode_batch(encoder: Encoder, batch: Batch, kind: str, lo: int, features: np.ndarray,
                  tokens: list[np.ndarray | None]) -> None:
    with torch.inference_mode():
        out = encoder.encode(batch.inputs, kind)
    positions = [row - lo for row in batch.rows]  # batch order → shard positions (restores row order)
    features[positions] = out.pooled.float().cpu().numpy()  # (b, D)
    if kind in RAGGED_KINDS:
        for p, t in zip(positions, out.tokens, strict=True):
            tokens[p] = t.float().cpu().numpy()  # (T_i, D) or, for prefix, (T_i, D_state)


def _write_shard(writer: Any, job: StoreJob, index: int, features: np.ndarray,
                 tokens: list[np.ndarray | None], skipped: list[dict[str, Any]], kind: str) -> int:
    # The skip list is written before the shard commits, so a committed shard always has its list.
    write_skip_list(job.path, index, skipped)
    if kind in RAGGED_KINDS:
        empty = np.zeros((0, job.manifest.token_width), dtype=np.float32)
        parts = [t if t is not None else empty for t in tokens]  # a skipped row has no tokens
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([p.shape[0] for p in parts])
        info = writer.write_shard(index, features, np.concatenate(parts), offsets)
    else:
        info = writer.write_shard(index, features)
    return _disk_bytes(job.path / info.file)


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------- skip lists (one per shard)


def skip_list_path(store: Path, index: int) -> Path:
    """`shards/<index>.skipped.json`: the rows of shard `index` that were skipped (only when any were)."""
    return Path(store) / SHARDS / f"{shard_stem(index)}.skipped.json"


def write_skip_list(store: Path, index: int, skipped: list[dict[str, Any]]) -> None:
    """Record (or clear) shard `index`'s skipped rows; read back by rank 0 when it finalizes."""
    path = skip_list_path(store, index)
    if skipped:
        atomic_write_text(path, json.dumps(skipped, indent=2, sort_keys=True) + "\n")
    else:
        path.unlink(missing_ok=True)  # a list from an earlier attempt at this shard must not linger


def read_skip_lists(store: Path, num_shards: int) -> list[dict[str, Any]]:
    """Every shard's skipped rows, in row order: what each rank (in this run or an earlier one) skipped."""
    out: list[dict[str, Any]] = []
    for index in range(num_shards):
        path = skip_list_path(store, index)
        if path.is_file():
            out += json.loads(path.read_text(encoding="utf-8"))
    return sorted(out, key=lambda s: s["row_id"])
