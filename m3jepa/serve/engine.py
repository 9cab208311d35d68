"""The served indexes and their one model: which index answers a query, and the query itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from m3jepa.serve.errors import RequestError

# Query modalities whose value is a file: they arrive as uploads, never as a path on this machine.
FILE_MODALITIES = ("image", "audio")


@dataclass(frozen=True)
class Answer:
    """The hits of one query and where they came from."""

    index: str
    gallery: str
    direction: str
    hits: list[Any]  # m3jepa.search.Hit
    took_ms: float


class Engine:
    """Named searchers that share one model; queries run one at a time (the CPU is the bottleneck, and
    one at a time keeps torch's threads from fighting over it)."""

    def __init__(self, searchers: Mapping[str, Any], model: Any) -> None:
        if not searchers:
            raise ValueError("serve needs at least one index")
        self.searchers = dict(searchers)
        self.model = model
        self._lock = threading.Lock()
        # hits name a row by its store row id; the index reads rows by position (invalid rows are left out)
        self._positions = {name: {s.index.row(i)["row_id"]: i for i in range(s.index.rows)}
                           for name, s in self.searchers.items()}

    # ------------------------------------------------------------ what is served

    def gallery(self, name: str) -> str:
        return self.searchers[name].index.modality

    def sources(self, name: str) -> list[str]:
        return list(self.searchers[name].sources)

    def row(self, name: str, row_id: int) -> dict[str, Any] | None:
        """The metadata of store row `row_id` in index `name`, or None if the index does not hold it."""
        position = self._positions[name].get(row_id)
        return None if position is None else self.searchers[name].index.row(position)

    def describe(self) -> dict[str, Any]:
        """What /health reports: the indexes with their modality and size, the model and its directions."""
        indexes = [{"name": name, "modality": s.index.modality, "rows": s.index.rows, "dim": s.index.dim,
                    "sources": list(s.sources)} for name, s in self.searchers.items()]
        source = getattr(self.model, "source", None)
        model = {"path": str(getattr(source, "path", "")), "kind": getattr(source, "kind", None),
                 "directions": list(self.model.directions), "device": str(getattr(self.model, "device", ""))}
        return {"indexes": indexes, "model": model}

    # ------------------------------------------------------------ queries

    def route(self, modality: str, index: str | None) -> str:
        """The name of the served index that answers `modality` queries (`index` if given)."""
        directions = ", ".join(self.model.directions)
        if index is not None:
            if index not in self.searchers:
                raise RequestError(404, f"no index named {index!r}; served: {', '.join(self.searchers)}")
            if modality not in self.searchers[index].sources:
                raise RequestError(400, f"index {index!r} ({self.gallery(index)}) does not answer {modality} "
                                        f"queries; the model's directions are {directions}")
            return index
        answering = [n for n, s in self.searchers.items() if modality in s.sources]
        if not answering:
            served = ", ".join(f"{n} ({self.gallery(n)})" for n in self.searchers)
            raise RequestError(400, f"no served index answers {modality} queries: the model's directions are "
                                    f"{directions} and the served indexes are {served}")
        if len(answering) > 1:
            raise RequestError(400, f"several served indexes answer {modality} queries "
                                    f"({', '.join(answering)}); name one with \"index\"")
        return answering[0]

    def search(self, name: str, modality: str, value: str, k: int) -> Answer:
        """The top-k hits of one query against index `name` (its rows, if it has fewer than k)."""
        searcher = self.searchers[name]
        k = min(k, searcher.index.rows)
        start = time.perf_counter()
        with self._lock:
            hits = searcher.query(modality, value, k=k)
        took = (time.perf_counter() - start) * 1e3
        return Answer(name, self.gallery(name), f"{modality}->{self.gallery(name)}", hits, took)
