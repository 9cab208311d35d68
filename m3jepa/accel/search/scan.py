"""The block loop of the rank path: score (rows × cols) block by block and count each block into both sides.

Blocks are scored in int8 while the data allows (`Int8Stage`) and in bf16 otherwise. A row left open
by an int8 block (its hit or miss at some k still inside the wide int8 band) is scored again in bf16
at the end (`rescore_rows`); columns keep the counts of whichever product scored each block. Every
entry is classified by the rigorous bound of the product that scored it, so the counts stay exact.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from m3jepa.accel.search import int8, native
from m3jepa.accel.search.count import Side, count_block, mask_correct, mask_rows, padded, threshold_keys
from m3jepa.accel.search.rows import Prepared

Lap = Callable[[str], None]

# An int8 block hands over to bf16 when more than this share of its rows stays open, or when it
# records more band entries per row than this: their exact scoring would cost more than the bf16
# product saves (~1/3 of it). Isotropic random data opens ~60% of the rows; well-separated data none.
MAX_OPEN_SHARE = 0.1
MAX_BAND_PER_ROW = 8
INT8_BLOCK = 2048  # a (2048, 5000) bf16 output is 20 MB: below glibc's 32 MB mmap cap, so reused


class Int8Stage:
    """int8 blocks: rows quantised block by block (one scale per block, as the oneDNN op takes) against
    the packed int8 columns. Both sides' thresholds are set per block from that block's quantisation
    error: entry (i, j) errs by ≤ ‖x_i − x̂_i‖‖y_j‖ + ‖x̂_i‖‖y_j − ŷ_j‖, so maxima over the block suffice."""

    def __init__(self, pa: Prepared, pb: Prepared, qb: int8.Quantized, rows: Side, cols: Side, both: bool):
        self.pa, self.pb, self.qb = pa, pb, qb
        self.product: int8.Product | None = None  # packed on first use: packing takes ~50 ms
        self.buf = torch.empty((min(INT8_BLOCK, len(pa.x)), pa.x.shape[1]), dtype=torch.int8)  # (B, d)
        self.rows = rows.sharing_counts()
        self.cols = cols.sharing_counts() if both else cols

    def scores(self, lo: int, hi: int) -> Tensor | None:
        """int8-scored block (B, C) bf16 of rows lo:hi, thresholds set for it; None if unquantisable."""
        qa = int8.quantize_shared(self.pa, lo, hi, self.buf)
        if qa is None:
            return None
        r, c, qb = self.rows, self.cols, self.qb
        r.hi[lo:hi], r.lo[lo:hi] = threshold_keys(r.t[lo:hi], r.ok[lo:hi], self._row_bound(qa), int8.OUT_UNIT)
        if c.ok.any():
            bound = padded(qb.err * self.pa.norm[lo:hi].max() + qb.norm * qa.err.max())  # (C,)
            c.hi[:], c.lo[:] = threshold_keys(c.t, c.ok, bound, int8.OUT_UNIT)
        if self.product is None:
            self.product = int8.Product(qb, INT8_BLOCK)
        return self.product(qa.q, float(qa.scale[0]))

    def _row_bound(self, qa: int8.Quantized) -> np.ndarray:
        return padded(qa.err * self.pb.norm.max() + qa.norm * self.qb.err.max())  # (B,)

    def pays(self, bf: _Bf16Stage, pairs, ks: list[int], kernel, n: int = 256) -> bool:
        """Whether int8 blocks will mostly decide their rows, judged on n sample rows: their bf16
        scores against int8-wide thresholds. Isotropic random data opens ~60% of the rows (the int8
        band is ~±0.02 there), so one int8 block would be wasted; this costs one small bf16 product."""
        pa, m = self.pa, min(n, len(bf.a16), len(self.buf))  # the sample fits the buffers
        idx = np.unique(np.linspace(0, len(pa.x) - 1, m).astype(np.int64))  # (m,)
        x = pa.x[torch.from_numpy(idx)]  # (m, d) float32
        sample = Prepared(x, None, pa.norm[idx], pa.err[idx], pa.norm16[idx], pa.kernel, pa.amax[idx])
        qa = int8.quantize_shared(sample, 0, len(idx), self.buf)
        if qa is None:
            return False
        r = self.rows
        hi, lo = threshold_keys(r.t[idx], r.ok[idx], self._row_bound(qa), int8.OUT_UNIT)
        zeros = np.zeros(len(idx), np.int32)
        sub = Side(r.ok[idx], r.t[idx], r.star[idx], hi, lo, zeros, zeros.copy())
        scores = bf.product_rows(x)  # (m, C) bf16
        mask_rows(scores, *pairs, idx)
        count_block(kernel, scores, 0, sub, Side.disabled(scores.shape[1]), ks[-1])
        return float(open_queries(sub, ks).mean()) <= MAX_OPEN_SHARE / 2


def scan(
    pa: Prepared, pb: Prepared, pairs, sides: tuple[Side, Side], ks: list[int], kernel, block: int | None,
    stage8: Int8Stage | None, lap: Lap,
) -> tuple[np.ndarray, dict[str, int]]:  # fmt: skip
    """The band (n, 3) int64 [row, col, flags] of all blocks, and counts of what each stage did."""
    n_rows = len(pa.x)
    bf = _Bf16Stage(pa, pb, block)
    bands: list[np.ndarray] = []
    pending: list[np.ndarray] = []  # rows left open by int8 blocks
    stats = {"int8_rows": 0, "rescored_rows": 0}
    if stage8 is not None and not stage8.pays(bf, pairs, ks, kernel):
        stage8 = None
    lap("product8")
    lo = 0
    while lo < n_rows:
        if stage8 is not None:
            hi = min(lo + INT8_BLOCK, n_rows)
            got = _int8_block(stage8, lo, hi, pairs, ks, kernel, lap)
            if got is not None:
                bands.append(got[0])
                pending.append(got[1])
                stats["int8_rows"] += hi - lo
                lo = hi
                continue
            stage8 = None  # too close for int8: this block and all later ones in bf16
        hi = min(lo + bf.block, n_rows)
        scores = bf.product(lo, hi)  # (B, C) bf16
        lap("product")
        mask_correct(scores, *pairs, lo, hi)
        bands.append(count_block(kernel, scores, lo, *sides, ks[-1]))
        lap("count")
        lo = hi
    band = np.concatenate(bands) if bands else np.zeros((0, 3), np.int64)
    open_rows = np.concatenate(pending) if pending else np.zeros(0, np.int64)
    if len(open_rows):
        band = rescore_rows(bf, open_rows, band, pairs, sides[0], ks[-1], kernel)
        stats["rescored_rows"] = len(open_rows)
        lap("rescore")
    return band, stats


def open_queries(side: Side, ks: list[int], lo: int = 0, hi: int | None = None) -> np.ndarray:
    """(N,) bool over queries lo:hi: whose hit or miss at some k is still open (n_hi < k ≤ n_lo)."""
    n_hi, n_lo = side.n_hi[lo:hi], side.n_lo[lo:hi]
    out = np.zeros(len(n_hi), bool)
    for k in ks:
        out |= (n_hi < k) & (k <= n_lo)
    return out & side.ok[lo:hi]


def _int8_block(
    stage: Int8Stage, lo: int, hi: int, pairs, ks: list[int], kernel, lap: Lap
) -> tuple[np.ndarray, np.ndarray] | None:
    """Score and count rows lo:hi in int8: (band (n, 3), open rows (m,)), or None (counts undone)
    when the block is too close to call in int8."""
    before = stage.cols.n_hi.copy(), stage.cols.n_lo.copy()  # (C,) each: to undo this block
    scores = stage.scores(lo, hi)  # (B, C) bf16
    lap("product8")
    if scores is None:
        return None
    mask_correct(scores, *pairs, lo, hi)
    band = count_block(kernel, scores, lo, stage.rows, stage.cols, ks[-1])
    open_rows = lo + np.flatnonzero(open_queries(stage.rows, ks, lo, hi))
    lap("count")
    col_entries = int((band[:, 2] & 2).astype(bool).sum())
    if len(open_rows) > MAX_OPEN_SHARE * (hi - lo) or col_entries > MAX_BAND_PER_ROW * (hi - lo):
        stage.cols.n_hi[:], stage.cols.n_lo[:] = before
        return None
    return band, open_rows


class _Bf16Stage:
    """bf16 products against the columns as one contiguous (d, C) matrix, into one reused output."""

    def __init__(self, pa: Prepared, pb: Prepared, block: int | None) -> None:
        n_rows, n_cols = len(pa.x), len(pb.x)
        self.pa = pa
        self.block = block or max(256, min(4096, 2**25 // max(n_cols, 1)))  # ≤ 64 MiB of bf16 scores
        self._cols: Tensor | None = None  # (d, C), made on first use: int8-only runs never need it
        self._pb = pb
        rows = min(self.block, n_rows)
        # Reused buffers: a fresh 40 MB result per block costs its page faults, ~1/3 of the product.
        self.a16 = torch.empty((rows, pa.x.shape[1]), dtype=torch.bfloat16)  # (B, d)
        self.out = torch.empty((rows, n_cols), dtype=torch.bfloat16)  # (B, C)

    @property
    def cols(self) -> Tensor:
        if self._cols is None:  # oneDNN multiplies a contiguous (d, C) one ~1.5× faster than a view
            self._cols = self._pb.x16.T.contiguous()
        return self._cols

    def product(self, lo: int, hi: int) -> Tensor:
        return torch.matmul(self.pa.block16(lo, hi, self.a16), self.cols, out=self.out[: hi - lo])

    def product_rows(self, x: Tensor) -> Tensor:
        """bf16 scores (m, C) of gathered float32 rows x (m ≤ block, d), converted as `block16` does."""
        m, d = x.shape
        a16 = self.a16[:m]
        if self.pa.kernel is not None:
            self.pa.kernel.prepare_rows(native.ptr(x), m, d, native.ptr(a16), None, None)
        else:
            a16.copy_(x)  # round to nearest even, as torch's own `bfloat16()` in `_prepare_torch`
        return torch.matmul(a16, self.cols, out=self.out[:m])


def rescore_rows(
    bf: _Bf16Stage, rows: np.ndarray, band: np.ndarray, pairs, side: Side, k_max: int,
    kernel: ctypes.CDLL | None,
) -> np.ndarray:  # fmt: skip
    """Score rows (m,) again in bf16 and replace their int8 row counts and row band entries; the
    column counts of their int8 blocks stand (each entry was classified by its own bound)."""
    keep = band[:, 2] & ~np.where(np.isin(band[:, 0], rows), 1, 0)  # (n,) flags without their row bit
    bands = [np.column_stack([band[:, :2], keep])[keep != 0]]
    for a in range(0, len(rows), bf.block):
        part = rows[a : a + bf.block]  # (m,) sorted
        x = bf.pa.x[torch.from_numpy(part)]  # (m, d) float32, contiguous
        scores = bf.product_rows(x)  # (m, C) bf16
        mask_rows(scores, *pairs, part)
        sub = Side(*(f[part] for f in (side.ok, side.t, side.star, side.hi, side.lo, side.n_hi, side.n_lo)))
        found = count_block(kernel, scores, 0, sub, Side.disabled(scores.shape[1]), k_max)
        side.n_hi[part], side.n_lo[part] = sub.n_hi, sub.n_lo
        found[:, 0] = part[found[:, 0]]
        bands.append(found)
    return np.concatenate(bands)
