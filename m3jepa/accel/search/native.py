"""The native kernels of the exact-rank path: small C functions built on first use with the system compiler.

Four passes that eager torch runs several times slower (each is memory-bound, torch needs several
passes and temporaries per result): the bf16 copy of the inputs with their norms, their int8 copy
with its error norms, exact (float64) scores of scattered pairs, and the counting of each block of
bf16 scores against the thresholds.
`load()` returns None without a C compiler (or with M3JEPA_NATIVE=0); every caller has a torch
fallback with the same results.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)
T = TypeVar("T")

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* bf16 bits -> int16 key whose integer order is the float order */
static inline int16_t key16(uint16_t x) { return (int16_t)(x ^ ((uint16_t)((int16_t)x >> 15) >> 1)); }

/* 8-lane vectors (GCC/Clang vector extensions): the lanes are explicit, so the summation order
   is fixed whatever the compiler emits, and no -ffast-math is needed to vectorize the sums. */
typedef float f8 __attribute__((vector_size(32)));
typedef uint32_t u8x __attribute__((vector_size(32)));
typedef uint16_t h8 __attribute__((vector_size(16)));
typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16x __attribute__((vector_size(64)));
typedef int8_t c16 __attribute__((vector_size(16)));
typedef double d8 __attribute__((vector_size(64)));

static inline double hsum(d8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

/* Rows x (n, d) -> x16 (n, d) bf16 (round to nearest even) and, per row, sq[3i..3i+2] = sum x^2,
   sum (x - x16)^2, sum x16^2 in float64 (each square is exact in float64, x - x16 exact in float32),
   and amax[i] = max |x| (the int8 scale). x16 may be NULL (norms only); sq and amax are written only
   with sq (the bf16 copy of a block only). Non-finite rows give non-finite sums; the caller refuses them. */
void prepare_rows(const float *restrict x, int64_t n, int64_t d,
                  uint16_t *restrict x16, double *restrict sq, float *restrict amax) {
    for (int64_t i = 0; i < n; i++) {
        const float *restrict r = x + i * d;
        d8 s0 = {0}, s1 = {0}, s2 = {0};
        u8x m = {0};
        double t0 = 0, t1 = 0, t2 = 0;
        float mt = 0;
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            f8 v; memcpy(&v, r + j, 32);
            u8x u; memcpy(&u, &v, 32);
            u8x h = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            if (x16) { h8 h16 = __builtin_convertvector(h, h8); memcpy(x16 + i * d + j, &h16, 16); }
            if (sq) {
                u8x hb = h << 16; f8 hv; memcpy(&hv, &hb, 32);
                d8 dv = __builtin_convertvector(v, d8), dh = __builtin_convertvector(hv, d8);
                d8 de = __builtin_convertvector(v - hv, d8);
                s0 += dv * dv; s1 += de * de; s2 += dh * dh;
                u8x au = u & 0x7FFFFFFFu, gt = (u8x)(au > m);  /* |x| bits: integer order = float order */
                m = (m & ~gt) | (au & gt);
            }
        }
        for (; j < d; j++) {
            float v = r[j]; uint32_t u; memcpy(&u, &v, 4);
            uint32_t hb = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) << 16; float hv; memcpy(&hv, &hb, 4);
            if (x16) x16[i * d + j] = (uint16_t)(hb >> 16);
            double dv = v, dh = hv, de = (double)(v - hv);
            t0 += dv * dv; t1 += de * de; t2 += dh * dh;
            float av = v < 0 ? -v : v; mt = mt < av ? av : mt;
        }
        if (sq) {
            sq[3 * i] = hsum(s0) + t0; sq[3 * i + 1] = hsum(s1) + t1; sq[3 * i + 2] = hsum(s2) + t2;
            uint32_t mb = 0; float mv;
            for (int l = 0; l < 8; l++) mb = mb < m[l] ? m[l] : mb;
            memcpy(&mv, &mb, 4);
            amax[i] = mt < mv ? mv : mt;
        }
    }
}

/* Rows x (n, d) -> q (n, d) int8 with x ~ scale[i] * q, and per row sq[i] = sum (x - scale*q)^2 in float32;
   the caller inflates it for the rounding of the product (<= 127 u32 relative to |x - scale*q| <= scale/2
   when it is not fused), of the difference, the square and the sum.
   Rounding: the float32 magic-number trick, round to nearest even for |x/scale| < 2^22; clamped to
   [-127, 127]: a poor rounding loosens the bound, never breaks it. */
void quantize_rows(const float *restrict x, int64_t n, int64_t d, const float *restrict scale,
                   int8_t *restrict q, float *restrict sq) {
    const float magic = 12582912.0f;  /* 1.5 * 2^23 */
    for (int64_t i = 0; i < n; i++) {
        const float *restrict r = x + i * d;
        int8_t *restrict out = q + i * d;
        const float inv = 1.0f / scale[i], s = scale[i];
        f16v e0 = {0};
        float t0 = 0;
        int64_t j = 0;
        for (; j + 16 <= d; j += 16) {
            f16v v; memcpy(&v, r + j, 64);
            i16x y = __builtin_convertvector((v * inv + magic) - magic, i16x);
            i16x hi = y > 127, lo = y < -127;
            y = (y & ~(hi | lo)) | (127 & hi) | (-127 & lo);
            c16 y8 = __builtin_convertvector(y, c16); memcpy(out + j, &y8, 16);
            f16v yf = __builtin_convertvector(y, f16v);
            f16v e = v - yf * s;
            e0 += e * e;
        }
        for (; j < d; j++) {
            float y = (r[j] * inv + magic) - magic;
            y = y > 127.0f ? 127.0f : (y < -127.0f ? -127.0f : y);
            out[j] = (int8_t)y;
            float e = r[j] - y * s;
            t0 += e * e;
        }
        float acc = t0;
        for (int l = 0; l < 16; l++) acc += e0[l];
        sq[i] = acc;
    }
}

/* out[p] = a[ai[p]] . b[bi[p]] in float64: every product of two float32 is exact in float64, and the
   summation order depends on the element index only, so equal rows give bit-equal scores (ties). */
void pair_dots(const float *restrict a, const float *restrict b, int64_t d,
               const int64_t *restrict ai, const int64_t *restrict bi, int64_t n, double *restrict out) {
    for (int64_t p = 0; p < n; p++) {
        const float *restrict x = a + ai[p] * d, *restrict y = b + bi[p] * d;
        if (p + 1 < n) {  /* the next gallery row is random: start fetching it now */
            const char *nx = (const char *)(b + bi[p + 1] * d);
            for (int64_t c = 0; c < 4 * d && c < 1024; c += 64) __builtin_prefetch(nx + c);
        }
        d8 acc = {0};
        double tail = 0;
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            f8 u, v; memcpy(&u, x + j, 32); memcpy(&v, y + j, 32);
            acc += __builtin_convertvector(u, d8) * __builtin_convertvector(v, d8);
        }
        for (; j < d; j++) tail += (double)x[j] * (double)y[j];
        out[p] = hsum(acc) + tail;
    }
}

/* One pass over a (rows, cols) block of bf16 scores: per row and per column, how many entries are above
   hi (certainly before) and at least lo (possibly before), and the [row, col, flags] of the band entries
   that can matter: a row's only while its certain count is below kmax, a column's only while its
   thresholds are on (the caller turns off columns already at kmax). */
int64_t band_count(const uint16_t *restrict s, int64_t rows, int64_t cols, int64_t has_cols, int64_t kmax,
                   const int16_t *restrict rhi, const int16_t *restrict rlo,
                   int32_t *restrict rn_hi, int32_t *restrict rn_lo,
                   const int16_t *restrict chi, const int16_t *restrict clo,
                   int32_t *restrict cn_hi, int32_t *restrict cn_lo,
                   uint8_t *restrict flags, int64_t *restrict band, int64_t cap) {
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
        const int32_t row_band = b > a && a < kmax;
        if (!row_band && cb == 0) continue;
        /* Flags in a branch-free pass, then a word-at-a-time scan: band entries are sparse. */
        for (int64_t j = 0; j < cols; j++) {
            int16_t k = key16(r[j]);
            int32_t in_row = row_band & (k >= lo) & (k <= hi);
            int32_t in_col = has_cols & (k >= clo[j]) & (k <= chi[j]);
            flags[j] = (uint8_t)(in_row | (in_col << 1));
        }
        for (int64_t j = 0; j < cols; j += 8) {
            uint64_t w = 0;
            memcpy(&w, flags + j, (size_t)(cols - j < 8 ? cols - j : 8));
            if (!w) continue;
            for (int64_t l = j; l < j + 8 && l < cols; l++) {
                if (flags[l]) {
                    if (n < cap) { band[3 * n] = i; band[3 * n + 1] = l; band[3 * n + 2] = flags[l]; }
                    n++;
                }
            }
        }
    }
    return n;
}
"""
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-shared", "-fPIC"]
# the functions _build declares: a library without one of them was not built from C_SOURCE
SYMBOLS = ("prepare_rows", "quantize_rows", "pair_dots", "band_count")
_KERNEL: ctypes.CDLL | bool | None = None
_POOL: ThreadPoolExecutor | None = None


