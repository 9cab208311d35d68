"""Per-row inputs of the exact-rank path: bf16 copies with norm bounds, and exact scores of chosen pairs.

Each has a native version (one pass, `native.py`) and a torch fallback; the two may differ in their
bounds (both rigorous) and in the last bit of a float64 score, never in the ranks.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from m3jepa.accel.search import native
from m3jepa.accel.search.bf16 import FP32_UNIT


@dataclass
class Prepared:
    """Rows x as float32 (and bf16) tensors, with float64 upper bounds of three norms per row."""

    x: Tensor  # (N, d) float32, shares memory with the caller's array
    x16: Tensor | None  # (N, d) bf16, or None: converted block by block (`block16`)
    norm: np.ndarray  # (N,) ≥ ‖x‖
    err: np.ndarray  # (N,) ≥ ‖x − bf16(x)‖
    norm16: np.ndarray  # (N,) ≥ ‖bf16(x)‖
    kernel: ctypes.CDLL | None = None
    amax: np.ndarray | None = None  # (N,) float32 max |x| per row (native path only): the int8 scales

    @property
    def finite(self) -> bool:
        """False if a row holds NaN/inf or overflows (its norms are then non-finite)."""
        return bool(np.isfinite(self.norm).all() and np.isfinite(self.norm16).all())

    def block16(self, lo: int, hi: int, out: Tensor) -> Tensor:
        """bf16 rows lo:hi, (hi − lo, d): a view of x16, or converted into `out` (reused: fresh pages
        of a 100 MB copy cost as much as writing it)."""
        if self.x16 is not None:
            return self.x16[lo:hi]
        d = self.x.shape[1]

        def run(span: tuple[int, int]) -> None:
            a, b = span
            src, dst = native.ptr(self.x) + 4 * (lo + a) * d, native.ptr(out) + 2 * a * d
            self.kernel.prepare_rows(src, b - a, d, dst, None, None)

        native.parallel(run, hi - lo)
        return out[: hi - lo]


def prepare(x: np.ndarray, kernel: ctypes.CDLL | None, copy: bool = True) -> Prepared:
    """Norm bounds of x (N, d) float32 (C-contiguous), and its bf16 copy unless `copy=False` (the
    native path then converts block by block; the torch path always copies)."""
    xt = torch.from_numpy(x)
    return _prepare_native(kernel, xt, copy) if kernel is not None else _prepare_torch(xt)


def _prepare_native(kernel: ctypes.CDLL, x: Tensor, copy: bool) -> Prepared:
    """One pass: float64 sums of squares (exact terms; the sum errs by ≤ d·u64 relative), bf16 copy."""
    n, d = x.shape
    x16 = torch.empty((n, d), dtype=torch.bfloat16) if copy else None
    sq = np.empty((n, 3))  # (N, 3) Σx², Σ(x − x16)², Σx16²
    amax = np.empty(n, np.float32)  # (N,) max |x|

    def run(span: tuple[int, int]) -> None:
        lo, hi = span
        rows16 = native.ptr(x16) + 2 * lo * d if x16 is not None else None
        out = native.ptr(sq[lo:]), native.ptr(amax[lo:])
        kernel.prepare_rows(native.ptr(x) + 4 * lo * d, hi - lo, d, rows16, *out)

    native.parallel(run, n)
    norms = np.sqrt(sq) * (1 + 1e-12)  # float64 sum of ≤ 2**20 terms and sqrt: far below 1e-12
    return Prepared(x, x16, norms[:, 0], norms[:, 1], norms[:, 2], kernel, amax)


def _prepare_torch(x: Tensor) -> Prepared:
    """Norms in float32 (a float64 pass costs as much as the whole bf16 product), inflated by 2·d·u32
    for their rounding; x − bf16(x) is exact in float32, ‖bf16(x)‖ ≤ ‖x‖ + ‖x − bf16(x)‖."""
    x16 = x.bfloat16()
    grow = 1 + 2 * x.shape[1] * FP32_UNIT
    n = torch.linalg.vector_norm(x, dim=1).double().numpy() * grow
    e = torch.linalg.vector_norm(x - x16.float(), dim=1).double().numpy() * grow
    return Prepared(x, x16, n, e, n + e)


def pair_dots(a: Tensor, b: Tensor, ai: np.ndarray, bi: np.ndarray, kernel: ctypes.CDLL | None) -> np.ndarray:
    """Exact inner products a[ai] · b[bi], (P,) float64: products of float32 values are exact in
    float64 and the sums err by < 1e-12 (unit vectors, d = 2048). Equal rows give equal scores on
    each path (the order of summation depends on the element index only), and a·b = b·a."""
    ai, bi = np.ascontiguousarray(ai, np.int64), np.ascontiguousarray(bi, np.int64)
    if kernel is None:
        return _pair_dots_torch(a, b, ai, bi)
    out = np.empty(len(ai))
    d = a.shape[1]

    def run(span: tuple[int, int]) -> None:
        lo, hi = span
        idx = native.ptr(ai[lo:]), native.ptr(bi[lo:])
        kernel.pair_dots(native.ptr(a), native.ptr(b), d, *idx, hi - lo, native.ptr(out[lo:]))

    native.parallel(run, len(ai))
    return out


def _pair_dots_torch(a: Tensor, b: Tensor, ai: np.ndarray, bi: np.ndarray, chunk: int = 512) -> np.ndarray:
    """`pair_dots` in torch; small chunks keep the gathered (n, d) rows in cache."""
    out = np.empty(len(ai))
    ai_t, bi_t = torch.from_numpy(ai), torch.from_numpy(bi)
    for lo in range(0, len(ai), chunk):
        x, y = a[ai_t[lo : lo + chunk]].double(), b[bi_t[lo : lo + chunk]].double()  # (n, d) each
        out[lo : lo + chunk] = torch.linalg.vecdot(x, y).numpy()
    return out
