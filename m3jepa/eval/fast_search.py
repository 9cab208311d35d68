"""Exact top-k search scored in bf16 and certified in float32: the same answer as topk_search, faster."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from m3jepa.eval.retrieval import _as_matrix, topk_search

BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (7 stored mantissa bits, round to nearest)
FP32_UNIT = 2.0**-24
log = logging.getLogger(__name__)


def topk_bf16_exact(
    queries: np.ndarray, gallery: np.ndarray, k: int, extra: int = 16, stats: dict | None = None
) -> np.ndarray:
    """Top-k gallery rows of each query by inner product, (Q, k) int64: exactly `topk_search`'s answer.

    Scores come from one bf16 matrix product (AMX / AVX512-bf16 run it several times faster than
    float32); the k + `extra` best candidates of each row are re-scored in float32 and the row is
    certified by an error bound (`_certify`); rows the bound cannot certify are searched again
    exactly (counted in `stats["redone"]`).
    """
    q, g = _as_matrix("queries", queries), _as_matrix("gallery", gallery)
    if k + extra >= g.shape[0]:
        return topk_search(q, g, k)
    qt, gt = torch.from_numpy(q), torch.from_numpy(g)
    scores = qt.bfloat16() @ gt.bfloat16().T  # (Q, G) bf16
    return _certified(qt, gt, scores, k, extra, stats)


def coco_topk(
    captions: np.ndarray, images: np.ndarray, k: int, extra: int = 16, stats: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(text→image (C, k), image→text (I, k)) top-k from ONE bf16 product: the two directions of the
    multi-caption protocol score the same (C, I) matrix, read by rows and by columns."""
    c, i = _as_matrix("captions", captions), _as_matrix("images", images)
    ct, it = torch.from_numpy(c), torch.from_numpy(i)
    scores = ct.bfloat16() @ it.bfloat16().T  # (C, I) bf16
    t2i = _certified(ct, it, scores, k, extra, stats) if k + extra < len(i) else topk_search(c, i, k)
    i2t = (
        _certified(it, ct, scores.T.contiguous(), k, extra, stats)
        if k + extra < len(c)
        else topk_search(i, c, k)
    )
    return t2i, i2t


def top_m(scores: Tensor, m: int, group: int = 32) -> tuple[Tensor, Tensor]:
    """The m largest entries of each row of `scores` (Q, G) and their columns, (Q, m) each.

    torch.topk over long rows is slow on CPU; the m best entries lie in the m groups (of `group`
    consecutive columns) with the largest maxima, so one pass of max-reduction narrows each row to
    m·group entries first. Exact, not approximate.
    """
    n_rows, n_cols = scores.shape
    pad = (-n_cols) % group
    padded = torch.nn.functional.pad(scores, (0, pad), value=float("-inf")) if pad else scores
    group_max = padded.view(n_rows, -1, group).amax(dim=-1)  # (Q, G/group)
    groups = group_max.topk(min(m, group_max.shape[1]), dim=1).indices  # (Q, m)
    cols = (groups.unsqueeze(-1) * group + torch.arange(group)).view(n_rows, -1)  # (Q, m·group)
    vals, j = padded.gather(1, cols).topk(m, dim=1)  # (Q, m)
    return vals, cols.gather(1, j)


def _certified(
    q: Tensor, g: Tensor, scores: Tensor, k: int, extra: int, stats: dict | None, block: int = 1024
) -> np.ndarray:
    """Re-rank the bf16 candidates of `scores` (Q, G) in float32; redo uncertified rows exactly."""
    m = k + extra
    top_s, cand = top_m(scores, m + 1)  # (Q, m+1) bf16 scores, int64 columns
    cand = cand[:, :m].contiguous()  # (Q, m)
    exact = torch.empty(cand.shape)  # (Q, m) float32 scores of the candidates
    for lo in range(0, len(q), block):  # blocks keep the gathered (b, m, d) rows in cache
        hi = lo + block
        exact[lo:hi] = torch.bmm(g[cand[lo:hi]], q[lo:hi].unsqueeze(-1)).squeeze(-1)
    # Rank candidates by score descending, then gallery index ascending (topk_search's tie rule).
    order = np.lexsort((cand.numpy(), -exact.numpy()), axis=1)[:, :k]  # (Q, k)
    top = np.take_along_axis(cand.numpy(), order, axis=1)  # (Q, k)
    kth = np.take_along_axis(exact.numpy(), order[:, -1:], axis=1)[:, 0]  # (Q,)
    ok = _certify(q, g, top_s[:, m].float(), torch.from_numpy(kth))  # (Q,) bool
    redo = np.flatnonzero(~ok.numpy())
    if stats is not None:
        stats["redone"] = stats.get("redone", 0) + len(redo)
        stats["rows"] = stats.get("rows", 0) + len(top)
    if len(redo):
        top[redo] = topk_search(q.numpy()[redo], g.numpy(), k)
    return top.astype(np.int64)


