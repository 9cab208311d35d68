"""Exact ranks of each query's best correct item, for recall@k, from one bf16 (or int8) product.

Recall@k needs only the RANK of each query's best correct item: the number of other gallery items
ranked before it (higher score, or an equal score at a lower index). `exact_ranks` scores every pair
in bf16 and classifies each item against the correct item's exact score T with a rigorous error
bound E of the bf16 score: s_bf > hi(T + E) is certainly before, s_bf < lo(T − E) certainly after,
and only the few items in between (the "band") are scored exactly. Ranks at or beyond k_max are
capped: recall never needs their value. Where the int8 product's wider bound still decides almost
every query (well-separated data), blocks are scored in int8 first (`scan`, `int8`).

"Exact" here means exact arithmetic: T and band items are scored in float64 from the float32
vectors (products of float32 values are exact in float64; the sums err by < 1e-12). A float32
kernel such as topk_search's rounds each score by ~1e-7 (unit vectors, d = 2048), so it can order
two items whose exact scores differ by less than that either way; everywhere else the ranks agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from m3jepa.accel.search import int8, native
from m3jepa.accel.search.bf16 import FP32_UNIT
from m3jepa.accel.search.count import Side, padded
from m3jepa.accel.search.rows import Prepared, pair_dots, prepare
from m3jepa.accel.search.scan import Int8Stage, open_queries, scan
from m3jepa.knn import as_matrix

NO_RANK = -1  # rank of a query whose group has no item on the other side


@dataclass
class CrossRanks:
    """Exact ranks (capped at k_max) of each query's best correct item, one array per direction."""

    rows: np.ndarray | None  # (R,) int64: row queries against the column gallery; NO_RANK if unanswerable
    cols: np.ndarray | None  # (C,) int64: column queries against the row gallery
    stats: dict[str, int]  # band entries, rows/columns resolved exactly, whether the native kernels ran
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase


def exact_ranks(
    rows: np.ndarray,
    cols: np.ndarray,
    row_codes: np.ndarray,
    col_codes: np.ndarray,
    k_max: int,
    *,
    both: bool = True,
    ks: list[int] | None = None,
    block: int | None = None,
    native: bool | None = None,
    int8_first: bool | None = None,
) -> CrossRanks:
    """Exact ranks from ONE bf16 product rows (R, d) @ cols (C, d).T, scored block by block.

    Row r's correct items are the columns with col_codes == row_codes[r] (and vice versa): the
    multi-caption protocol with captions as rows and images as columns gives text→image ranks in
    `rows` and image→text ranks in `cols` (`both=False` skips the latter). Ties follow topk_search:
    an equal score at a lower gallery index ranks first. With `ks` (all ≤ k_max), a rank is only
    pinned down as far as recall needs: `rank < k` is right for every k in ks, not every k ≤ k_max.
    `native=None` uses the C kernels when they build, False forces torch, True requires them.
    `int8_first=None` scores in int8 first where it is available (`int8.available`), False never,
    True requires it.
    """
    a, b = as_matrix("rows", rows), as_matrix("cols", cols)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"rows have dim {a.shape[1]} but cols have dim {b.shape[1]}")
    kernel = _kernel(native)
    clock = _Clock()
    pa, pb = prepare(a, kernel, copy=False), prepare(b, kernel)  # rows: bf16 block by block
    if not (pa.finite and pb.finite):
        raise ValueError("rows or cols contain NaN or inf values (or overflow float32)")
    bnd = _Bounds.of(pa, pb)
    qb = _int8_cols(pb, kernel, int8_first)  # (C, d) int8, or None: bf16 only
    clock.lap("prepare")
    ri, ci = correct_pairs(np.asarray(row_codes), np.asarray(col_codes))  # (P,) each, sorted by row
    exact = pair_dots(pa.x, pb.x, ri, ci, kernel)  # (P,) float64 scores of the correct pairs
    side_r = Side.make(ri, ci, exact, len(a), bnd.rows)
    side_c = Side.make(ci, ri, exact, len(b), bnd.cols) if both else Side.disabled(len(b))
    stage8 = Int8Stage(pa, pb, qb, side_r, side_c, both) if qb is not None else None
    clock.lap("correct_pairs")
    ks = sorted(set(ks or range(1, k_max + 1)))
    band, scanned = scan(pa, pb, (ri, ci), (side_r, side_c), ks, kernel, block, stage8, clock.lap)
    stats = {"band": len(band), "resolved": 0, "native": int(kernel is not None), **scanned}
    row_band = band[band[:, 2] & 1 == 1][:, :2]  # (n_r, 2) [caption, image]: [query, gallery item]
    col_band = band[band[:, 2] & 2 == 2][:, 1::-1]  # (n_c, 2) [image, caption]: [query, gallery item]
    ranks_r = resolve(side_r, row_band, pa, pb, ks, stats, kernel)
    ranks_c = resolve(side_c, col_band, pb, pa, ks, stats, kernel) if both else None
    clock.lap("resolve")
    return CrossRanks(rows=ranks_r, cols=ranks_c, stats=stats, seconds=clock.laps)


