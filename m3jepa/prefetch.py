"""A bounded read-ahead thread: compute make(step) for the coming steps while the consumer works."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Compute make(step) for steps in order, up to `depth` steps ahead, on one daemon thread.

    The work must release the GIL for most of its time (file I/O, numpy copies, PIL decoding, the Rust
    tokenizer) to overlap the consumer's compute; memory stays bounded at `depth` + 1 results. A
    failure in `make` is raised in the consumer, at the step it belongs to.
    """

    def __init__(
        self, make: Callable[[int], T], steps: range, depth: int = 2, name: str = "batch-prefetch"
    ) -> None:
        if depth < 1:
            raise ValueError(f"Prefetcher depth must be at least 1, got {depth}")
        self._make, self._steps = make, steps
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
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

    def cancel(self) -> None:
        """Ask the thread to stop after its current item, without waiting for it."""
        self._stop.set()

    def close(self) -> None:
        """Stop the thread without computing the rest of the steps, and wait for it."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
