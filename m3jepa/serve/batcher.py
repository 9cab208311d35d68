"""Text queries that miss the cache, embedded together: those that wait join the encoder's next call."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

# One call on 16 captions cost 3.4x one on a single caption, not 16x (docs/benchmarks.md §8).
MAX_BATCH = 32  # beyond this the batch's latency grows faster than its throughput (docs/benchmarks.md)
# Under load the worker waits up to this long for more queries of the same direction before it calls the
# encoder. It stops waiting once as many wait as there seem to be clients: the queries the last call
# embedded plus those that arrived while it ran (each of those clients sends its next query once
# answered). Without the wait, the clients one call answered came back a few ms apart (HTTP and JSON on
# the same loaded cores) and the next call took whichever had come, so the batches split: with 8
# clients on one loaded core a call embedded 4.0 queries on average, and 7.8 with a 10 ms window, for
# 15-25% more queries/s (bench/serve.py --batch-window-ms 0,10,0,10). A lone client never waits: its
# calls embed one query each and none arrives meanwhile.
WINDOW_S = 0.010  # `m3jepa serve --batch-window-ms` (its default there, 10, is this value)


@dataclass(eq=False)
class _Item:
    searcher: Any
    modality: str
    value: str
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> Any:
        return self.searcher.embedding_key(self.modality)


class Batcher:
    """One worker thread embeds the waiting queries of one direction per model call (`Searcher.embed_many`,
    under the model's own lock, which uploads take too). A lone query goes at once; under load the worker
    first waits up to `window_s` until as many queries wait as the last call embedded plus those that
    arrived while it ran (WINDOW_S)."""

    def __init__(self, max_batch: int = MAX_BATCH, window_s: float = WINDOW_S) -> None:
        self._max = max_batch
        self._window = window_s
        self._clients = 1  # queries the last call embedded + those that arrived while it ran
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
        """The oldest waiting query and up to MAX_BATCH - 1 others of its direction (waiting up to the
        window for them under load); None once closed."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            key = self._pending[0].key if self._pending else None
            if self._window > 0:
                deadline = time.monotonic() + self._window
                enough = min(self._max, self._clients)
                while not self._closed and self._waiting(key) < enough:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self._closed:
                for item in self._pending:
                    item.future.set_exception(RuntimeError("the server is shutting down"))
                return None
            batch = [item for item in self._pending if item.key == key][: self._max]
            taken = set(map(id, batch))
            self._pending = [item for item in self._pending if id(item) not in taken]
            return batch

    def _waiting(self, key: Any) -> int:
        return sum(item.key == key for item in self._pending)

    def _embed(self, batch: list[_Item]) -> None:
        first = batch[0]
        try:
            out = first.searcher.embed_many(first.modality, [item.value for item in batch])  # (B, d)
        except Exception as e:
            if len(batch) == 1:
                first.future.set_exception(e)
            else:  # one bad query (a lone surrogate, say) must not fail the others: each on its own
                for item in batch:
                    self._embed([item])
            return
        self.calls += 1
        self.queries += len(batch)
        with self._cond:  # counted before any answer goes out, so no answered client's next query is in it
            self._clients = len(batch) + len(self._pending)
        for i, item in enumerate(batch):
            item.future.set_result(out[i : i + 1])