def _certify(q: Tensor, g: Tensor, outside: Tensor, kth: Tensor) -> Tensor:
    """Rows (Q,) whose best non-candidate provably scores below the k-th exact candidate score.

    For s = q·g and s' its bf16 product: s' - s = (q'-q)·g' + q·(g'-g) + accumulation + output
    rounding, so |s' - s| ≤ ‖q'-q‖·max‖g'‖ + ‖q‖·max‖g'-g‖ + d·u32·‖q'‖·max‖g'‖ + u16·|s'| / (1-u16).
    Every non-candidate has s' ≤ `outside` (the (m+1)-th bf16 score), so its exact score is at most
    outside + u16·|outside|/(1-u16) + the rest; strictly below the k-th exact score means it cannot
    enter the top k (not even by a tie). The float32 reference's own rounding is added once more.
    """
    qb, gb = q.bfloat16().float(), g.bfloat16().float()
    d = q.shape[1]
    g_norm = gb.norm(dim=1).max()  # max ‖g'‖
    g_err = (gb - g).norm(dim=1).max()  # max ‖g' - g‖
    q_norm, q_err = q.norm(dim=1), (qb - q).norm(dim=1)  # (Q,) each
    accumulate = (
        2 * d * FP32_UNIT * torch.maximum(q_norm, qb.norm(dim=1)) * torch.maximum(g_norm, g.norm(dim=1).max())
    )
    bound = q_err * g_norm + q_norm * g_err + accumulate  # (Q,)
    upper = outside + outside.abs() * (BF16_UNIT / (1 - BF16_UNIT)) + bound * 1.001  # (Q,) 0.1% slack
    return upper < kth


# ---------------------------------------------------------------- exact ranks for recall@k
#
# Recall@k needs only the RANK of each query's best correct item: the number of other gallery items
# ranked before it (higher score, or an equal score at a lower index). `exact_ranks` scores every pair
# in bf16 and classifies each item against the correct item's exact score T with a rigorous error
# bound E of the bf16 score: s_bf > hi(T + E) is certainly before, s_bf < lo(T - E) certainly after,
# and only the few items in between (the "band") are scored exactly. Ranks at or beyond k_max are
# capped: recall never needs their value.
#
# "Exact" here means exact arithmetic: band items and T are scored in float64 from the float32
# vectors (products of float32 values are exact in float64; the sums err by < 1e-12). A float32
# kernel such as topk_search's rounds each score by ~1e-7 (unit vectors, d = 2048), so it can order
# two items whose exact scores differ by less than that either way; everywhere else the ranks agree.

NO_RANK = -1  # rank of a query whose group has no item on the other side


