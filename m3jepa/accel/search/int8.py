"""int8 first stage of the rank path: oneDNN (AMX) int8 products of quantised rows, with a rigorous bound.

With x ≈ x̂ = sx·q and y ≈ ŷ = sy·p (q, p int8), s − x̂·ŷ = (x − x̂)·y + x̂·(y − ŷ), so
|s − x̂·ŷ| ≤ ‖x − x̂‖‖y‖ + ‖x̂‖‖y − ŷ‖. The int32 accumulation of q·p is exact (d·127² < 2³¹ for
d ≤ 133,000); oneDNN then scales it by sx·sy in float32 and rounds to bf16, a relative error
that a self-test on first use checks against OUT_UNIT. The bound is ~8× a bf16 product's, so this
stage decides well-separated data (trained embeddings) and hands close calls to the bf16 stage.

Only with the native kernels, torch's `onednn::qlinear_pointwise` and a CPU with AMX-int8 or
AVX-512 VNNI (elsewhere oneDNN's s8·s8 path may saturate 16-bit sums); `M3JEPA_INT8=0` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from m3jepa.accel.search import native
from m3jepa.accel.search.bf16 import FP32_UNIT
from m3jepa.accel.search.rows import Prepared

log = logging.getLogger(__name__)

OUT_UNIT = 2.0**-7  # relative error allowed for the scaled bf16 output: twice bf16's, as margin
MAX_DIM = 133_000  # d·127² < 2³¹: the int32 sums cannot overflow
_SCALE_RANGE = (2.0**-40, 2.0**40)  # scale products stay normal in float32 (no flush to zero)
_OK: bool | None = None


@dataclass
class Quantized:
    """Rows as int8 with their scales: x ≈ scale·q, and float64 upper bounds of two norms per row."""

    q: Tensor  # (N, d) int8
    scale: np.ndarray  # (N,) float32
    err: np.ndarray  # (N,) ≥ ‖x − scale·q‖
    norm: np.ndarray  # (N,) ≥ ‖scale·q‖ (as ‖x‖ + ‖x − scale·q‖)


def available(kernel: ctypes.CDLL | None, d: int) -> bool:
    """Whether the int8 stage can run here: native kernels, a CPU with int8 dot products, the oneDNN op
    present and exact on a self-test (run once per process)."""
    global _OK
    if kernel is None or d > MAX_DIM or os.environ.get("M3JEPA_INT8", "1") == "0":
        return False
    if _OK is None:
        _OK = _cpu_has_amx() and _cpu_has_int8_dot() and _self_test()
        if not _OK:
            log.info("int8 first stage unavailable here; the rank path scores in bf16 only")
    return _OK


def quantize(p: Prepared, lo: int = 0, hi: int | None = None, out: Tensor | None = None) -> Quantized | None:
    """int8 copy of p's rows lo:hi, one scale per row, into `out` (reused) or a new tensor. None when a
    scale falls outside the safe range (tiny or huge inputs)."""
    hi = len(p.x) if hi is None else hi
    amax = p.amax[lo:hi].astype(np.float64)
    return _quantize(p, lo, hi, np.where(amax > 0, amax / 127, 1.0).astype(np.float32), out)


def quantize_shared(p: Prepared, lo: int, hi: int, out: Tensor) -> Quantized | None:
    """`quantize` with ONE scale for rows lo:hi: the oneDNN op takes a single scale for its left operand."""
    amax = float(p.amax[lo:hi].max(initial=0.0))
    return _quantize(p, lo, hi, np.full(hi - lo, amax / 127 if amax > 0 else 1.0, np.float32), out)


def _quantize(p: Prepared, lo: int, hi: int, scale: np.ndarray, out: Tensor | None) -> Quantized | None:
    n, d = hi - lo, p.x.shape[1]
    if n and not (_SCALE_RANGE[0] <= scale.min() and scale.max() <= _SCALE_RANGE[1]):
        return None
    q = torch.empty((n, d), dtype=torch.int8) if out is None else out[:n]
    sq = np.empty(n, np.float32)  # (n,) Σ(x − scale·q)²

    def run(span: tuple[int, int]) -> None:
        a, b = span
        src, dst = native.ptr(p.x) + 4 * (lo + a) * d, native.ptr(q) + a * d
        p.kernel.quantize_rows(src, b - a, d, native.ptr(scale[a:]), dst, native.ptr(sq[a:]))

    native.parallel(run, n)
    # float32 terms summed in float32: each term errs by ≤ (2·128 + 3)·u32 relative (an unfused
    # scale·q rounds at ≤ 128·u32 of a difference ≤ scale/2, the difference and square once each), the
    # sum by ≤ (d + 16)·u32; the square root halves both. ‖x̂‖ ≤ ‖x‖ + ‖x − x̂‖ needs no pass of its own.
    err = np.sqrt(sq.astype(np.float64)) * (1 + (d + 16 + 300) * FP32_UNIT)
    return Quantized(q, scale, err, p.norm[lo:hi] + err)


class Product:
    """rows (B, d) int8 @ cols.T, scaled to real scores in bf16, (B, C); cols packed once for oneDNN."""

    def __init__(self, cols: Quantized, block: int) -> None:
        self.packed = torch.ops.onednn.qlinear_prepack(cols.q, [block, cols.q.shape[1]])
        self.w_scale = torch.from_numpy(cols.scale.astype(np.float32))  # (C,) per column
        self.w_zero = torch.zeros(len(cols.scale), dtype=torch.int64)

    def __call__(self, q: Tensor, scale: float) -> Tensor:
        # A fresh output each call: at ≤ 32 MB glibc reuses the freed block, so no page faults.
        return torch.ops.onednn.qlinear_pointwise(
            q, float(scale), 0, self.packed, self.w_scale, self.w_zero, None, 1.0, 0, torch.bfloat16,
            "none", [], "",
        )  # fmt: skip


def _cpu_has_int8_dot() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_int8" in flags or " avx512_vnni" in flags


def _cpu_has_amx() -> bool:
    """Whether the int8 stage pays here. It was built and measured on AMX (docs/benchmarks.md §2). On an
    AMD EPYC with AVX-512 VNNI but no AMX, oneDNN's qlinear_pointwise gives the right product (the self-
    test passes) but so slowly that one COCO-5K search had not finished after 9 minutes (py-spy: inside
    the op), against about 3 s scored in bf16 only; so VNNI alone does not turn the stage on."""
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _self_test() -> bool:
    """The op on extreme and random int8 values, against exact float64: no saturation, the output
    within OUT_UNIT (relative) of the exact scaled product."""
    try:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (67, 1030), generator=g, dtype=torch.int8)
        p = torch.randint(-127, 128, (45, 1030), generator=g, dtype=torch.int8)
        q[0], p[0], q[1], p[1] = -127, -127, 127, -127  # sums at ±d·127²
        sx, sy = np.float32(0.0123), np.linspace(1e-3, 2.0, 45).astype(np.float32)
        cols = Quantized(p, sy, np.zeros(45), np.zeros(45))
        out = Product(cols, 67)(q, float(sx)).double()  # (67, 45)
        exact = (q.double() @ p.double().T) * float(sx) * torch.from_numpy(sy.astype(np.float64))
        return bool(((out - exact).abs() <= OUT_UNIT * exact.abs()).all())
    except (RuntimeError, AttributeError) as e:  # op missing or its signature changed
        log.info("int8 self-test failed: %s", e)
        return False
