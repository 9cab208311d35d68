"""Exact inner-product top-k search and recall@k over groups (the multi-caption retrieval protocol)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)
# Cap on one block of the score matrix (float32 elements, 2**25 = 128 MiB), so the matmul path never
# holds a full (Q, G) matrix for COCO-sized runs.
_MAX_BLOCK_ELEMENTS = 2**25
FAISS_MIN_QUERIES = 64
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


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (cosine = inner product of these); zero rows stay zero."""
    import torch  # threaded: at COCO-5K size numpy's one-thread norm and divide took 0.18 s, torch 0.08 s

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # (N, d), shares memory with x
    norms = torch.linalg.vector_norm(t, dim=-1, keepdim=True)  # (N, 1)
    return (t / norms.clamp_min(eps)).numpy()


def _as_matrix(name: str, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, dim), got shape {x.shape}")
    return x


def _require_finite(what: str, x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf values; check the encoder outputs / checkpoint")


# ---------------------------------------------------------------- search


def topk_search(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    use_faiss: bool | None = None,
    faiss_threshold: int = 20000,
    block: int = 4096,
) -> np.ndarray:
    """Indices (Q, k) int64 of the k gallery rows with the largest inner product with each query.

    Exact search. Ties (equal float32 scores) rank the lower gallery index first, on both paths.
    `use_faiss=None` picks faiss `IndexFlatIP` when the gallery has more than `faiss_threshold`
    rows (and there are at least FAISS_MIN_QUERIES queries), otherwise blocked float32 matrix
    products of at most `block` queries at a time.
    """
    queries = _as_matrix("queries", queries)  # (Q, d)
    gallery = _as_matrix("gallery", gallery)  # (G, d)
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]} but gallery has dim {gallery.shape[1]}")
    n_gallery = gallery.shape[0]
    if not 1 <= k <= n_gallery:
        raise ValueError(f"k={k} must be between 1 and the gallery size {n_gallery}")
    if wants_faiss(queries.shape[0], n_gallery, use_faiss, faiss_threshold):
        return _faiss_topk(queries, gallery, k)
    return _matmul_topk(queries, gallery, k, block)


def wants_faiss(n_queries: int, n_gallery: int, use_faiss: bool | None, faiss_threshold: int) -> bool:
    """The search path: forced by `use_faiss`, else faiss for galleries above `faiss_threshold` rows.

    A batch of fewer than FAISS_MIN_QUERIES queries always uses matmul: building the flat index
    copies the gallery (~0.4 s at COCO size), which would swamp a one-query latency measurement.
    """
    if use_faiss is not None:
        return use_faiss
    return n_gallery > faiss_threshold and n_queries >= FAISS_MIN_QUERIES


def _matmul_topk(queries: np.ndarray, gallery: np.ndarray, k: int, block: int) -> np.ndarray:
    # Fewer rows per block for big galleries: memory stays bounded whatever G is.
    rows = max(1, min(block, _MAX_BLOCK_ELEMENTS // gallery.shape[0]))
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], rows):
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite scores raise just below
            scores = queries[start : start + rows] @ gallery.T  # (b, G)
        # Any NaN/inf input row makes its scores non-finite; checking the (b, G) scores instead of the
        # (G, d) inputs keeps a one-query search (latency measurement) at the cost of the product.
        _require_finite("queries or gallery", scores)
        out[start : start + rows] = _topk_rows(scores, k)
    return out


