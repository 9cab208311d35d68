"""Exact inner-product top-k search and recall@k over groups (the multi-caption retrieval protocol)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3jepa.knn import l2_normalize, topk_search, wants_faiss

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)
# From this many scores (queries × gallery) on, recall is computed from exact ranks scored in bf16
# (search.exact_ranks): several times faster than float32 top-k, the same recalls. Below it the
# float32 search is fast anyway and avoids torch start-up costs.
RANK_MIN_SCORES = 2**22
# The rank path scores every same-group pair exactly; many items per group (classes, say) would make
# that the bulk of the work, so those searches stay on top-k.
_RANK_MAX_PAIRS_PER_ROW = 64


@dataclass
class RetrievalResult:
    """Recall@k in percent for one direction, with the sizes it was measured on and the search time."""

    recalls: dict[str, float]  # {"R@1": 42.0, ...}, percent
    n_queries: int  # queries scored (after any dropped ones)
    n_gallery: int
    search_ms: float  # total wall time of the top-k search over all queries
    n_dropped: int = 0  # queries whose group had no gallery item (only with allow_missing=True)
    backend: str = "matmul"  # matmul | faiss

    def to_json(self) -> dict[str, Any]:
        return {
            "recalls": dict(self.recalls),
            "n_queries": self.n_queries,
            "n_gallery": self.n_gallery,
            "search_ms": self.search_ms,
            "n_dropped": self.n_dropped,
            "backend": self.backend,
        }


# ---------------------------------------------------------------- vectors


def group_codes(query_groups: Sequence[Any], gallery_groups: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for query and gallery groups (strings or ints), equal codes = equal groups."""
    q = np.asarray(query_groups)
    g = np.asarray(gallery_groups)
    if q.ndim != 1 or g.ndim != 1:
        raise ValueError(f"groups must be 1-D, got shapes {q.shape} and {g.shape}")
    _, codes = np.unique(np.concatenate([q, g]), return_inverse=True)
    codes = codes.astype(np.int64)
    return codes[: len(q)], codes[len(q) :]


def missing_queries(query_codes: np.ndarray, gallery_codes: np.ndarray) -> np.ndarray:
    """Boolean mask (Q,): queries whose group has no item in the gallery."""
    return ~np.isin(query_codes, gallery_codes)


def missing_error(query_groups: Sequence[Any], missing: np.ndarray) -> ValueError:
    example = np.asarray(query_groups)[np.flatnonzero(missing)[0]]
    return ValueError(
        f"{int(missing.sum())} of {len(missing)} queries have a group with no item in the gallery "
        f"(e.g. group {example!r}); they could never be retrieved. Build the gallery from the same "
        f"split, or pass allow_missing=True to drop them"
    )


def recall_at_k(
    topk_idx: np.ndarray,
    query_groups: Sequence[Any],
    gallery_groups: Sequence[Any],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """{"R@k": percent of queries with a gallery item of their own group among their top k}.

    Caption->image: gallery = images, one correct image per caption. Image->caption: gallery = all
    captions, a hit when any of the image's captions is retrieved. Every query's group must occur in
    the gallery (ValueError otherwise), so unanswerable queries are never counted as plain misses.
    """
    topk_idx = np.asarray(topk_idx)
    query_codes, gallery_codes = group_codes(query_groups, gallery_groups)
    if topk_idx.ndim != 2 or topk_idx.shape[0] != len(query_codes):
        raise ValueError(f"topk_idx must be (Q={len(query_codes)}, K), got shape {topk_idx.shape}")
    ks = check_ks(ks, topk_idx.shape[1])
    missing = missing_queries(query_codes, gallery_codes)
    if missing.any():
        raise missing_error(query_groups, missing)
    hits = gallery_codes[topk_idx] == query_codes[:, None]  # (Q, K)
    # Rank of the first correct item, K when there is none within the top K.
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), topk_idx.shape[1])  # (Q,)
    n = max(len(first_hit), 1)
    return {f"R@{k}": 100.0 * float((first_hit < k).sum()) / n for k in ks}


def check_ks(ks: Sequence[int], width: int) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if max(ks) > width:
        raise ValueError(f"R@{max(ks)} needs top-{max(ks)} results, but only {width} were given")
    return ks


