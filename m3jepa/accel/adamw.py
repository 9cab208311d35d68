"""`ShadowAdamW`: fused AdamW over float32 masters that keeps their bf16 shadows and folds clipping in.

Private torch API used here, each checked by tests/test_accel.py: the fused AdamW kernel's `grad_scale`
(it divides every gradient by it), `torch._foreach_*` (the step counters, copies, norms) and, through
`m3jepa.accel.shadows`, `Tensor._version`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor, nn

from m3jepa.accel.native import BF16_CXX
from m3jepa.accel.shadows import SHADOW_ATTR, attach_bf16_shadow, refresh_bf16_shadows, stale_bf16_shadows


class ShadowAdamW(torch.optim.AdamW):
    """Fused AdamW on float32 masters, with bf16 shadows of the Bf16Linear weights and clipping folded in.

    The step is memory-bound (docs/benchmarks.md), so what counts is passes over the weights.
    Autocast costs, per weight and step: a float32→bf16 cast in forward, a bf16→float32 cast of
    the gradient, a norm pass and a scaling pass for clipping, then fused AdamW. Here:
      forward and backward use the bf16 shadow directly, so the gradient stays bf16 (shadow.grad);
      the clip norm reads those bf16 gradients; the clip factor goes into the update as a tensor
      (no separate scaling pass, no host sync);
      one C++ pass (`fused_adamw_bf16_shadow_`) updates master and moments from the bf16 gradient
      and writes the new shadow.
    Everything else (1-d parameters, the float32 gates) takes torch's fused AdamW with the same
    clip factor. Groups, state and state_dict are torch's AdamW(fused=True) unchanged, so
    checkpoints load either way; shadows are rebuilt from the masters, never saved.
    """

    def __init__(self, groups: list[dict], lr: float, shadowed: list[nn.Parameter]) -> None:
        super().__init__(groups, lr=lr, fused=True)
        self.shadowed = list(shadowed)
        for p in self.shadowed:
            attach_bf16_shadow(p)
        self._grad32: dict[int, Tensor] = {}  # id(master) -> (same shape) float32 gradient buffer

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear master and shadow gradients; refresh any shadow whose master changed in place.

        The loop calls this before every forward, so a master changed since the last update (a
        checkpoint loaded after the optimizer was built) gets its shadow back before it is used,
        and a resumed run takes exactly the path of an uninterrupted one.
        """
        super().zero_grad(set_to_none=set_to_none)
        for p in self.shadowed:
            getattr(p, SHADOW_ATTR).weight.grad = None
        refresh_bf16_shadows(stale_bf16_shadows(self.shadowed))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        refresh_bf16_shadows(stale_bf16_shadows(self.shadowed))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, max_grad_norm: float = 0.0) -> None:
        """One update; `max_grad_norm` > 0 clips the global gradient norm as clip_grad_norm_ does."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        pure = {id(p): p for p in self.shadowed if _shadow_grad(p) is not None and p.grad is None}
        for p in self.shadowed:  # rare: also used outside the shadow path, so .grad holds a part too
            if id(p) not in pure and _shadow_grad(p) is not None and p.grad is not None:
                p.grad.add_(_shadow_grad(p))
        params = [p for g in self.param_groups for p in g["params"] if id(p) in pure or p.grad is not None]
        norm_of = [_shadow_grad(p) if id(p) in pure else p.grad for p in params]
        mult = _clip_coef(norm_of, max_grad_norm) if max_grad_norm > 0 else torch.ones((), device="cpu")
        done = self._kernel_step(list(pure.values()), mult)
        widened = self._widen([p for p in pure.values() if id(p) not in done])
        self.grad_scale = mult.reciprocal() if max_grad_norm > 0 else None  # fused AdamW divides by it
        super().step()  # every master with a float32 .grad: 1-d parameters, gates, fallbacks
        self.grad_scale = None
        refresh_bf16_shadows([p for p in self.shadowed if id(p) not in done and p.grad is not None])
        for p in widened:
            p.grad = None  # the buffer is reused next step

    def _kernel_step(self, masters: list[nn.Parameter], mult: Tensor) -> set[int]:
        """Update `masters` from their bf16 shadow gradients in one pass; returns the ids it did."""
        done: set[int] = set()
        for group in self.param_groups:
            ids = {id(p) for p in masters}
            ps = [p for p in group["params"] if id(p) in ids]
            if not ps:
                continue
            states = [self._state_of(p) for p in ps]
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1)  # as torch's AdamW: the update uses the incremented step
            ok = fused_adamw_bf16_shadow_(
                ps,
                [_shadow_grad(p) for p in ps],
                [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states],
                [getattr(p, SHADOW_ATTR).weight for p in ps],
                steps,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                betas=group["betas"],
                eps=group["eps"],
                grad_mult=mult,
            )
            if not ok:
                torch._foreach_sub_(steps, 1)  # the eager path (torch's AdamW) increments them itself
                return done
            done |= {id(p) for p in ps}
        return done

    def _state_of(self, p: nn.Parameter) -> dict:
        """p's AdamW state, created exactly as torch's fused AdamW creates it (same state_dict)."""
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)  # fused: float32 step
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _widen(self, masters: list[nn.Parameter]) -> list[nn.Parameter]:
        """Eager fallback: bf16 shadow gradients into persistent float32 .grad buffers."""
        bufs = [self._grad32.setdefault(id(p), torch.empty_like(p)) for p in masters]
        if masters:
            torch._foreach_copy_(bufs, [_shadow_grad(p) for p in masters])
        for p, buf in zip(masters, bufs, strict=True):
            p.grad = buf
        return masters


def _shadow_grad(p: Tensor) -> Tensor | None:
    return getattr(p, SHADOW_ATTR).weight.grad


def _clip_coef(grads: list[Tensor], max_norm: float) -> Tensor:
    """() clip_grad_norm_'s factor min(1, max_norm / (‖g‖ + 1e-6)), on device (no .item()).

    bf16 gradients are normed as they are (float accumulation, bf16 result per tensor: relative
    error ≤ 2⁻⁹ on the clip factor); widening them first would cost a full extra pass.
    """
    if not grads:
        return torch.ones((), device="cpu")  # the fast path is CPU-only
    bf16 = [g for g in grads if g.dtype == torch.bfloat16]
    fast = sumsq_bf16(bf16) if bf16 else None  # () the bulk: every shadowed weight's gradient
    rest = [g for g in grads if g.dtype != torch.bfloat16] if fast is not None else grads
    squares = [n.float().square() for n in torch._foreach_norm(rest)] if rest else []
    total = torch.stack([*squares, *([fast] if fast is not None else [])]).sum().sqrt()  # ()
    return (max_norm / (total + 1e-6)).clamp(max=1.0)


# ---------------------------------------------------------------- the one-pass update kernel

# Plain C++ (no torch headers: it builds in about a second) called through ctypes with raw
# pointers. One pass per weight reads master, bf16 gradient and both moments and writes master,
# moments and the bf16 shadow: 28 bytes per parameter, against 40 for the eager path (widen the
# gradient, fused AdamW, refresh the shadow), each of which is a full pass over memory.
_KERNEL_SRC = BF16_CXX + r"""
#include <cmath>
#include <thread>
#include <vector>