def recalls_from_ranks(ranks: np.ndarray, ks) -> dict[str, float]:
    """{"R@k": percent of ranks < k} over the answerable queries (rank != NO_RANK)."""
    r = ranks[ranks != NO_RANK]
    n = max(len(r), 1)
    return {f"R@{k}": 100.0 * float((r < k).sum()) / n for k in ks}


def correct_pairs(row_codes: np.ndarray, col_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (row, col) index pairs of equal group code, sorted by row: (P,) int64 each."""
    order = np.argsort(col_codes, kind="stable")
    sorted_codes = col_codes[order]
    start = np.searchsorted(sorted_codes, row_codes, "left")
    counts = np.searchsorted(sorted_codes, row_codes, "right") - start  # (R,)
    ri = np.repeat(np.arange(len(row_codes)), counts)
    within = np.arange(len(ri)) - np.repeat(np.cumsum(counts) - counts, counts)
    return ri.astype(np.int64), order[np.repeat(start, counts) + within].astype(np.int64)


def _int8_cols(pb: Prepared, kernel, want: bool | None) -> int8.Quantized | None:
    """The columns in int8 for the int8 first stage, or None where it is off or unavailable."""
    if want is False or not int8.available(kernel, pb.x.shape[1]):
        if want:
            raise RuntimeError("the int8 first stage is not available here (see search.int8)")
        return None
    return int8.quantize(pb)  # None for tiny or huge inputs: scales outside float32's normal range


def _kernel(want: bool | None):
    kernel = native.load() if want is not False else None
    if want and kernel is None:
        raise RuntimeError("the native search kernels are not available (no C compiler?)")
    return kernel


class _Clock:
    """Wall time per phase, accumulated (phases interleave block by block)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now


@dataclass
class _Bounds:
    """Per-row and per-column bounds e with |s_bf − s| ≤ u'·|s_bf| + e for every pair of the product.

    s − q'·g' = (q − q')·g + q'·(g − g') for q' = bf16(q), g' = bf16(g): at most ‖q − q'‖‖g‖ + ‖q'‖‖g − g'‖.
    The float32 accumulation of q'·g' adds at most 2·d·u32·‖q'‖‖g'‖ (twice the textbook d·u32, as
    margin for the kernel's blocking; AMX flushes subnormals, ≤ 1e-30); rounding the result to bf16
    adds u16·|s_acc| ≤ u'·|s_bf| with u' = u16 / (1 − u16). T itself is exact (float64).
    """

    rows: np.ndarray  # (R,) float64
    cols: np.ndarray  # (C,) float64

    @staticmethod
    def of(a: Prepared, b: Prepared) -> _Bounds:
        acc = 2 * a.x.shape[1] * FP32_UNIT
        rows = a.err * b.norm.max() + a.norm16 * b.err.max() + acc * a.norm16 * b.norm16.max()
        cols = b.err * a.norm.max() + b.norm16 * a.err.max() + acc * b.norm16 * a.norm16.max()
        return _Bounds(rows=padded(rows), cols=padded(cols))


def resolve(
    side: Side, band: np.ndarray, q: Prepared, g: Prepared, ks: list[int], stats: dict, kernel
) -> np.ndarray:
    """Ranks (N,) capped at max(ks): the certain count, plus the band items that rank first.

    `band` (n, 2) holds [query, gallery item] of band entries of this side. Only queries whose hit or
    miss at some k is still open (n_hi < k ≤ n_lo) are scored, exactly, with the same float64 kernel
    as T (so exact duplicates tie); for the others n_hi already gives every `rank < k` right.
    """
    k_max = ks[-1]
    ranks = np.minimum(side.n_hi, k_max).astype(np.int64)  # (N,)
    open_ = open_queries(side, ks)
    stats["resolved"] += int(open_.sum())
    sel = band[open_[band[:, 0]]] if len(band) else band  # (m, 2)
    if len(sel):
        s = pair_dots(q.x, g.x, sel[:, 0], sel[:, 1], kernel)  # (m,) float64
        t_q, star_q = side.t[sel[:, 0]], side.star[sel[:, 0]]
        before = (s > t_q) | ((s == t_q) & (sel[:, 1] < star_q))  # topk_search's tie rule
        extra = np.bincount(sel[:, 0], weights=before, minlength=len(ranks)).astype(np.int64)
        ranks = np.where(open_, np.minimum(side.n_hi + extra, k_max), ranks)
    return np.where(side.ok, ranks, NO_RANK)
