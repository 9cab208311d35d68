"""`install`: put the fast modules into a plain predictor in place (same parameters, same state_dict keys)."""

from __future__ import annotations

import torch
from torch import nn

from m3jepa.accel.dropout import Bf16Dropout
from m3jepa.accel.shadows import Bf16Linear
from m3jepa.model.moe import MultiGateMoE
from m3jepa.model.predictor import M3JepaPredictor

# Expert groups padded to multiples of this under autocast (MultiGateMoE._experts_bucketed): oneDNN builds
# a kernel per new matmul shape, and with 16-row buckets a few shapes recur (docs/benchmarks.md §1).
ROW_BUCKET = 16


def install(objective: nn.Module) -> None:
    """Swap the Linear and Dropout layers of every M3JepaPredictor in `objective` for the fast ones.

    Every nn.Linear of the predictor but the MoE gates (which route in float32) becomes a `Bf16Linear`
    holding the very same Parameter objects, every nn.Dropout a `Bf16Dropout` of the same p; both are
    exactly their nn base class without a bf16 shadow or outside bf16 autocast. MoE layers get
    ROW_BUCKET. The state_dict keys and values do not change, so checkpoints load either way.
    Installing twice changes nothing. Other modules (baselines, LoRA encoder tails) are left alone.
    """
    for predictor in [m for m in objective.modules() if isinstance(m, M3JepaPredictor)]:
        moes = [m for m in predictor.modules() if isinstance(m, MultiGateMoE)]
        gates = {id(g) for moe in moes for g in moe.gates.values()}
        for parent in list(predictor.modules()):
            if isinstance(parent, MultiGateMoE):
                parent.row_bucket = ROW_BUCKET
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and id(child) not in gates:
                    setattr(parent, name, _fast_linear(child))
                elif type(child) is nn.Dropout:
                    setattr(parent, name, _fast_dropout(child))


def shadowable_weights(objective: nn.Module) -> list[nn.Parameter]:
    """The weights of `objective`'s Bf16Linear layers that can carry a bf16 shadow (float32 CPU masters)."""
    weights = [m.weight for m in objective.modules() if isinstance(m, Bf16Linear)]
    return [w for w in weights if _shadowable(w)]


def _fast_linear(linear: nn.Linear) -> Bf16Linear:
    # Built on the meta device (nothing allocated or initialised), then given the original Parameters.
    fast = Bf16Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    fast.weight = linear.weight
    if linear.bias is not None:
        fast.bias = linear.bias
    return fast.train(linear.training)


def _fast_dropout(dropout: nn.Dropout) -> Bf16Dropout:
    return Bf16Dropout(dropout.p, dropout.inplace).train(dropout.training)


def _shadowable(p: torch.Tensor) -> bool:
    return p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous()
