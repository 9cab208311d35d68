"""Stage-1 reading: decoded, collated batches from DataLoader worker processes or a thread of this process.

Either way a batch holds exactly the rows the runner planned, collated by the preprocessor in row order
of the plan, so the encoder sees the same tensors whichever reader made them (tested byte for byte).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.pin_memory import pin_memory

from m3jepa.data.records import BadItemError, Record
from m3jepa.prefetch import Prefetcher

log = logging.getLogger(__name__)

THREAD_DEPTH = 2  # batches the reading thread may run ahead of the encoder
# Niceness added to the decoding worker processes when the encoder computes on the CPU (see read_batches).
WORKER_NICENESS = 19


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


class Items(torch.utils.data.Dataset):
    """Row i → (i, tensors) or (i, Bad); runs in the DataLoader workers, so bad items become markers.

    Rows in `refused` (row → reason, found before reading) are Bad without reaching the preprocessor.
    """

    def __init__(self, records: Sequence[Record], preprocessor: Any,
                 refused: Mapping[int, str] | None = None):
        self.records = records
        self.preprocessor = preprocessor
        self.refused = dict(refused or {})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        if i in self.refused:
            return i, Bad(self.refused[i])
        try:
            return i, self.preprocessor(self.records[i].payload)
        except BadItemError as e:
            return i, Bad(e.reason)


class Collate:
    """Collates the good items of a batch and passes the bad ones through by row id."""

    def __init__(self, preprocessor: Any):
        self.preprocessor = preprocessor

    def __call__(self, items: list[tuple[int, Any]]) -> Batch:
        good = [(i, x) for i, x in items if not isinstance(x, Bad)]
        bad = [(i, x.reason) for i, x in items if isinstance(x, Bad)]
        inputs = self.preprocessor.collate([x for _, x in good]) if good else None
        return Batch([i for i, _ in good], inputs, bad)


def decode_batch(items: Items, collate: Collate, rows: Sequence[int]) -> Batch:
    """The plain reference: decode and collate one planned batch in the calling thread."""
    return collate([items[i] for i in rows])


class Tasks(torch.utils.data.Dataset):
    """Task t → a whole batch, collated in the worker (a Batch), or a piece of one: its items (a list)."""

    def __init__(self, items: Items, collate: Collate, tasks: list[tuple[list[int], bool]]):
        self.items, self.collate, self.tasks = items, collate, tasks

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, t: int) -> Batch | list[tuple[int, Any]]:
        rows, whole = self.tasks[t]
        if whole:
            return decode_batch(self.items, self.collate, rows)
        return [self.items[i] for i in rows]


def read_batches(
    records: Sequence[Record], preprocessor: Any, plan: list[list[int]], workers: int, pin: bool = False,
    yield_cpu: bool | None = None, refused: Mapping[int, str] | None = None,
) -> Iterator[Batch]:
    """The batches of `plan` in order: decoded by `workers` DataLoader processes, or (0) on a thread here.

    One pool serves the whole plan, so decoding runs ahead across shard ends. The first batch, which
    nothing can overlap, is cut into `workers` pieces decoded at once and collated here; every later
    batch is decoded and collated by one worker, into shared memory, so it reaches this process without
    a copy. With `yield_cpu` (default: unless pinning, i.e. when the encoder computes on the CPU) the
    workers run at WORKER_NICENESS: a forward pass on all cores is a series of multi-threaded ops, each
    as slow as its slowest thread, so a decoder taking a core from one thread stalls them all; at low
    priority decoding runs in the gaps the forward pass leaves (measured: docs/benchmarks.md, section 5).
    Rows in `refused` come back as bad rows with their reason, never preprocessed.
    """
    items, collate = Items(records, preprocessor, refused), Collate(preprocessor)
    if workers == 0:
        return ThreadReader(items, collate, plan, THREAD_DEPTH)
    first_parts = min(workers, len(plan[0])) if plan else 1
    tasks = [(piece, False) for piece in split(plan[0], first_parts)] if first_parts > 1 else []
    tasks += [(rows, True) for rows in plan[1 if tasks else 0 :]]
    nice = WORKER_NICENESS if (not pin if yield_cpu is None else yield_cpu) else 0
    loader = DataLoader(Tasks(items, collate, tasks), batch_size=None, num_workers=workers, collate_fn=_same,
                        pin_memory=pin, worker_init_fn=_Nice(nice))
    return joined(iter(loader), plan, first_parts, collate)


def split(rows: list[int], parts: int) -> list[list[int]]:
    """`rows` cut into at most `parts` consecutive pieces of equal size (the last may be shorter)."""
    size = -(-len(rows) // parts)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def joined(results: Iterator[Any], plan: list[list[int]], first_parts: int,
           collate: Collate) -> Iterator[Batch]:
    """The plan's batches from the tasks' results: the first reassembled from its pieces and collated."""
    for k, rows in enumerate(plan):
        if k == 0 and first_parts > 1:
            pieces = split(rows, first_parts)
            yield collate([item for _ in pieces for item in next(results)])
        else:
            yield next(results)


def _same(x: Any) -> Any:
    return x  # a task's result as it is (the DataLoader's default conversion would walk every item)


class _Nice:
    """worker_init_fn: add `increment` to the worker process's niceness (0: leave it)."""

    def __init__(self, increment: int):
        self.increment = increment

    def __call__(self, worker_id: int) -> None:
        if self.increment:
            os.nice(self.increment)


class ThreadReader:
    """Iterates the plan's batches, decoded up to `depth` batches ahead on one background thread.

    Decoding (PIL, numpy, the Rust tokenizer) releases the GIL for most of its time, and the encoder's
    forward pass releases it inside torch ops, so the two overlap without worker processes: no fork,
    no per-process tokenizer load, no tensors sent between processes. With depth 0 nothing runs ahead:
    each batch is decoded when asked for (the plain reference).
    """

    def __init__(self, items: Items, collate: Collate, plan: list[list[int]], depth: int):
        def decode(i: int) -> Batch:
            return decode_batch(items, collate, plan[i])

        steps = range(len(plan))
        self._prefetch = Prefetcher(decode, steps, depth, name="m3jepa-encode-reader") if depth > 0 else None
        self._batches = (b for _, b in self._prefetch) if self._prefetch else (decode(i) for i in steps)

    def __iter__(self) -> ThreadReader:
        return self

    def __next__(self) -> Batch:
        try:
            return next(self._batches)
        except StopIteration:
            raise
        except BaseException:  # an unexpected error while decoding: stop the thread, then raise it here
            self.close()
            raise

    def close(self) -> None:
        """Stop the thread (if any) without waiting for the rest of the plan."""
        if self._prefetch is not None:
            self._prefetch.close()

    def __del__(self) -> None:
        if getattr(self, "_prefetch", None) is not None:
            self._prefetch.cancel()
