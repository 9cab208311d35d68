"""Stage-1 reading: a store's pending shards from its record stream, decoded into batches ahead of the
encoder.

Two steps, each tested alone: `shard_works` reads the records of the pending shards in one sequential pass
over the stream (holding one shard at a time) and plans each shard's batches; `decode_shards` decodes and
collates those batches in DataLoader worker processes or on a thread of this process. Either way a batch
holds exactly the rows planned, collated by the preprocessor in the plan's order, so the encoder sees the
same tensors whichever reader made them (tested byte for byte).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.pin_memory import pin_memory

from m3jepa.data.records import BadItemError, Blob, DatasetError, Record, RecordStream, encoder_modality
from m3jepa.encode.plan import batch_order
from m3jepa.prefetch import Prefetcher

log = logging.getLogger(__name__)

THREAD_DEPTH = 2  # batches the reading thread may run ahead of the encoder; 0: none (the plain reference)
RECORD_DEPTH = 1  # shards of records read ahead of decoding, on their own thread (stream I/O)
# Niceness added to the decoding worker processes when the encoder computes on the CPU (see decode_shards).
WORKER_NICENESS = 19


# ---------------------------------------------------------------- records → shards of planned batches


@dataclass
class ShardWork:
    """One store shard to encode: rows [lo, hi), their records and its batches (lists of row ids)."""

    index: int
    lo: int
    hi: int
    records: list[Record]  # rows lo..hi-1, in row order
    batches: list[list[int]]


def shard_batches(records: Sequence[Record], lo: int, batch_size: int, modality: str) -> list[list[int]]:
    """The batches of one shard's rows (ids from `lo`): text sorted by length so a batch pads little
    (character length is known without tokenizing), other modalities consecutive."""
    text = encoder_modality(modality) == "text"
    lengths = [len(r.payload) for r in records] if text else None
    return [[lo + p for p in batch] for batch in batch_order(lengths, len(records), batch_size)]


def shard_works(stream: RecordStream, shards: Sequence[tuple[int, int, int]], batch_size: int,
                modality: str) -> Iterator[ShardWork]:
    """The works of `shards` (index, lo, hi, ascending) from one sequential read of the stream."""
    records = stream.read([(lo, hi) for _, lo, hi in shards], data=True)
    for index, lo, hi in shards:
        part = list(islice(records, hi - lo))
        if [r.row_id for r in part] != list(range(lo, hi)):
            got = f"rows {part[0].row_id}..{part[-1].row_id}" if part else "no rows"
            raise DatasetError(f"reading shard {index} (rows {lo}..{hi - 1}) gave {got}: the dataset "
                               f"changed since the run planned it; rerun the command")
        yield ShardWork(index, lo, hi, part, shard_batches(part, lo, batch_size, modality))


def read_ahead(works: Iterator[ShardWork], count: int, depth: int = RECORD_DEPTH) -> Iterator[ShardWork]:
    """The `count` works of `works`, read up to `depth` shards ahead on a thread (0: as asked for)."""
    if depth == 0 or count == 0:
        yield from islice(works, count)
        return
    with Prefetcher(lambda _: next(works), range(count), depth, name="m3jepa-encode-records") as ahead:
        for _, work in ahead:
            yield work


# ---------------------------------------------------------------- decoding


@dataclass
class Bad:
    """A row the preprocessor refused (BadItemError), passed on as a marker instead of raising."""

    reason: str


@dataclass
class Batch:
    """One planned batch: the good rows' collated inputs and the bad rows' reasons."""

    rows: list[int]  # store row ids of the good items, in batch order
    inputs: Any  # the preprocessor's collated batch, or None when every item was bad
    bad: list[tuple[int, str]] = field(default_factory=list)  # (row id, reason)

    def pin_memory(self) -> Batch:
        """The same batch with its tensors in pinned memory (called by the DataLoader's pinning thread)."""
        return Batch(self.rows, pin_memory(self.inputs), self.bad)


@dataclass
class Task:
    """What a decoder gets: rows and their inputs (a path, a text, a Blob, or Bad); `whole`: collate."""

    rows: list[int]
    inputs: list[str | Blob | Bad]
    whole: bool = True


@dataclass
class DecodedShard:
    """A shard's work and its decoded batches, one per planned batch, in order (consume before the next)."""

    work: ShardWork
    batches: Iterator[Batch]


def task_of(work: ShardWork, rows: list[int], refused: Mapping[int, str]) -> Task:
    """The task of one planned batch: rows in `refused` go as Bad and never reach the preprocessor."""
    inputs = [Bad(refused[r]) if r in refused else work.records[r - work.lo].media() for r in rows]
    return Task(rows, inputs)


def decode_item(preprocessor: Any, item: str | Blob | Bad) -> Any:
    """The preprocessor's tensors for one input, or Bad when it raises BadItemError."""
    if isinstance(item, Bad):
        return item
    try:
        return preprocessor(item)
    except BadItemError as e:
        return Bad(e.reason)


class Collate:
    """Collates the good items of a batch and passes the bad ones through by row id."""

    def __init__(self, preprocessor: Any):
        self.preprocessor = preprocessor

    def __call__(self, items: list[tuple[int, Any]]) -> Batch:
        good = [(i, x) for i, x in items if not isinstance(x, Bad)]
        bad = [(i, x.reason) for i, x in items if isinstance(x, Bad)]
        inputs = self.preprocessor.collate([x for _, x in good]) if good else None
        return Batch([i for i, _ in good], inputs, bad)


class Decode(torch.utils.data.Dataset):
    """Task → a whole batch, collated (a Batch), or a piece of one: its decoded items (a list).

    Runs in the DataLoader workers: the sampler hands each task (rows and their inputs) to a worker, so the
    records are read once, in order, in this process, and never forked into the workers' memory.
    """

    def __init__(self, preprocessor: Any):
        self.preprocessor = preprocessor
        self.collate = Collate(preprocessor)

    def __getitem__(self, task: Task) -> Batch | list[tuple[int, Any]]:  # type: ignore[override]
        pairs = zip(task.rows, task.inputs, strict=True)
        items = [(row, decode_item(self.preprocessor, x)) for row, x in pairs]
        return self.collate(items) if task.whole else items


def split(rows: list[Any], parts: int) -> list[list[Any]]:
    """`rows` cut into at most `parts` consecutive pieces of equal size (the last may be shorter)."""
    size = -(-len(rows) // parts)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def decode_shards(
    works: Iterable[ShardWork], preprocessor: Any, refused: Mapping[int, str], workers: int,
    pin: bool = False, yield_cpu: bool | None = None,
) -> Iterator[DecodedShard]:
    """Each work's batches, decoded by `workers` DataLoader processes, or (0) on a thread of this process.

    One pool serves every shard, so decoding runs ahead across shard ends. The first batch, which nothing
    can overlap, is cut into `workers` pieces decoded at once and collated here; every later batch is
    decoded and collated by one worker, into shared memory, so it reaches this process without a copy.
    With `yield_cpu` (default: unless pinning, i.e. when the encoder computes on the CPU) the workers run
    at WORKER_NICENESS: a forward pass on all cores is a series of multi-threaded ops, each as slow as its
    slowest thread, so a decoder taking a core from one thread stalls them all; at low priority decoding
    runs in the gaps the forward pass leaves (measured: docs/benchmarks.md, section 5). Rows in `refused`
    come back as bad rows with their reason, never preprocessed.
    """
    announced: deque[ShardWork] = deque()  # works whose tasks went out, in order, not yet consumed
    if workers == 0:
        return _thread_shards(works, preprocessor, refused, announced)
    tasks = _Tasks(works, refused, announced, workers)
    nice = WORKER_NICENESS if (not pin if yield_cpu is None else yield_cpu) else 0
    loader = DataLoader(Decode(preprocessor), batch_size=None, sampler=tasks, num_workers=workers,
                        collate_fn=_same, pin_memory=pin, worker_init_fn=_Nice(nice))
    return _grouped(iter(loader), announced, workers, Collate(preprocessor))


class _Tasks:
    """The sampler: each work's tasks in order, the very first batch in pieces; announces each work."""

    def __init__(self, works: Iterable[ShardWork], refused: Mapping[int, str], announced: deque[ShardWork],
                 first_parts: int):
        self.works, self.refused, self.announced, self.first_parts = works, refused, announced, first_parts

    def __iter__(self) -> Iterator[Task]:
        first = True
        for work in self.works:
            self.announced.append(work)
            for rows in work.batches:
                task = task_of(work, rows, self.refused)
                parts = min(self.first_parts, len(rows)) if first else 1
                first = False
                if parts <= 1:
                    yield task
                    continue
                pairs = list(zip(task.rows, task.inputs, strict=True))
                for piece in split(pairs, parts):
                    yield Task([r for r, _ in piece], [x for _, x in piece], whole=False)


def _grouped(results: Iterator[Any], announced: deque[ShardWork], first_parts: int,
             collate: Collate) -> Iterator[DecodedShard]:
    """The decoded tasks regrouped by shard; the first batch reassembled from its pieces and collated."""
    first = True
    while True:
        try:
            head = next(results)
        except StopIteration:
            return
        work = announced.popleft()  # its first task went out before this result came back
        if first:
            pieces = len(split(work.batches[0], min(first_parts, len(work.batches[0]))))
            if pieces > 1:
                head = collate(head + [item for _ in range(pieces - 1) for item in next(results)])
            first = False
        rest = _take(results, len(work.batches) - 1)
        yield DecodedShard(work, _chain(head, rest))
        for _ in rest:  # a consumer that stopped early: drop the shard's remaining batches
            pass


def _take(results: Iterator[Any], n: int) -> Iterator[Any]:
    for _ in range(n):
        yield next(results)


def _chain(head: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield head
    yield from rest


def _thread_shards(works: Iterable[ShardWork], preprocessor: Any, refused: Mapping[int, str],
                   announced: deque[ShardWork]) -> Iterator[DecodedShard]:
    """decode_shards with workers = 0: the tasks decoded up to THREAD_DEPTH batches ahead on one thread.

    Decoding (PIL, numpy, the Rust tokenizer) releases the GIL for most of its time, and the encoder's
    forward pass releases it inside torch ops, so the two overlap without worker processes: no fork, no
    per-process tokenizer load, no tensors sent between processes. With THREAD_DEPTH 0 nothing runs
    ahead: each batch is decoded when asked for (the plain reference).
    """
    decode = Decode(preprocessor)
    tasks = iter(_Tasks(works, refused, announced, first_parts=1))
    if THREAD_DEPTH == 0:
        return _grouped((decode[t] for t in tasks), announced, 1, decode.collate)
    return _ThreadDecoded(decode, tasks, announced)


_END = object()  # the thread's result after the last task


class _ThreadDecoded:
    """Iterates decoded shards whose batches a Prefetcher thread decodes ahead; close() stops it early."""

    def __init__(self, decode: Decode, tasks: Iterator[Task], announced: deque[ShardWork]):
        def make(_: int) -> Any:
            task = next(tasks, None)  # the tasks (and the records behind them) are read on the thread too
            return _END if task is None else decode[task]

        # the number of tasks is not known before the works are read: the thread runs until _END
        self._prefetch = Prefetcher(make, _Forever(), THREAD_DEPTH, name="m3jepa-encode-reader")
        self._shards = _grouped(self._results(), announced, 1, decode.collate)

    def _results(self) -> Iterator[Batch]:
        for _, batch in self._prefetch:
            if batch is _END:
                self._prefetch.close()
                return
            yield batch

    def __iter__(self) -> _ThreadDecoded:
        return self

    def __next__(self) -> DecodedShard:
        try:
            return next(self._shards)
        except StopIteration:
            raise
        except BaseException:  # an unexpected error while decoding: stop the thread, then raise it here
            self.close()
            raise

    def close(self) -> None:
        """Stop the thread without waiting for the rest of the tasks."""
        self._prefetch.close()

    def __del__(self) -> None:
        if getattr(self, "_prefetch", None) is not None:
            self._prefetch.cancel()


class _Forever:
    """range() without an end, for a Prefetcher fed by an iterator (it stops at StopIteration)."""

    def __iter__(self) -> Iterator[int]:
        n = 0
        while True:
            yield n
            n += 1


def _same(x: Any) -> Any:
    return x  # a task's result as it is (the DataLoader's default conversion would walk every item)


class _Nice:
    """worker_init_fn: add `increment` to the worker process's niceness (0: leave it)."""

    def __init__(self, increment: int):
        self.increment = increment

    def __call__(self, worker_id: int) -> None:
        if self.increment:
            os.nice(self.increment)
