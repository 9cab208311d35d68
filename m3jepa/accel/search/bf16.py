"""bfloat16 numerics shared by the search paths: unit roundoffs and monotone int16 keys of bf16 scores."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (7 stored mantissa bits, round to nearest)
FP32_UNIT = 2.0**-24
KEY_OFF = 32767  # a threshold key no finite bf16 score reaches: the query needs no rank
NEG_INF_BITS = -128  # 0xFF80, bf16 −inf as int16: masked scores sort below every threshold


def keys(x: np.ndarray, up: bool) -> np.ndarray:
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


def key_values(k16: np.ndarray) -> Tensor:
    """The bf16 values (as float32) of int16 keys; the 'off' key maps to NaN (nothing reaches it)."""
    k = k16.astype(np.int64)
    bits = np.where(k < 0, (k + 0x10000) ^ 0x7FFF, k).astype(np.uint32) << 16
    vals = bits.view(np.float32).copy()
    vals[k16 == KEY_OFF] = np.nan  # every comparison with NaN is false
    return torch.from_numpy(vals)
