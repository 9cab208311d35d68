"""The served indexes and their one model: which index answers a query, and the query itself.

Everything about an index and its model goes through its `m3jepa.search.Searcher` (the one seam): the
engine routes, caches and batches, and never touches an index or a model itself.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from m3jepa.search.searcher import FILE_MODALITIES
from m3jepa.serve.batcher import WINDOW_S, Batcher
from m3jepa.serve.errors import RequestError

# Text query embeddings kept (128-d float32: 512 bytes each). The text encoder costs ~30 ms a query on a
# loaded 2-core CPU and the index search ~0.02 ms (docs/benchmarks.md), so a repeated query is ~free.
CACHE_ENTRIES = 4096


@dataclass(frozen=True)
class Answer:
    """The hits of one query and where they came from."""

    index: str
    gallery: str
    gallery_size: int  # the rows of the index searched
    direction: str
    hits: list[Any]  # m3jepa.search.Hit
    took_ms: float
    cached: bool  # the query embedding came from the cache (the encoder did not run)


class Engine:
    """Named searchers that share one model. The model runs one call at a time (its own lock: the CPU
    is the bottleneck, and one at a time keeps torch's threads from fighting over it); text queries that
    wait meanwhile are embedded together in its next call, and their embeddings are cached."""

    def __init__(self, searchers: Mapping[str, Any], cache_entries: int = CACHE_ENTRIES,
                 batch_window_s: float = WINDOW_S) -> None:
        if not searchers:
            raise ValueError("serve needs at least one index")
        self.searchers = dict(searchers)
        first = next(iter(self.searchers.values()))
        if not all(first.shares_model(s) for s in self.searchers.values()):
            raise ValueError("the served indexes must share one model (Searcher.open_all)")
        self._first = first
        self._cache: OrderedDict[tuple[Hashable, str], Any] = OrderedDict()  # least recently used first
        self._cache_lock = threading.Lock()
        self._cache_entries = cache_entries
        self._batcher = Batcher(window_s=batch_window_s)

    # ------------------------------------------------------------ what is served

    def gallery(self, name: str) -> str:
        return self.searchers[name].gallery

    def sources(self, name: str) -> list[str]:
        return list(self.searchers[name].sources)

    def row(self, name: str, row_id: int) -> dict[str, Any] | None:
        """The metadata of store row `row_id` in index `name`, or None if the index does not hold it."""
        return self.searchers[name].row(row_id)

    def media(self, name: str, row_id: int, where: str) -> bytes:
        """The bytes of a row's media file while it is the file indexed (`Searcher.media`; MediaRefused
        otherwise)."""
        return self.searchers[name].media(row_id, where)

    def close(self) -> None:
        self._batcher.close()

    def stats(self) -> dict[str, int]:
        """Model calls and the text queries they embedded (the mean batch is queries / calls)."""
        return {"encoder_calls": self._batcher.calls, "encoded_queries": self._batcher.queries,
                "cached_embeddings": len(self._cache)}

    def describe(self) -> dict[str, Any]:
        """What /health reports: the indexes with their modality and size, the model and its directions."""
        indexes = [{"name": name, "modality": s.gallery, "rows": s.size, "dim": s.dim,
                    "sources": list(s.sources)} for name, s in self.searchers.items()]
        return {"indexes": indexes, "model": self._first.describe_model()}

    # ------------------------------------------------------------ queries

    def route(self, modality: str, index: str | None) -> str:
        """The name of the served index that answers `modality` queries (`index` if given)."""
        directions = ", ".join(self._first.directions)
        if index is not None:
            if index not in self.searchers:
                served = ", ".join(self.searchers)
                raise RequestError(404, f"no index named {index!r}; served: {served}"[:300], "no_index")
            if modality not in self.searchers[index].sources:
                raise RequestError(400, f"index {index!r} ({self.gallery(index)}) does not answer {modality} "
                                        f"queries; the model's directions are {directions}",
                                   "no_direction")
            return index
        answering = [n for n, s in self.searchers.items() if modality in s.sources]
        if not answering:
            served = ", ".join(f"{n} ({self.gallery(n)})" for n in self.searchers)
            raise RequestError(400, f"no served index answers {modality} queries: the model's directions are "
                                    f"{directions} and the served indexes are {served}", "no_direction")
        if len(answering) > 1:
            raise RequestError(400, f"several served indexes answer {modality} queries "
                                    f"({', '.join(answering)}); name one with \"index\"", "no_direction")
        return answering[0]

    def search(self, name: str, modality: str, value: str, k: int) -> Answer:
        """The top-k hits of one query against index `name` (its rows, if it has fewer than k)."""
        searcher = self.searchers[name]
        start = time.perf_counter()
        cached = False
        if modality in FILE_MODALITIES:  # a file's bytes would be the key: uploads are not cached
            hits = searcher.query(modality, value, k=k)
        else:
            query, cached = self._embedding(searcher, modality, value)
            hits = searcher.search(query, k)[0]  # faiss reads concurrently; no lock needed
        took = (time.perf_counter() - start) * 1e3
        return Answer(name, searcher.gallery, searcher.size, f"{modality}->{searcher.gallery}", hits, took,
                      cached)

    def _embedding(self, searcher: Any, modality: str, value: str) -> tuple[Any, bool]:
        """The (1, d) query embedding of `value` and whether it came from the cache."""
        key = (searcher.embedding_key(modality), value)
        with self._cache_lock:
            query = self._cache.get(key)
            if query is not None:
                self._cache.move_to_end(key)
                return query, True
        query = self._batcher.embed(searcher, modality, value)
        with self._cache_lock:
            self._cache[key] = query
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        return query, False
