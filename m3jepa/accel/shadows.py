"""bf16 weight shadows: a bf16 copy of each float32 master weight, used by `Bf16Linear` under bf16 autocast.

The optimizer (`m3jepa.accel.adamw.ShadowAdamW`) keeps the copy next to its float32 master, so bf16
autocast needs no per-step weight cast and the weight gradient stays bf16. A shadow is valid while its
master's version counter (`Tensor._version`, private torch API: tests/test_accel.py checks that it still
bumps on in-place changes) is the one recorded when it was copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SHADOW_ATTR = "_m3jepa_bf16_shadow"  # the attribute of a float32 master Parameter that holds its shadow


@dataclass
class Bf16Shadow:
    """A bf16 copy of a float32 master weight, valid while the master's `_version` is `version`.

    `weight` is a leaf that requires grad: under autocast the forward uses it instead of casting the
    master, so backward leaves the weight gradient in `weight.grad` (bf16) for the optimizer.
    """

    weight: Tensor  # same shape as the master, bfloat16
    version: int  # master._version when `weight` was last copied from it
    grad_buffer: Tensor | None = None  # same shape, bf16: the memory `weight.grad` is written into


def _shadow_grad_into(shadow: Bf16Shadow, gt: Tensor, x16: Tensor) -> None:
    """shadow.weight.grad += gt @ x16, written into one buffer kept across steps.

    A fresh (out, in) gradient each step costs more than the product itself here: at 2048² and
    T = 96 rows, 7 ms into new memory against 2.2 ms into memory already touched (page faults of
    the 8 MB result; docs/benchmarks.md). zero_grad sets `weight.grad` to None, and the next
    backward overwrites the same buffer.
    """
    w = shadow.weight
    if w.grad is not None:  # a second use in this backward: accumulate, as autograd would
        w.grad.addmm_(gt, x16)
        return
    if shadow.grad_buffer is None or shadow.grad_buffer.shape != w.shape:
        shadow.grad_buffer = torch.empty_like(w, memory_format=torch.contiguous_format)
    torch.mm(gt, x16, out=shadow.grad_buffer)
    w.grad = shadow.grad_buffer


def attach_bf16_shadow(master: nn.Parameter) -> Bf16Shadow:
    """Give `master` (float32) a bf16 shadow, filled now; the optimizer refreshes it after each update."""
    shadow = Bf16Shadow(weight=torch.empty_like(master, dtype=torch.bfloat16, requires_grad=True), version=-1)
    setattr(master, SHADOW_ATTR, shadow)
    refresh_bf16_shadows([master])
    return shadow


@torch.no_grad()
def refresh_bf16_shadows(masters: Sequence[Tensor]) -> None:
    """Copy each master into its shadow (round to nearest even, as autocast's cast) and mark it fresh."""
    pairs = [(m, getattr(m, SHADOW_ATTR)) for m in masters]
    if pairs:
        torch._foreach_copy_([s.weight for _, s in pairs], [m for m, _ in pairs])
    for m, s in pairs:
        s.version = m._version


def stale_bf16_shadows(masters: Sequence[Tensor]) -> list[Tensor]:
    """The masters whose shadow no longer matches them (changed in place, e.g. by load_state_dict)."""
    return [m for m in masters if (s := getattr(m, SHADOW_ATTR, None)) and s.version != m._version]


def fresh_bf16_shadow(master: Tensor) -> Tensor | None:
    """The bf16 shadow of `master` if it is fresh and bf16 autocast is on, else None (plain path).

    A stale shadow is never used: the version counter catches in-place changes such as
    load_state_dict. (The fused AdamW kernel does not bump it; the optimizer that owns the shadows
    refreshes them itself after every update.)
    """
    s = getattr(master, SHADOW_ATTR, None)
    if s is None or s.version != master._version or master.dtype != torch.float32:
        return None
    dev = master.device.type
    if not torch.is_autocast_enabled(dev) or torch.get_autocast_dtype(dev) != s.weight.dtype:
        return None
    return s.weight


class _ShadowLinearFn(torch.autograd.Function):
    """y = x W16ᵀ + b in bf16, with the weight gradient taken from a contiguous gᵀ.

    On CPU (oneDNN, AMX) gᵀ·x with gᵀ a transposed view runs 2-2.5x slower than with gᵀ made
    contiguous first (measured at T = 85..1024 rows, 2048²): the copy costs far less than it saves.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w16: Tensor, bias: Tensor | None, shadow: Bf16Shadow) -> Tensor:
        x16 = x.to(w16.dtype)  # (T, in); a no-op for bf16 rows
        ctx.save_for_backward(x16, w16)
        ctx.has_bias, ctx.shadow = bias is not None, shadow
        return F.linear(x16, w16, None if bias is None else bias.to(w16.dtype))  # (T, out)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        x16, w16 = ctx.saved_tensors
        g = g.to(w16.dtype)  # (T, out)
        gx = g @ w16 if ctx.needs_input_grad[0] else None  # (T, in); autograd casts it to x's dtype
        if ctx.needs_input_grad[1]:  # (out, in) bf16, straight into the shadow's gradient buffer
            _shadow_grad_into(ctx.shadow, g.t().contiguous(), x16)
        gb = g.sum(0, dtype=torch.float32) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (out,)
        return gx, None, gb, None


class Bf16Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) that uses its weight's bf16 shadow when fresh.

    Without a shadow, or outside bf16 autocast, it is exactly nn.Linear.
    """

    def forward(self, x: Tensor) -> Tensor:
        w16 = fresh_bf16_shadow(self.weight)
        if w16 is None:
            return F.linear(x, self.weight, self.bias)
        return _ShadowLinearFn.apply(x, w16, self.bias, getattr(self.weight, SHADOW_ATTR))