struct Args {
  int64_t count; float** p; const uint16_t** g; float** m; float** v; uint16_t** s; const int64_t* n;
  const float** step; double lr, wd, b1, b2, eps; const float* mult;
};

static void run(const Args& a, int part, int parts) {
  // Coefficients in double, then rounded once, as torch's fused kernel does (1 - 0.999f in float
  // is off by 1.3e-5 relative).
  const float mult = *a.mult, decay = float(1.0 - a.lr * a.wd), eps = float(a.eps);
  const float b1 = float(a.b1), omb1 = float(1.0 - a.b1), b2 = float(a.b2), omb2 = float(1.0 - a.b2);
  for (int64_t t = 0; t < a.count; ++t) {
    const double step = *a.step[t];  // already incremented, as torch's AdamW does before its update
    const float step_size = float(a.lr / (1.0 - std::pow(a.b1, step)));
    const float bc2_sqrt = float(std::sqrt(1.0 - std::pow(a.b2, step)));
    float* __restrict p = a.p[t]; const uint16_t* __restrict g = a.g[t];
    float* __restrict m = a.m[t]; float* __restrict v = a.v[t]; uint16_t* __restrict s = a.s[t];
    const int64_t lo = a.n[t] * part / parts, hi = a.n[t] * (part + 1) / parts;
    for (int64_t i = lo; i < hi; ++i) {
      const float gi = bf16_to_f32(g[i]) * mult;
      const float mi = m[i] + omb1 * (gi - m[i]);  // lerp(m, g, 1 - b1)
      const float vi = b2 * v[i] + omb2 * gi * gi;
      const float pi = p[i] * decay - step_size * mi / (std::sqrt(vi) / bc2_sqrt + eps);
      m[i] = mi; v[i] = vi; p[i] = pi; s[i] = f32_to_bf16(pi);
    }
  }
}