@dataclass
class CrossRanks:
    """Exact ranks (capped at k_max) of each query's best correct item, one array per direction."""

    rows: np.ndarray | None  # (R,) int64: row queries against the column gallery; NO_RANK if unanswerable
    cols: np.ndarray | None  # (C,) int64: column queries against the row gallery
    stats: dict[str, int]  # band entries, rows/columns resolved exactly, whether the native kernel ran


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
) -> CrossRanks:
    """Exact ranks from ONE bf16 product rows (R, d) @ cols (C, d).T, scored block by block.

    Row r's correct items are the columns with col_codes == row_codes[r] (and vice versa): the
    multi-caption protocol with captions as rows and images as columns gives text→image ranks in
    `rows` and image→text ranks in `cols` (`both=False` skips the latter). Ties follow topk_search:
    an equal score at a lower gallery index ranks first. With `ks` (all ≤ k_max), a rank is only
    pinned down as far as recall needs: `rank < k` is right for every k in ks, not every k ≤ k_max.
    """
    a, b = _as_matrix("rows", rows), _as_matrix("cols", cols)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"rows have dim {a.shape[1]} but cols have dim {b.shape[1]}")
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    a16, b16 = at.bfloat16(), bt.bfloat16()  # (R, d), (C, d)
    bnd = _Bounds.of(at, a16, bt, b16)
    pairs = _correct_pairs(np.asarray(row_codes), np.asarray(col_codes))  # (P,), (P,) same-group pairs
    approx = _pair_scores(at, bt, *pairs, exact=False)  # (P,) float32 estimates, within the bound
    side_r = _Side.make(pairs[0], pairs[1], approx, len(a), bnd.rows)
    side_c = _Side.make(pairs[1], pairs[0], approx, len(b), bnd.cols) if both else _Side.disabled(len(b))
    kernel = _native_kernel() if native is not False else None
    if native and kernel is None:
        raise RuntimeError("the native band kernel is not available (no C compiler?)")
    stats = {"band": 0, "resolved": 0, "native": int(kernel is not None)}
    n_block = block or max(256, min(4096, 2**25 // max(len(b), 1)))  # ≤ 64 MiB of bf16 scores
    b16t = b16.T  # (d, C)
    bands: list[np.ndarray] = []  # (n, 3) int64 [row, col, flags] per block
    for lo in range(0, len(a), n_block):
        hi = min(lo + n_block, len(a))
        scores = a16[lo:hi] @ b16t  # (B, C) bf16
        _mask_correct(scores, pairs, lo, hi)
        count = _count_native if kernel is not None else _count_torch
        bands.append(count(kernel, scores, lo, side_r, side_c))
    band = np.concatenate(bands) if bands else np.zeros((0, 3), np.int64)
    stats["band"] = len(band)
    ks = sorted(set(ks or range(1, k_max + 1)))
    ranks_r = _resolve(side_r, band[band[:, 2] & 1 == 1][:, :2], at, bt, ks, stats)
    ranks_c = _resolve(side_c, band[band[:, 2] & 2 == 2][:, 1::-1], bt, at, ks, stats) if both else None
    return CrossRanks(rows=ranks_r, cols=ranks_c, stats=stats)


def recalls_from_ranks(ranks: np.ndarray, ks) -> dict[str, float]:
    """{"R@k": percent of ranks < k} over the answerable queries (rank != NO_RANK)."""
    r = ranks[ranks != NO_RANK]
    n = max(len(r), 1)
    return {f"R@{k}": 100.0 * float((r < k).sum()) / n for k in ks}


def _correct_pairs(row_codes: np.ndarray, col_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (row, col) index pairs of equal group code, sorted by row: (P,) int64 each."""
    order = np.argsort(col_codes, kind="stable")
    sorted_codes = col_codes[order]
    start = np.searchsorted(sorted_codes, row_codes, "left")
    counts = np.searchsorted(sorted_codes, row_codes, "right") - start  # (R,)
    ri = np.repeat(np.arange(len(row_codes)), counts)
    within = np.arange(len(ri)) - np.repeat(np.cumsum(counts) - counts, counts)
    return ri.astype(np.int64), order[np.repeat(start, counts) + within].astype(np.int64)


def _pair_scores(
    a: Tensor, b: Tensor, ai: np.ndarray, bi: np.ndarray, exact: bool = True, chunk: int = 4096
) -> np.ndarray:
    """Inner products a[ai] · b[bi], (P,) float64: exact (float32 products are exact in float64) or,
    with `exact=False`, accumulated in float32 (error ≤ 2·d·u32·‖a‖‖b‖, ~3× cheaper)."""
    out = np.empty(len(ai))
    ai_t, bi_t = torch.from_numpy(ai), torch.from_numpy(bi)
    for lo in range(0, len(ai), chunk):
        x, y = a[ai_t[lo : lo + chunk]], b[bi_t[lo : lo + chunk]]  # (n, d) each
        if exact:
            x, y = x.double(), y.double()
        out[lo : lo + chunk] = torch.linalg.vecdot(x, y).numpy()
    return out


@dataclass
class _Bounds:
    """Per-row and per-column bounds e with |s_bf − s| ≤ u'·|s_bf| + e for every pair of the product.

    s − q'·g' = (q − q')·g + q'·(g − g') for q' = bf16(q), g' = bf16(g): at most ‖q − q'‖‖g‖ + ‖q'‖‖g − g'‖.
    The float32 accumulation of q'·g' adds at most 2·d·u32·‖q'‖‖g'‖ (AMX flushes subnormals, ≤ 1e-30);
    rounding the result to bf16 adds u16·|s_acc| ≤ u'·|s_bf| with u' = u16 / (1 − u16). The same term
    again covers the float32 estimate of the correct item's score T the thresholds start from.
    """

    rows: np.ndarray  # (R,) float64
    cols: np.ndarray  # (C,) float64

    @staticmethod
    def of(a: Tensor, a16: Tensor, b: Tensor, b16: Tensor) -> _Bounds:
        d = a.shape[1]
        na, ea, nab = _norms(a, a16)
        nb, eb, nbb = _norms(b, b16)
        for n in (na, nb):
            if not np.isfinite(n).all():  # a NaN/inf input makes its row's norm non-finite
                raise ValueError("rows or cols contain NaN or inf values (or overflow float32)")
        acc = 4 * d * FP32_UNIT  # the bf16 product's accumulation, and T's (nab ≥ na, nbb ≥ nb)
        rows = ea * nb.max() + nab * eb.max() + acc * nab * nbb.max()
        cols = eb * na.max() + nbb * ea.max() + acc * nbb * nab.max()
        slack = 1e-9  # float64 rounding of the norms, of T and of these sums, generously
        return _Bounds(rows=rows * (1 + 1e-6) + slack, cols=cols * (1 + 1e-6) + slack)


def _norms(x: Tensor, x16: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper bounds of ‖x‖, ‖x − bf16(x)‖, ‖bf16(x)‖ per row, float64, (N,) each.

    Computed in float32 (a float64 pass costs as much as the whole bf16 product here) and inflated by
    2·d·u32 for its rounding; x − bf16(x) is exact in float32 (Sterbenz), ‖bf16(x)‖ ≤ ‖x‖ + ‖x − bf16(x)‖.
    """
    grow = 1 + 2 * x.shape[1] * FP32_UNIT
    n = torch.linalg.vector_norm(x, dim=1).double().numpy() * grow
    e = torch.linalg.vector_norm(x - x16.float(), dim=1).double().numpy() * grow
    return n, e, n + e


_KEY_OFF = 32767  # a threshold key no finite bf16 score reaches: the query needs no rank


@dataclass
class _Side:
    """One direction's queries: exact score T of the best correct item and the bf16 threshold keys.

    Keys are bf16 bit patterns mapped to int16 so that integer order is float order (`_keys`). A
    gallery item is certainly before the correct item if key(s_bf) > hi, possibly before if ≥ lo.
    """

    qi: np.ndarray  # (P,) int64 query of each correct pair, sorted
    gi: np.ndarray  # (P,) int64 its correct gallery item
    ok: np.ndarray  # (N,) bool: the query has a correct item
    hi: np.ndarray  # (N,) int16
    lo: np.ndarray  # (N,) int16
    n_hi: np.ndarray  # (N,) int32 accumulated counts
    n_lo: np.ndarray  # (N,) int32

    @staticmethod
    def make(qi: np.ndarray, gi: np.ndarray, approx: np.ndarray, n: int, bound: np.ndarray) -> _Side:
        order = np.argsort(qi, kind="stable")
        qi, gi, approx = qi[order], gi[order], approx[order]
        best = np.full(n, -np.inf)
        np.maximum.at(best, qi, approx)  # (N,) float32 estimate of T, within the bound
        ok = np.isfinite(best)
        u = BF16_UNIT / (1 - BF16_UNIT)
        up, down = best + bound, best - bound  # (N,) exact score ± the bf16 error
        # s_bf − u|s_bf| > up  ⇔  s_bf > up/(1−u) (up ≥ 0) or up/(1+u) (up < 0); likewise for lo.
        hi_val = np.where(up >= 0, up / (1 - u), up / (1 + u))
        lo_val = np.where(down >= 0, down / (1 + u), down / (1 - u))
        hi = np.where(ok, _keys(np.where(ok, hi_val, 0.0), up=True), _KEY_OFF).astype(np.int16)
        lo = np.where(ok, _keys(np.where(ok, lo_val, 0.0), up=False), _KEY_OFF).astype(np.int16)
        zeros = np.zeros(n, np.int32)
        return _Side(qi, gi, ok, hi, lo, zeros, zeros.copy())

    @staticmethod
    def disabled(n: int) -> _Side:
        off, none = np.full(n, _KEY_OFF, np.int16), np.zeros(0, np.int64)
        zeros = np.zeros(n, np.int32)
        return _Side(none, none, np.zeros(n, bool), off, off.copy(), zeros, zeros.copy())


def _keys(x: np.ndarray, up: bool) -> np.ndarray:
    """x (float64) rounded to bf16 upwards (`up`) or downwards, as monotone int16 keys.

    key(bits) = bits for a positive bf16, bits ^ 0x7FFF for a negative one: integer order = float
    order, −0 (key −1) just below +0 (key 0). Rounding outwards keeps the tests sound; a zero
    threshold takes the key that makes `key > hi` mean s > 0 and `key ≥ lo` mean s ≥ 0.
    """
    f = x.astype(np.float32)
    f = (
        np.where(f < x, np.nextafter(f, np.float32(np.inf)), f)
        if up
        else np.where(f > x, np.nextafter(f, np.float32(-np.inf)), f)
    )
    bits = f.view(np.uint32)
    top = (bits >> 16).astype(np.int64)
    inexact = (bits & 0xFFFF) != 0
    neg = (bits >> 31) == 1
    # Truncating the low 16 bits rounds towards zero: step one bf16 outwards where that is wrong.
    top = np.where(inexact & (neg != up), top + 1, top)
    key = np.where(top >= 0x8000, top ^ 0x7FFF, top) - np.where(top >= 0x8000, 0x10000, 0)
    key = np.where(f == 0, 0 if up else -1, key)
    return key.astype(np.int16)


def _mask_correct(scores: Tensor, pairs: tuple[np.ndarray, np.ndarray], lo: int, hi: int) -> None:
    """Set the block's same-group entries to −inf: a correct item is never counted against itself."""
    ri, ci = pairs
    a, b = np.searchsorted(ri, lo), np.searchsorted(ri, hi)  # pairs are sorted by row
    if b > a:
        idx = (torch.from_numpy(ri[a:b] - lo), torch.from_numpy(ci[a:b]))
        scores.index_put_(idx, torch.tensor(float("-inf"), dtype=scores.dtype))


# ---------------------------------------------------------------- counting a block of bf16 scores

# One pass over a (rows, cols) block of bf16 scores: per row and per column, how many entries are
# above `hi` (certainly before) and at least `lo` (possibly before), and the (row, col, flags) of
# every entry in a band. torch would need four compare passes and four sums (~1 ns per entry each
# on this machine); fused, the pass runs at memory speed. Built on first use with the system C
# compiler; `_count_torch` is the same computation in torch for machines without one.
_C_SOURCE = r"""
#include <stdint.h>
static inline int16_t key16(uint16_t x) { return (int16_t)(x ^ ((uint16_t)((int16_t)x >> 15) >> 1)); }
int64_t band_count(const uint16_t *restrict s, int64_t rows, int64_t cols, int64_t has_cols,
                   const int16_t *restrict rhi, const int16_t *restrict rlo,
                   int32_t *restrict rn_hi, int32_t *restrict rn_lo,
                   const int16_t *restrict chi, const int16_t *restrict clo,
                   int32_t *restrict cn_hi, int32_t *restrict cn_lo, int64_t *restrict band, int64_t cap) {
    int64_t n = 0;
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *restrict r = s + i * cols;
        const int16_t hi = rhi[i], lo = rlo[i];
        int32_t a = 0, b = 0, cb = 0;
        if (has_cols) {
            for (int64_t j = 0; j < cols; j++) {
                int16_t k = key16(r[j]);
                int32_t ch = k > chi[j], cl = k >= clo[j];
                a += k > hi; b += k >= lo; cn_hi[j] += ch; cn_lo[j] += cl; cb += cl - ch;
            }
        } else {
            for (int64_t j = 0; j < cols; j++) { int16_t k = key16(r[j]); a += k > hi; b += k >= lo; }
        }
        rn_hi[i] = a; rn_lo[i] = b;
        if (b > a || cb > 0) {  /* some entry of this row lies in a band (rare): record it */
            for (int64_t j = 0; j < cols; j++) {
                int16_t k = key16(r[j]);
                int64_t f = (k >= lo && k <= hi) | ((has_cols && k >= clo[j] && k <= chi[j]) << 1);
                if (f) { if (n < cap) { band[3*n] = i; band[3*n+1] = j; band[3*n+2] = f; } n++; }
            }
        }
    }
    return n;
}
"""


def _native_kernel() -> ctypes.CDLL | None:
    """The compiled band kernel, cached per source and CPU; None without a C compiler
    (or with M3JEPA_NATIVE=0)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel() or False
    return _KERNEL or None


_KERNEL: ctypes.CDLL | bool | None = None


def _build_kernel() -> ctypes.CDLL | None:
    if os.environ.get("M3JEPA_NATIVE", "1") == "0":
        return None
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else platform.processor()
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    tag = hashlib.sha256((_C_SOURCE + cpu + " ".join(flags)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "m3jepa"
    lib = cache / f"band_count_{tag}.so"
    try:
        if not lib.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src, out = Path(tmp) / "band_count.c", Path(tmp) / "band_count.so"
                src.write_text(_C_SOURCE)
                cc = os.environ.get("CC", "cc")
                subprocess.run([cc, *flags, "-o", str(out), str(src)], check=True, capture_output=True)
                os.replace(out, lib)  # atomic: a concurrent builder never loads a half-written file
        kernel = ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("native band kernel unavailable (%s); counting with torch (slower)", e)
        return None
    kernel.band_count.restype = ctypes.c_int64
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    kernel.band_count.argtypes = [ptr, i64, i64, i64, *[ptr] * 9, i64]
    return kernel


def _ptr(x: np.ndarray | Tensor) -> int:
    return x.data_ptr() if isinstance(x, Tensor) else x.ctypes.data


def _count_native(kernel, scores: Tensor, lo: int, side_r: _Side, side_c: _Side) -> np.ndarray:
    """Count one block (B, C) with the C kernel, its rows split over two threads (ctypes drops the GIL)."""
    n_rows, n_cols = scores.shape
    halves = [(s, min(s + (n_rows + 1) // 2, n_rows)) for s in range(0, n_rows, (n_rows + 1) // 2)]
    has_cols = int((side_c.hi != _KEY_OFF).any())

    def run(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = span
        cap = 4 * (b - a) + 4 * n_cols
        while True:
            cn_hi, cn_lo = np.zeros(n_cols, np.int32), np.zeros(n_cols, np.int32)
            band = np.empty((cap, 3), np.int64)
            n = kernel.band_count(
                scores.data_ptr() + 2 * a * n_cols, b - a, n_cols, has_cols,
                _ptr(side_r.hi[lo + a :]), _ptr(side_r.lo[lo + a :]),
                _ptr(side_r.n_hi[lo + a :]), _ptr(side_r.n_lo[lo + a :]),
                _ptr(side_c.hi), _ptr(side_c.lo), _ptr(cn_hi), _ptr(cn_lo), _ptr(band), cap,
            )  # fmt: skip
            if n <= cap:
                band = band[:n].copy()
                band[:, 0] += lo + a
                return cn_hi, cn_lo, band
            cap = n  # the band buffer was too small: count this half again with room for all of it

    results = list(_POOL.map(run, halves)) if len(halves) > 1 else [run(halves[0])]
    for cn_hi, cn_lo, _ in results:
        side_c.n_hi += cn_hi
        side_c.n_lo += cn_lo
    return np.concatenate([r[2] for r in results])


_POOL = ThreadPoolExecutor(max_workers=2)


def _count_torch(_kernel, scores: Tensor, lo: int, side_r: _Side, side_c: _Side) -> np.ndarray:
    """`_count_native` in torch: the same counts and band entries (thresholds as bf16 values)."""
    n_rows = scores.shape[0]
    rh = _key_values(side_r.hi[lo : lo + n_rows])[:, None]  # (B, 1)
    rl = _key_values(side_r.lo[lo : lo + n_rows])[:, None]
    ch, cl = _key_values(side_c.hi)[None, :], _key_values(side_c.lo)[None, :]
    s = scores.float()  # (B, C)
    above_r, maybe_r = s > rh, s >= rl  # (B, C) each
    above_c, maybe_c = s > ch, s >= cl
    side_r.n_hi[lo : lo + n_rows] = above_r.sum(1).numpy()
    side_r.n_lo[lo : lo + n_rows] = maybe_r.sum(1).numpy()
    side_c.n_hi += above_c.sum(0).numpy().astype(np.int32)
    side_c.n_lo += maybe_c.sum(0).numpy().astype(np.int32)
    flags = (maybe_r & ~above_r).to(torch.int64) | ((maybe_c & ~above_c).to(torch.int64) << 1)  # (B, C)
    r, c = torch.nonzero(flags, as_tuple=True)
    return np.stack([r.numpy() + lo, c.numpy(), flags[r, c].numpy()], axis=1).reshape(-1, 3)


def _key_values(keys: np.ndarray) -> Tensor:
    """The bf16 values (as float32) of int16 keys; the 'off' key maps to NaN (nothing reaches it)."""
    k = keys.astype(np.int64)
    bits = np.where(k < 0, (k + 0x10000) ^ 0x7FFF, k).astype(np.uint32) << 16
    vals = bits.view(np.float32).copy()
    vals[keys == _KEY_OFF] = np.nan  # every comparison with NaN is false
    return torch.from_numpy(vals)


# ---------------------------------------------------------------- resolving the band


def _resolve(side: _Side, band: np.ndarray, q: Tensor, g: Tensor, ks: list[int], stats: dict) -> np.ndarray:
    """Ranks (N,) capped at max(ks): the certain count, plus the band items that rank first.

    `band` (n, 2) holds [query, gallery item] of every band entry of this side. Only queries whose
    hit or miss at some k is still open (n_hi < k ≤ n_lo) are scored, exactly, in float64 together
    with their correct items; for the others n_hi already gives every `rank < k` right.
    """
    k_max = ks[-1]
    ranks = np.minimum(side.n_hi, k_max).astype(np.int64)  # (N,)
    open_ = np.zeros(len(ranks), bool)
    for k in ks:
        open_ |= (side.n_hi < k) & (k <= side.n_lo)
    open_ &= side.ok
    stats["resolved"] += int(open_.sum())
    sel = band[open_[band[:, 0]]] if len(band) else band  # (m, 2)
    if len(sel):
        t, star = _exact_best(side, open_, q, g)  # (N,) each, valid where open_
        s = _pair_scores(q, g, sel[:, 0], sel[:, 1])  # (m,) float64
        t_q, star_q = t[sel[:, 0]], star[sel[:, 0]]
        before = (s > t_q) | ((s == t_q) & (sel[:, 1] < star_q))  # topk_search's tie rule
        extra = np.bincount(sel[:, 0], weights=before, minlength=len(ranks)).astype(np.int64)
        ranks = np.where(open_, np.minimum(side.n_hi + extra, k_max), ranks)
    return np.where(side.ok, ranks, NO_RANK)


def _exact_best(side: _Side, open_: np.ndarray, q: Tensor, g: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Exact score T and index of the best correct item (lowest index among equals) of open queries."""
    t, star = np.full(len(open_), -np.inf), np.full(len(open_), -1, np.int64)
    take = open_[side.qi]
    qi, gi = side.qi[take], side.gi[take]
    exact = _pair_scores(q, g, qi, gi)  # (p,) float64
    order = np.lexsort((gi, -exact, qi))  # per query: best score first, then lowest index
    first = order[np.r_[True, qi[order][1:] != qi[order][:-1]]] if len(order) else order
    t[qi[first]], star[qi[first]] = exact[first], gi[first]
    return t, star