def paired_subset(caption_groups: Sequence[Any]) -> np.ndarray:
    """Row indices (ascending, int64) of the first caption of each group: the 1:1 paired protocol.

    "First" is by row order, so the subset is reproducible from the store alone.
    """
    groups = np.asarray(caption_groups)
    if groups.ndim != 1:
        raise ValueError(f"caption_groups must be 1-D, got shape {groups.shape}")
    _, first = np.unique(groups, return_index=True)
    return np.sort(first).astype(np.int64)


# ---------------------------------------------------------------- one direction, end to end


def answerable(
    n_queries: int,
    n_gallery: int,
    query_groups: Sequence[Any],
    gallery_groups: Sequence[Any],
    allow_missing: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(query codes (Q,), gallery codes (G,), missing (Q,) bool, kept query indices): the queries whose
    group has a gallery item. Missing ones raise unless `allow_missing`; none left always raises."""
    if len(query_groups) != n_queries or len(gallery_groups) != n_gallery:
        raise ValueError(
            f"{n_queries} queries with {len(query_groups)} groups, "
            f"{n_gallery} gallery rows with {len(gallery_groups)} groups; they must match"
        )
    query_codes, gallery_codes = group_codes(query_groups, gallery_groups)
    missing = missing_queries(query_codes, gallery_codes)
    if missing.any() and not allow_missing:
        raise missing_error(query_groups, missing)
    keep = np.flatnonzero(~missing)
    if missing.any():
        log.warning("dropping %d queries whose group is not in the gallery", int(missing.sum()))
    if len(keep) == 0:
        raise ValueError("no query has a group in the gallery; nothing to score")
    return query_codes, gallery_codes, missing, keep


def retrieval_metrics(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_groups: Sequence[Any],
    gallery_groups: Sequence[Any],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    normalize: bool = True,
    allow_missing: bool = False,
    use_faiss: bool | None = None,
    faiss_threshold: int = 20000,
    block: int = 4096,
    fast_path: bool = False,
) -> RetrievalResult:
    """Recall@k (percent) of `queries` (Q, d) against `gallery` (G, d), cosine when `normalize`.

    `fast_path` (the CPU fast path, runtime.cpu_fast_path) lets the exact-rank engine score in int8
    first, through oneDNN's private quantised op; off, it scores in bf16 only. The recalls are exact
    either way.

    Queries whose group has no gallery item raise ValueError, or with `allow_missing=True` are
    dropped before the search and counted in `n_dropped`.
    """
    queries, gallery = np.asarray(queries), np.asarray(gallery)
    query_codes, gallery_codes, missing, keep = answerable(
        len(queries), len(gallery), query_groups, gallery_groups, allow_missing
    )
    queries = queries[keep]
    if normalize:
        queries, gallery = l2_normalize(queries), l2_normalize(gallery)
    ks = check_ks(ks, max(int(k) for k in ks) if ks else 0)
    # A gallery smaller than k (10 classes, say) is searched whole: R@k for k >= G is R@G.
    k_max = min(max(ks), len(gallery))
    if use_faiss is None and wants_ranks(query_codes[keep], gallery_codes):
        return _rank_metrics(queries, gallery, query_codes[keep], gallery_codes, ks, int(missing.sum()),
                             fast_path)
    backend = "faiss" if wants_faiss(len(queries), len(gallery), use_faiss, faiss_threshold) else "matmul"
    t0 = time.perf_counter()
    top = topk_search(queries, gallery, k_max, use_faiss=backend == "faiss", block=block)
    search_ms = 1000.0 * (time.perf_counter() - t0)
    clipped = recall_at_k(top, query_codes[keep], gallery_codes, sorted({min(k, k_max) for k in ks}))
    recalls = {f"R@{k}": clipped[f"R@{min(k, k_max)}"] for k in ks}
    return RetrievalResult(
        recalls=recalls,
        n_queries=len(keep),
        n_gallery=len(gallery),
        search_ms=search_ms,
        n_dropped=int(missing.sum()),
        backend=backend,
    )


# ---------------------------------------------------------------- recall from exact ranks (bf16-scored)


def wants_ranks(query_codes: np.ndarray, gallery_codes: np.ndarray) -> bool:
    """Whether `retrieval_metrics` (auto backend) takes the exact-rank path: big enough, few correct
    items per query."""
    if len(query_codes) * len(gallery_codes) < RANK_MIN_SCORES:
        return False
    per_group = np.bincount(gallery_codes, minlength=int(query_codes.max(initial=0)) + 1)
    return int(per_group[query_codes].sum()) <= _RANK_MAX_PAIRS_PER_ROW * (
        len(query_codes) + len(gallery_codes)
    )


def _rank_metrics(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_codes: np.ndarray,
    gallery_codes: np.ndarray,
    ks: list[int],
    n_dropped: int,
    fast_path: bool,
) -> RetrievalResult:
    from m3jepa.accel.search import exact_ranks, recalls_from_ranks  # lazy: imports torch

    t0 = time.perf_counter()
    ranks = exact_ranks(queries, gallery, query_codes, gallery_codes, max(ks), both=False, ks=ks,
                        int8_first=None if fast_path else False).rows
    return RetrievalResult(
        recalls=recalls_from_ranks(ranks, ks),
        n_queries=len(queries),
        n_gallery=len(gallery),
        search_ms=1000.0 * (time.perf_counter() - t0),
        n_dropped=n_dropped,
        backend="bf16-rank",
    )


def cross_retrieval_metrics(
    a: np.ndarray,
    b: np.ndarray,
    a_groups: Sequence[Any],
    b_groups: Sequence[Any],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    normalize: bool = True,
    allow_missing: bool = False,
    fast_path: bool = False,
) -> tuple[RetrievalResult, RetrievalResult]:
    """(a→b, b→a) recall@k of both directions, from ONE score matrix when it is large.

    The two directions of the multi-caption protocol (a = captions, b = images) score the same pairs,
    read by rows and by columns. Equal to `retrieval_metrics` called once per direction; with the
    shared product both results report the same `search_ms` (the time of the pair), backend
    `bf16-rank-both`. Small inputs simply call `retrieval_metrics` twice.
    """
    a, b = np.asarray(a), np.asarray(b)
    if len(a_groups) != len(a) or len(b_groups) != len(b):
        raise ValueError(
            f"{len(a)} rows with {len(a_groups)} groups, {len(b)} rows with {len(b_groups)} groups"
        )
    a_codes, b_codes = group_codes(a_groups, b_groups)
    if not (wants_ranks(a_codes, b_codes) and wants_ranks(b_codes, a_codes)):
        kw = {"normalize": normalize, "allow_missing": allow_missing, "fast_path": fast_path}
        return (
            retrieval_metrics(a, b, a_groups, b_groups, ks, **kw),
            retrieval_metrics(b, a, b_groups, a_groups, ks, **kw),
        )
    miss_a, miss_b = missing_queries(a_codes, b_codes), missing_queries(b_codes, a_codes)
    for groups, miss in ((a_groups, miss_a), (b_groups, miss_b)):
        if miss.all():
            raise ValueError("no query has a group in the gallery; nothing to score")
        if miss.any() and not allow_missing:
            raise missing_error(groups, miss)
    if normalize:
        a, b = l2_normalize(a), l2_normalize(b)
    ks = check_ks(ks, max(int(k) for k in ks) if ks else 0)
    from m3jepa.accel.search import exact_ranks, recalls_from_ranks  # lazy: imports torch

    t0 = time.perf_counter()
    # missing queries get NO_RANK; int8 first only on the CPU fast path (retrieval_metrics)
    ranks = exact_ranks(a, b, a_codes, b_codes, max(ks), ks=ks, int8_first=None if fast_path else False)
    ms = 1000.0 * (time.perf_counter() - t0)

    def result(r: np.ndarray, gallery: int, miss: np.ndarray) -> RetrievalResult:
        return RetrievalResult(
            recalls_from_ranks(r, ks), int((~miss).sum()), gallery, ms, int(miss.sum()), "bf16-rank-both"
        )

    return result(ranks.rows, len(b), miss_a), result(ranks.cols, len(a), miss_b)