// Sum of squares of bf16 gradients, for the clip norm: 16 float lanes (so the loop vectorises
// without reassociation flags), folded into double every 4096 elements.
static void sumsq_run(const uint16_t* const* g, const int64_t* n, int64_t count, int part, int parts,
                      double* out) {
  double total = 0.0;
  for (int64_t t = 0; t < count; ++t) {
    const uint16_t* __restrict x = g[t];
    const int64_t lo = n[t] * part / parts, hi = n[t] * (part + 1) / parts;
    int64_t i = lo;
    while (i < hi) {
      const int64_t end = hi - i > 4096 ? i + 4096 : hi;
      float acc[16] = {0};
      for (; i + 16 <= end; i += 16)
        for (int l = 0; l < 16; ++l) { const float f = bf16_to_f32(x[i + l]); acc[l] += f * f; }
      for (; i < end; ++i) { const float f = bf16_to_f32(x[i]); acc[0] += f * f; }
      double block = 0.0;
      for (int l = 0; l < 16; ++l) block += acc[l];
      total += block;
    }
  }
  *out = total;
}

extern "C" double sumsq_bf16(const uint16_t* const* g, const int64_t* n, int64_t count, int threads) {
  std::vector<double> parts(threads, 0.0);
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(sumsq_run, g, n, count, t, threads, &parts[t]);
  sumsq_run(g, n, count, 0, threads, &parts[0]);
  for (auto& th : pool) th.join();
  double total = 0.0;
  for (double p : parts) total += p;
  return total;
}

extern "C" void adamw_bf16_shadow(const Args* a, int threads) {
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, std::cref(*a), t, threads);
  run(*a, 0, threads);
  for (auto& th : pool) th.join();
}
"""


# -fno-math-errno: without it std::sqrt may set errno, and gcc will not vectorise the loop.
_KERNEL_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-pthread")


class _Args(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_int64),
        *[(k, ctypes.POINTER(ctypes.c_void_p)) for k in ("p", "g", "m", "v", "s")],
        ("n", ctypes.POINTER(ctypes.c_int64)),
        ("step", ctypes.POINTER(ctypes.c_void_p)),
        *[(k, ctypes.c_double) for k in ("lr", "wd", "b1", "b2", "eps")],
        ("mult", ctypes.c_void_p),
    ]


@cache
def _lib() -> ctypes.CDLL | None:
    """The compiled kernels (m3jepa.accel.native: built once, cached per source, flags and CPU), or None."""
    from m3jepa.accel.native import build

    # None without a compiler or with M3JEPA_NATIVE=0: the eager paths compute the same thing
    return build("adamw_bf16_shadow", _KERNEL_SRC, list(_KERNEL_FLAGS), lang="c++",
                 symbols=("adamw_bf16_shadow", "sumsq_bf16"))


@cache
def _kernel() -> Callable | None:
    """The one-pass AdamW update, or None."""
    if (lib := _lib()) is None:
        return None
    fn = lib.adamw_bf16_shadow
    fn.argtypes, fn.restype = [ctypes.POINTER(_Args), ctypes.c_int], None
    return fn


@cache
def _sumsq_kernel() -> Callable | None:
    """The bf16 sum-of-squares for the clip norm, or None (torch's norms instead)."""
    if (lib := _lib()) is None:
        return None
    fn = lib.sumsq_bf16
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    fn.restype = ctypes.c_double
    return fn


def _ptrs(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def sumsq_bf16(grads: list[Tensor]) -> Tensor | None:
    """() float32 Σ g² over contiguous bf16 CPU tensors in one threaded pass, or None without the kernel."""
    fn = _sumsq_kernel()
    if fn is None or not all(g.is_contiguous() and g.device.type == "cpu" for g in grads):
        return None
    counts = (ctypes.c_int64 * len(grads))(*[g.numel() for g in grads])
    total = fn(
        ctypes.cast(_ptrs(grads), ctypes.c_void_p),
        ctypes.cast(counts, ctypes.c_void_p),
        len(grads),
        torch.get_num_threads(),
    )
    return torch.tensor(total, dtype=torch.float32, device="cpu")


def fused_adamw_bf16_shadow_(
    params: list[Tensor],
    grads16: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    shadows: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    grad_mult: Tensor,
) -> bool:
    """AdamW on float32 masters from bf16 gradients × grad_mult, writing bf16 shadows, in one pass.

    `steps` must already be incremented. Returns False (nothing done) when the kernel cannot be
    built; the caller then takes the eager path.
    """
    fn = _kernel()
    if fn is None:
        return False
    for t in (*params, *exp_avgs, *exp_avg_sqs, *grads16, *shadows):
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("fused_adamw_bf16_shadow_ needs contiguous CPU tensors")
    mult = grad_mult.to(torch.float32).contiguous()  # () kept alive until the call returns
    args = _Args(
        len(params),
        _ptrs(params),
        _ptrs(grads16),
        _ptrs(exp_avgs),
        _ptrs(exp_avg_sqs),
        _ptrs(shadows),
        (ctypes.c_int64 * len(params))(*[p.numel() for p in params]),
        _ptrs(steps),
        lr,
        weight_decay,
        betas[0],
        betas[1],
        eps,
        mult.data_ptr(),
    )
    fn(ctypes.byref(args), torch.get_num_threads())
    return True