def _topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k columns of each row of `scores` (b, G), ranked by score, then by lower column index."""
    n_rows, n_cols = scores.shape
    if k < n_cols:
        cand = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (b, k), unordered
    else:
        cand = np.broadcast_to(np.arange(n_cols), (n_rows, n_cols)).copy()
    cand_scores = np.take_along_axis(scores, cand, axis=1)  # (b, k)
    # Sort by score descending, then index ascending: lexsort's last key is the primary one.
    order = np.lexsort((cand, -cand_scores), axis=1)
    top = np.take_along_axis(cand, order, axis=1)  # (b, k)
    if k < n_cols:
        # argpartition picks arbitrarily among items tied with the k-th score; redo those rows stably.
        kth = np.take_along_axis(scores, top[:, -1:], axis=1)  # (b, 1)
        n_at_least = (scores >= kth).sum(axis=1)  # (b,)
        for row in np.flatnonzero(n_at_least > k):
            top[row] = np.argsort(-scores[row], kind="stable")[:k]
    return top


def _faiss_topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    import faiss  # lazy: only big galleries need it

    # faiss silently ranks NaN scores anywhere, so refuse them up front (cheap beside the search).
    _require_finite("queries", queries)
    _require_finite("gallery", gallery)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    # One extra neighbour shows whether the k-th place is tied with an item faiss left out.
    k_search = min(k + 1, gallery.shape[0])
    scores, idx = index.search(queries, k_search)  # (Q, k_search) each
    order = np.lexsort((idx, -scores), axis=1)  # score descending, then index ascending
    idx = np.take_along_axis(idx, order, axis=1).astype(np.int64)
    top = np.ascontiguousarray(idx[:, :k])
    if k_search > k:
        sorted_scores = np.take_along_axis(scores, order, axis=1)
        tied = np.flatnonzero(sorted_scores[:, k] == sorted_scores[:, k - 1])
        for row in tied:  # rare: rank this row exactly with the stable rule
            row_scores = gallery @ queries[row]  # (G,)
            top[row] = np.argsort(-row_scores, kind="stable")[:k]
    return top


# ---------------------------------------------------------------- groups and recall


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


def _missing_error(query_groups: Sequence[Any], missing: np.ndarray) -> ValueError:
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
    ks = _check_ks(ks, topk_idx.shape[1])
    missing = missing_queries(query_codes, gallery_codes)
    if missing.any():
        raise _missing_error(query_groups, missing)
    hits = gallery_codes[topk_idx] == query_codes[:, None]  # (Q, K)
    # Rank of the first correct item, K when there is none within the top K.
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), topk_idx.shape[1])  # (Q,)
    n = max(len(first_hit), 1)
    return {f"R@{k}": 100.0 * float((first_hit < k).sum()) / n for k in ks}


def _check_ks(ks: Sequence[int], width: int) -> list[int]:
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
) -> RetrievalResult:
    """Recall@k (percent) of `queries` (Q, d) against `gallery` (G, d), cosine when `normalize`.

    Queries whose group has no gallery item raise ValueError, or with `allow_missing=True` are
    dropped before the search and counted in `n_dropped`.
    """
    queries, gallery = np.asarray(queries), np.asarray(gallery)
    if len(query_groups) != len(queries) or len(gallery_groups) != len(gallery):
        raise ValueError(
            f"{len(queries)} queries with {len(query_groups)} groups, "
            f"{len(gallery)} gallery rows with {len(gallery_groups)} groups; they must match"
        )
    query_codes, gallery_codes = group_codes(query_groups, gallery_groups)
    missing = missing_queries(query_codes, gallery_codes)
    if missing.any() and not allow_missing:
        raise _missing_error(query_groups, missing)
    keep = np.flatnonzero(~missing)
    if missing.any():
        log.warning("dropping %d queries whose group is not in the gallery", int(missing.sum()))
    if len(keep) == 0:
        raise ValueError("no query has a group in the gallery; nothing to score")
    queries = queries[keep]
    if normalize:
        queries, gallery = l2_normalize(queries), l2_normalize(gallery)
    ks = _check_ks(ks, max(int(k) for k in ks) if ks else 0)
    # A gallery smaller than k (10 classes, say) is searched whole: R@k for k >= G is R@G.
    k_max = min(max(ks), len(gallery))
    if use_faiss is None and wants_ranks(query_codes[keep], gallery_codes):
        return _rank_metrics(queries, gallery, query_codes[keep], gallery_codes, ks, int(missing.sum()))
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
) -> RetrievalResult:
    from m3jepa.eval.search import exact_ranks, recalls_from_ranks  # lazy: imports torch

    t0 = time.perf_counter()
    ranks = exact_ranks(queries, gallery, query_codes, gallery_codes, max(ks), both=False, ks=ks).rows
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
        kw = {"normalize": normalize, "allow_missing": allow_missing}
        return (
            retrieval_metrics(a, b, a_groups, b_groups, ks, **kw),
            retrieval_metrics(b, a, b_groups, a_groups, ks, **kw),
        )
    miss_a, miss_b = missing_queries(a_codes, b_codes), missing_queries(b_codes, a_codes)
    for groups, miss in ((a_groups, miss_a), (b_groups, miss_b)):
        if miss.all():
            raise ValueError("no query has a group in the gallery; nothing to score")
        if miss.any() and not allow_missing:
            raise _missing_error(groups, miss)
    if normalize:
        a, b = l2_normalize(a), l2_normalize(b)
    ks = _check_ks(ks, max(int(k) for k in ks) if ks else 0)
    from m3jepa.eval.search import exact_ranks, recalls_from_ranks  # lazy: imports torch

    t0 = time.perf_counter()
    ranks = exact_ranks(a, b, a_codes, b_codes, max(ks), ks=ks)  # missing queries get NO_RANK
    ms = 1000.0 * (time.perf_counter() - t0)

    def result(r: np.ndarray, gallery: int, miss: np.ndarray) -> RetrievalResult:
        return RetrievalResult(
            recalls_from_ranks(r, ks), int((~miss).sum()), gallery, ms, int(miss.sum()), "bf16-rank-both"
        )

    return result(ranks.rows, len(b), miss_a), result(ranks.cols, len(a), miss_b)
