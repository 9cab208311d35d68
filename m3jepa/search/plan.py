"""Which faiss index for a gallery: exact up to FLAT_MAX_ROWS, else the IVF kind that fits the budget."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from m3jepa.search.errors import SearchError

# Exact search up to here: one query over 20,000 x 512 float32 is ~10M multiply-adds, and exact needs
# no training and has recall 1 by definition.
FLAT_MAX_ROWS = 20_000
ID_BYTES = 8  # faiss inverted lists keep an int64 id per vector
MIN_POINTS_PER_LIST = 39  # faiss warns below 39 training points per centroid
TRAIN_POINTS_PER_LIST = 64  # k-means sample: 64 points per list (faiss clips at 256)
HNSW_M = 32
KINDS = ("auto", "flat", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw")
ALIASES = {"ivf": "ivf-flat", "exact": "flat"}
PQ_CODES = (64, 48, 32, 16, 8)  # bytes per vector tried by ivf-pq, largest (best recall) first


@dataclass(frozen=True)
class IndexPlan:
    """A chosen index: its kind, faiss factory string, parameters and estimated size in bytes."""

    kind: str
    factory: str
    params: dict[str, Any] = field(default_factory=dict)
    est_bytes: int = 0
    reason: str = ""


def parse_bytes(text: str | int) -> int:
    """'4GB' / '512MiB' / '1.5G' / 123 → bytes (GB = 10**9, GiB = 2**30)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise SearchError(f"--memory-budget {text!r} is not a size; write e.g. 4GB, 512MB or 2GiB")
    power = " kmgt".index(m.group(2) or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def nlist_for(rows: int) -> int:
    """IVF lists: the power of two nearest 4 * sqrt(rows) (autofaiss' first choice below 1M rows), at most
    rows / 39 so k-means has enough points per list."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(rows, 1))))
    while nlist > 1 and nlist * MIN_POINTS_PER_LIST > rows:
        nlist //= 2
    return max(nlist, 1)


def choose(rows: int, dim: int, kind: str = "auto", budget: int = 4 * 10**9) -> IndexPlan:
    """The index for `rows` vectors of width `dim` under `budget` bytes (the rule of docs/search.md)."""
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise SearchError(f"--kind {kind!r} is not one of {', '.join(KINDS)} (ivf = ivf-flat)")
    if rows <= 0:
        raise SearchError("the gallery has no valid rows to index")
    if kind == "flat" or (kind == "auto" and rows <= FLAT_MAX_ROWS):
        why = "requested" if kind == "flat" else f"{rows} rows <= {FLAT_MAX_ROWS}: exact search is fast"
        return _fits(IndexPlan("flat", "Flat", {}, rows * dim * 4, why), budget, kind)
    if kind == "hnsw":
        return _fits(IndexPlan("hnsw", f"HNSW{HNSW_M}", {"M": HNSW_M},
                               rows * (dim * 4 + HNSW_M * 2 * 4 + ID_BYTES), "requested"), budget, kind)
    nlist = nlist_for(rows)
    centroids = nlist * dim * 4
    flat = IndexPlan("ivf-flat", f"IVF{nlist},Flat", {"nlist": nlist},
                     centroids + rows * (dim * 4 + ID_BYTES))
    sq8 = IndexPlan("ivf-sq8", f"IVF{nlist},SQ8", {"nlist": nlist}, centroids + rows * (dim + ID_BYTES))
    if kind in ("ivf-flat", "ivf-sq8"):
        return _fits(flat if kind == "ivf-flat" else sq8, budget, kind)
    if kind == "auto":
        for plan in (flat, sq8):
            if plan.est_bytes <= budget:
                return IndexPlan(plan.kind, plan.factory, plan.params, plan.est_bytes,
                                 f"{rows} rows > {FLAT_MAX_ROWS}; the largest IVF codes within the budget")
    return _pq_plan(rows, dim, nlist, centroids, budget, kind)


def _pq_plan(rows: int, dim: int, nlist: int, centroids: int, budget: int, kind: str) -> IndexPlan:
    for m in PQ_CODES:
        size = centroids + rows * (m + ID_BYTES)
        if dim % m == 0 and size <= budget:
            return IndexPlan("ivf-pq", f"IVF{nlist},PQ{m}x8", {"nlist": nlist, "pq_bytes": m}, size,
                             "requested" if kind == "ivf-pq" else
                             f"IVF-Flat and IVF-SQ8 exceed the budget; PQ{m} is the largest code that fits")
    need = centroids + rows * (min(m for m in PQ_CODES if dim % m == 0) + ID_BYTES) if dim % 8 == 0 else None
    raise SearchError(f"no index of {rows} x {dim} fits a memory budget of {budget:,} bytes"
                      + (f"; raise --memory-budget to at least {need:,} bytes" if need else
                         f" (ivf-pq needs dim divisible by 8, got {dim})"))


def _fits(plan: IndexPlan, budget: int, kind: str) -> IndexPlan:
    if plan.est_bytes > budget:
        raise SearchError(f"--kind {kind} needs about {plan.est_bytes:,} bytes, over the memory budget of "
                          f"{budget:,}; raise --memory-budget or use --kind auto")
    return IndexPlan(plan.kind, plan.factory, plan.params, plan.est_bytes, plan.reason or "requested")