def load() -> ctypes.CDLL | None:
    """The compiled kernels, cached per source and CPU; None without a C compiler (or M3JEPA_NATIVE=0)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build() or False
    return _KERNEL or None


def _build() -> ctypes.CDLL | None:
    from m3jepa.accel.native import build

    kernel = build("search_kernels", C_SOURCE, FLAGS, lang="c", symbols=SYMBOLS)
    if kernel is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    kernel.prepare_rows.restype = None
    kernel.prepare_rows.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
    kernel.quantize_rows.restype = None
    kernel.quantize_rows.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
    kernel.pair_dots.restype = None
    kernel.pair_dots.argtypes = [ptr, ptr, i64, ptr, ptr, i64, ptr]
    kernel.band_count.restype = i64
    kernel.band_count.argtypes = [ptr, i64, i64, i64, i64, *[ptr] * 10, i64]
    return kernel


def ptr(x: np.ndarray | Tensor) -> int:
    """Address of the first element (ctypes drops the GIL, so the kernels run in parallel threads)."""
    return x.data_ptr() if isinstance(x, Tensor) else x.ctypes.data


def spans(n: int, parts: int | None = None) -> list[tuple[int, int]]:
    """[lo, hi) ranges splitting n items into at most `parts` (default: torch's thread count) chunks."""
    parts = max(1, min(parts or torch.get_num_threads(), n))
    step = -(-n // parts)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)] if n else []


def parallel(fn: Callable[[tuple[int, int]], T], n: int) -> list[T]:
    """fn over the spans of n items, one thread each (the kernels release the GIL)."""
    global _POOL
    parts = spans(n)
    if len(parts) <= 1:
        return [fn(s) for s in parts]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(2, torch.get_num_threads()))
    return list(_POOL.map(fn, parts))
