"""The stage-2 optimizer: AdamW with its parameter groups, chosen by the Runtime, and the update step.

On the CPU fast path (`runtime.cpu_fast_path`: bf16 on a CPU device, no process group) the objective
gets the fast modules of `m3jepa.accel` and the optimizer is `accel.ShadowAdamW`. Everywhere else it is
torch's AdamW, fused where torch has a fused kernel for the device, built through public torch API and
stepped with the clipping folded into the fused update (`accel.clipped_step`: its `grad_scale` is the one
private torch API this path uses; tests/test_accel.py checks that it uses no other).
"""

from __future__ import annotations

import torch
from torch import nn

from m3jepa import accel
from m3jepa.config import PipelineConfig
from m3jepa.core.device import Runtime

# Device types with a fused AdamW kernel in torch (one pass over memory per parameter): on a 2-core CPU
# ~5x faster than the for-each implementation at the paper's 140M parameters (docs/benchmarks.md).
FUSED_DEVICE_TYPES = ("cpu", "cuda")


def build_optimizer(
    objective: nn.Module, cfg: PipelineConfig, runtime: Runtime, cpu_fast_path: bool = True
) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings and the temperature (1-d parameters).

    On the CPU fast path this also installs `m3jepa.accel`'s modules into `objective` (same parameters,
    same state_dict) and returns `accel.ShadowAdamW`, whose state_dict is torch's AdamW(fused=True)'s.
    `cpu_fast_path=False` keeps the plain model and torch's AdamW even there: the GPU's code path, which
    `bench.gpu --device cpu --quick` runs on a CPU.
    """
    decay, no_decay = [], []
    for p in objective.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cpu_fast_path and runtime.cpu_fast_path and not _distributed():
        accel.install(objective)
        return accel.ShadowAdamW(groups, lr=cfg.train.lr, shadowed=accel.shadowable_weights(objective))
    return torch.optim.AdamW(groups, lr=cfg.train.lr, **adamw_impl(decay + no_decay))


def adamw_impl(params: list[torch.Tensor]) -> dict[str, bool]:
    """{"fused": True} when every parameter is a float on a device type with a fused kernel, else foreach.

    Both compute the same update (to float32 rounding), and either is deterministic, so resumes stay
    bit-exact.
    """
    on_fused = all(p.device.type in FUSED_DEVICE_TYPES for p in params)
    if on_fused and all(p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def optimizer_step(optimizer: torch.optim.Optimizer, model: nn.Module, grad_clip: float) -> None:
    """Clip the global gradient norm to `grad_clip` (0: off), then update.

    torch's fused AdamW (CPU and CUDA) and ShadowAdamW divide by the clip factor inside their update
    (`accel.clipped_step`: one norm pass, no scaling pass); the for-each AdamW clips with clip_grad_norm_.
    """
    if isinstance(optimizer, accel.ShadowAdamW):
        optimizer.step(max_grad_norm=grad_clip)  # clipping folded into the fused update
        return
    if grad_clip > 0 and accel.folds_clipping(optimizer):
        accel.clipped_step(optimizer, grad_clip)
        return
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def _distributed() -> bool:
    # DDP all-reduces the masters' .grad; shadow gradients would bypass it.
    return torch.distributed.is_available() and torch.distributed.is_initialized()
