"""Counting blocks of bf16 scores against each query's thresholds: the native kernel and its torch fallback.

For every query (rows, and columns when both directions are wanted) the thresholds are int16 keys
of bf16 values (`bf16.keys`): an entry with key > hi certainly ranks before the query's correct item,
one with key ≥ lo possibly does; entries with lo ≤ key ≤ hi form the "band" resolved exactly later.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from m3jepa.accel.search import native
from m3jepa.accel.search.bf16 import BF16_UNIT, KEY_OFF, NEG_INF_BITS, key_values, keys


@dataclass
class Side:
    """One direction's queries: the exact score T of each best correct item and the bf16 threshold keys."""

    ok: np.ndarray  # (N,) bool: the query has a correct item
    t: np.ndarray  # (N,) float64 exact score of the best correct item (−inf if none)
    star: np.ndarray  # (N,) int64 its gallery index (the lowest among equal scores; −1 if none)
    hi: np.ndarray  # (N,) int16
    lo: np.ndarray  # (N,) int16
    n_hi: np.ndarray  # (N,) int32 accumulated counts
    n_lo: np.ndarray  # (N,) int32

    @staticmethod
    def make(qi: np.ndarray, gi: np.ndarray, exact: np.ndarray, n: int, bound: np.ndarray) -> Side:
        """Thresholds of n queries from their correct pairs (qi, gi) (P,) and exact scores (P,)."""
        t, star = np.full(n, -np.inf), np.full(n, -1, np.int64)
        order = np.lexsort((gi, -exact, qi))  # per query: best score first, then lowest index
        if len(order):
            first = order[np.r_[True, qi[order][1:] != qi[order][:-1]]]
            t[qi[first]], star[qi[first]] = exact[first], gi[first]
        ok = star >= 0
        zeros = np.zeros(n, np.int32)
        hi, lo = threshold_keys(t, ok, bound, BF16_UNIT)
        return Side(ok, t, star, hi, lo, zeros, zeros.copy())

    def sharing_counts(self) -> Side:
        """The same queries with their own thresholds (copies) but the SAME count arrays: blocks scored
        by another product add to the same totals, each entry classified by its own product's bound."""
        return replace(self, hi=self.hi.copy(), lo=self.lo.copy())

    @staticmethod
    def disabled(n: int) -> Side:
        off = np.full(n, KEY_OFF, np.int16)
        zeros = np.zeros(n, np.int32)
        none = np.zeros(n, bool)
        return Side(none, np.full(n, -np.inf), np.full(n, -1, np.int64), off, off.copy(), zeros, zeros.copy())

    def live_thresholds(self, k_max: int) -> tuple[np.ndarray, np.ndarray]:
        """(hi, lo) with queries already certainly ranked ≥ k_max switched off: their rank is capped
        there whatever the rest of the gallery scores, so they need neither counts nor band entries."""
        done = self.n_hi >= k_max
        return tuple(np.where(done, KEY_OFF, x).astype(np.int16) for x in (self.hi, self.lo))


def padded(bound: np.ndarray) -> np.ndarray:
    """A bound (float64) with slack for the float64 rounding of the norms, of its sums and of T
    (≤ 1e-12 relative), and an absolute slack for all-zero inputs."""
    return bound * (1 + 1e-6) + 1e-9


def threshold_keys(t: np.ndarray, ok: np.ndarray, bound: np.ndarray, unit: float) -> tuple[np.ndarray, ...]:
    """(hi, lo) int16 keys (N,) of T ± bound for scores rounded with relative error ≤ `unit`."""
    u = unit / (1 - unit)
    up, down = t + bound, t - bound  # (N,) exact score ± the product's error
    # s − u|s| > up  ⇔  s > up/(1−u) (up ≥ 0) or up/(1+u) (up < 0); likewise for lo.
    with np.errstate(invalid="ignore"):  # −inf rows (no correct item) are replaced just below
        hi_val = np.where(up >= 0, up / (1 - u), up / (1 + u))
        lo_val = np.where(down >= 0, down / (1 + u), down / (1 - u))
    hi = np.where(ok, keys(np.where(ok, hi_val, 0.0), up=True), KEY_OFF).astype(np.int16)
    lo = np.where(ok, keys(np.where(ok, lo_val, 0.0), up=False), KEY_OFF).astype(np.int16)
    return hi, lo


