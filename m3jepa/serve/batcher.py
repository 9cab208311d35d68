"""Text queries that miss the cache, embedded together: those that wait join the encoder's next call."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

# One call on 16 captions cost 3.4x one on a single caption, not 16x (docs/benchmarks.md §8).
MAX_BATCH = 32  # beyond this the batch's latency grows faster than its throughput (docs/benchmarks.md)


@dataclass(eq=False)
class _Item:
    searcher: Any
    modality: str
    value: str
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple[int, str, str | None]:
        return id(self.searcher.model), self.modality, self.searcher.index.modality


class Batcher:
    """One worker thread embeds the waiting queries of one direction per model call, under `lock` (the
    model's lock, which uploads take too). No waiting window: a lone query goes at once."""

    def __init__(self, lock: threading.Lock, max_batch: int = MAX_BATCH) -> None:
        self._lock = lock
        self._max = max_batch
        self._pending: list[_Item] = []
        self._cond = threading.Condition()
        self._closed = False
        self.calls = 0  # model calls made, and queries they embedded: the mean batch is queries / calls
        self.queries = 0
        self._worker = threading.Thread(target=self._run, name="m3jepa-serve-batcher", daemon=True)
        self._worker.start()

    def embed(self, searcher: Any, modality: str, value: str) -> Any:
        """The (1, d) query embedding of `value` against `searcher`'s gallery (blocks until embedded)."""
        item = _Item(searcher, modality, value)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(item)
            self._cond.notify()
        return item.future.result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout=10)

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self._embed(batch)

    def _take(self) -> list[_Item] | None:
        """The oldest waiting query and up to MAX_BATCH - 1 others of its direction; None once closed."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                for item in self._pending:
                    item.future.set_exception(RuntimeError("the server is shutting down"))
                return None
            key = self._pending[0].key
            batch = [item for item in self._pending if item.key == key][: self._max]
            taken = set(map(id, batch))
            self._pending = [item for item in self._pending if id(item) not in taken]
            return batch

    def _embed(self, batch: list[_Item]) -> None:
        first = batch[0]
        try:
            with self._lock:
                out = first.searcher.model.embed_query([item.value for item in batch], source=first.modality,
                                                       target=first.searcher.index.modality)  # (B, d)
        except Exception as e:
            if len(batch) == 1:
                first.future.set_exception(e)
            else:  # one bad query (a lone surrogate, say) must not fail the others: each on its own
                for item in batch:
                    self._embed([item])
            return
        self.calls += 1
        self.queries += len(batch)
        for i, item in enumerate(batch):
            item.future.set_result(out[i : i + 1])
