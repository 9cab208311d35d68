"""`Bf16Dropout`: dropout on bf16 activations in one pass, with a counter-based mask that backward recomputes.

torch's CPU dropout draws a Bernoulli per element and keeps the mask for backward; the torch
fallback here (`Bf16Dropout`'s) still takes five passes (random bits, compare, scale, select, and
a select again in backward). This kernel hashes (seed, element index) into 16 random bits per
element, keeps the element when they clear the threshold, and writes the scaled value: one read
and one write, forward and backward alike, and no mask stored. The seed is drawn from torch's
generator, so a run seeded (or resumed with its RNG state) the same way draws the same masks.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor, nn

from m3jepa.accel.native import BF16_CXX

# splitmix64's finaliser of (seed + (i // 4 + 1) · golden ratio) gives 64 bits per 4 elements;
# element i keeps when bits [16 (i % 4), 16 (i % 4) + 16) >= threshold. `_hash_mask_reference` in
# tests/test_perf_paths.py computes the same mask in numpy.
_SRC = BF16_CXX + r"""
#include <thread>
#include <vector>

static inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Blocks of 64 groups: the 64-bit hashes first, then the select over their 256 16-bit words (little
// endian: word e of group j is bits [16e, 16e + 16) of its hash), so both loops vectorise.
static void run(const uint16_t* __restrict x, uint16_t* __restrict y, int64_t lo, int64_t hi,
                uint64_t seed, uint32_t threshold, float scale) {
  uint64_t z[64];
  uint16_t bits[256];
  for (int64_t j0 = lo; j0 < hi; j0 += 64) {
    const int64_t len = hi - j0 < 64 ? hi - j0 : 64;
    for (int64_t j = 0; j < len; ++j) z[j] = mix(seed + uint64_t(j0 + j + 1) * 0x9e3779b97f4a7c15ULL);
    std::memcpy(bits, z, sizeof(uint64_t) * len);
    const uint16_t* __restrict xs = x + 4 * j0;
    uint16_t* __restrict ys = y + 4 * j0;
    for (int64_t i = 0; i < 4 * len; ++i)
      ys[i] = bits[i] >= threshold ? f32_to_bf16(bf16_to_f32(xs[i]) * scale) : uint16_t(0);
  }
}

// n must be a multiple of 4. Threads split the groups, so the mask does not depend on the thread count
// (nor on the block boundaries: each group's hash depends only on its index).
extern "C" void dropout_bf16(const uint16_t* x, uint16_t* y, int64_t n, uint64_t seed, uint32_t threshold,
                             float scale, int threads) {
  const int64_t groups = n / 4;
  if (groups < (int64_t(1) << 15)) threads = 1;  // thread start-up outweighs small tensors
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t)
    pool.emplace_back(run, x, y, groups * t / threads, groups * (t + 1) / threads, seed, threshold, scale);
  run(x, y, 0, groups / threads, seed, threshold, scale);
  for (auto& th : pool) th.join();
}
"""

_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]


@cache
def _kernel() -> Callable | None:
    """The compiled kernel (m3jepa.accel.native), or None: callers then take their torch path."""
    from m3jepa.accel.native import build

    lib = build("dropout_bf16", _SRC, _FLAGS, lang="c++", symbols=("dropout_bf16",))
    if lib is None:
        return None
    fn = lib.dropout_bf16
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_uint64,
        ctypes.c_uint32,
        ctypes.c_float,
        ctypes.c_int,
    ]
    fn.restype = None
    return fn


def available(x: Tensor) -> bool:
    """Whether the kernel takes `x`: contiguous bf16 on the CPU, a multiple of 4 elements, kernel built."""
    # the kernel reads each hash as four 16-bit words, so the mask is defined for little-endian hosts
    if sys.byteorder != "little" or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    return x.is_contiguous() and x.numel() % 4 == 0 and _kernel() is not None


def apply_mask(x: Tensor, seed: int, threshold: int, scale: float) -> Tensor:
    """(same shape) bf16: x · scale where the (seed, index) bits clear `threshold`, else 0."""
    x = x.contiguous()
    y = torch.empty_like(x)
    _kernel()(x.data_ptr(), y.data_ptr(), x.numel(), seed, threshold, scale, torch.get_num_threads())
    return y


class HashDropout(torch.autograd.Function):
    """Forward and backward apply the same (seed-determined) mask and scale; nothing is saved."""

    @staticmethod
    def forward(ctx, x: Tensor, seed: int, threshold: int, scale: float) -> Tensor:
        ctx.mask = (seed, threshold, scale)
        return apply_mask(x, seed, threshold, scale)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None, None]:
        return apply_mask(g.to(torch.bfloat16), *ctx.mask), None, None, None


def draw_seed() -> int:
    """A 63-bit seed from torch's default generator (so manual_seed and saved RNG states govern it)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device="cpu"))  # the CPU generator


class Bf16Dropout(nn.Dropout):
    """nn.Dropout, with a cheaper mask for bf16 activations under autocast (training fast path).

    torch's CPU dropout draws one Bernoulli per element (~10 ns each here: 4M elements, 40-50 ms,
    per step at B = 128). The fast path uses 16 random bits per element and keeps an element when
    they clear a threshold, so the drop probability is p rounded to a multiple of 2⁻¹⁶
    (0.1 → 0.100006) and kept values are scaled by 1/(1 − that p): still unbiased. The bits come
    from this module's one-pass kernel (a hash of a seed and the element index) or, without a
    compiler, from torch's generator (64 bits per 4 elements).
    Outside bf16 autocast, or on float32 input, it is exactly nn.Dropout.
    """

    def forward(self, x: Tensor) -> Tensor:
        fast = self.training and 0.0 < self.p < 1.0 and x.dtype == torch.bfloat16 and not self.inplace
        if not fast or not torch.is_autocast_enabled(x.device.type) or x.numel() % 4:
            return super().forward(x)
        threshold = round(self.p * 65536)  # drop when the 16 random bits, as 0..65535, fall below it
        scale = 65536 / (65536 - threshold)
        if available(x):  # one pass each way, mask recomputed in backward
            return HashDropout.apply(x, draw_seed(), threshold, scale)
        bits = torch.empty(x.numel() // 4, dtype=torch.int64, device=x.device)
        bits = bits.random_(torch.iinfo(torch.int64).min, None).view(torch.int16).view(x.shape)
        keep = bits >= threshold - 32768  # int16 is the 16 bits shifted by -32768
        return torch.where(keep, x * scale, 0.0)