def mask_correct(scores: Tensor, ri: np.ndarray, ci: np.ndarray, lo: int, hi: int) -> None:
    """Set the block's same-group entries (pairs sorted by row) to −inf: a correct item is never
    counted against itself. Written through an int16 view: numpy's scatter is cheaper than index_put_."""
    a, b = np.searchsorted(ri, lo), np.searchsorted(ri, hi)
    if b > a:
        flat = scores.view(torch.int16).numpy().reshape(-1)  # (B·C,) shares memory with scores
        flat[(ri[a:b] - lo) * scores.shape[1] + ci[a:b]] = NEG_INF_BITS


def mask_rows(scores: Tensor, ri: np.ndarray, ci: np.ndarray, rows: np.ndarray) -> None:
    """`mask_correct` for gathered rows: scores (m, C) holds rows `rows` (m,) sorted, of the full matrix."""
    start, stop = np.searchsorted(ri, rows, "left"), np.searchsorted(ri, rows, "right")  # (m,)
    counts = stop - start
    if counts.sum():
        local = np.repeat(np.arange(len(rows)), counts)  # (n,) row of each pair within the block
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        pair = np.repeat(start, counts) + within  # (n,) index into the sorted pairs
        flat = scores.view(torch.int16).numpy().reshape(-1)
        flat[local * scores.shape[1] + ci[pair]] = NEG_INF_BITS


def count_block(
    kernel: ctypes.CDLL | None, scores: Tensor, lo: int, side_r: Side, side_c: Side, k_max: int
) -> np.ndarray:
    """Add one block's counts (rows lo : lo + B of `scores` (B, C) bf16) to both sides; return its
    band entries (n, 3) int64 [row, col, flags], flag 1 = row band, 2 = column band."""
    c_hi, c_lo = side_c.live_thresholds(k_max)
    if kernel is None:
        return _count_torch(scores, lo, side_r, side_c, c_hi, c_lo)
    return _count_native(kernel, scores, lo, side_r, side_c, c_hi, c_lo, k_max)


def _count_native(
    kernel: ctypes.CDLL, scores: Tensor, lo: int, side_r: Side, side_c: Side, c_hi, c_lo, k_max: int
) -> np.ndarray:
    """The C kernel over the block's rows, split over threads (ctypes drops the GIL). Row band entries
    are kept only while the row's certain count is below k_max: `resolve` needs no others."""
    n_rows, n_cols = scores.shape
    has_cols = int((c_hi != KEY_OFF).any())
    r = side_r

    def run(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = span
        cap = 4 * (b - a) + 4 * n_cols
        flags = np.empty(n_cols + 8, np.uint8)  # per-row scratch of the kernel
        while True:
            cn_hi, cn_lo = np.zeros(n_cols, np.int32), np.zeros(n_cols, np.int32)
            band = np.empty((cap, 3), np.int64)
            n = kernel.band_count(
                scores.data_ptr() + 2 * a * n_cols, b - a, n_cols, has_cols, k_max,
                *(native.ptr(x[lo + a :]) for x in (r.hi, r.lo, r.n_hi, r.n_lo)),
                *(native.ptr(x) for x in (c_hi, c_lo, cn_hi, cn_lo, flags, band)), cap,
            )  # fmt: skip
            if n <= cap:
                band = band[:n].copy()
                band[:, 0] += lo + a
                return cn_hi, cn_lo, band
            cap = n  # the band buffer was too small: count this part again with room for all of it

    results = native.parallel(run, n_rows)
    for cn_hi, cn_lo, _ in results:
        side_c.n_hi += cn_hi
        side_c.n_lo += cn_lo
    return np.concatenate([res[2] for res in results])


def _count_torch(scores: Tensor, lo: int, side_r: Side, side_c: Side, c_hi, c_lo) -> np.ndarray:
    """`_count_native` in torch: the same counts (thresholds as bf16 values), every band entry."""
    n_rows = scores.shape[0]
    rh = key_values(side_r.hi[lo : lo + n_rows])[:, None]  # (B, 1)
    rl = key_values(side_r.lo[lo : lo + n_rows])[:, None]
    ch, cl = key_values(c_hi)[None, :], key_values(c_lo)[None, :]  # (1, C)
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
