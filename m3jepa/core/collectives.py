"""Stage 2's collectives over m3jepa.distributed's process group: an all-gather with gradients, broadcasts."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd

from m3jepa.distributed import DistInfo

# Which all-gather carries the contrastive loss's gradients, per backend. torch's public autograd
# collective (torch.distributed.nn.functional.all_gather; backward = all-to-all + sum on gloo) was
# measured correct on gloo with torch 2.13: the gradients of a symmetric InfoNCE with both sides
# gathered, 2 ranks, float64, equal a one-process reference to 1.9e-16 relative (tests/test_device.py::
# test_public_all_gather_gradients_are_exact_on_gloo keeps checking it). On nccl its backward is a
# reduce-scatter that no session could run (no multi-GPU host), so nccl keeps m3jepa's own function,
# whose backward is one all-reduce and is correct on any backend.
PUBLIC_GATHER_BACKENDS = frozenset({"gloo"})


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient and hands each owner its own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (W*B, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # (W*B, d)
        dist.all_reduce(grad)  # every rank's loss depends on every slice
        b = grad.shape[0] // ctx.world
        return grad[ctx.rank * b : (ctx.rank + 1) * b]


def gather_with_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate x (B, d) from every rank into (W*B, d); gradients flow back to each owner."""
    if not info.enabled:
        return x
    if dist.get_backend() in PUBLIC_GATHER_BACKENDS:
        return public_gather(x)
    return _GatherWithGrad.apply(x)


def public_gather(x: torch.Tensor) -> torch.Tensor:
    """torch's public autograd all-gather of x (B, d) into (W*B, d) (it warns that it is deprecated in
    favour of a private module; the warning is silenced here, once per call site)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_autograd.all_gather(x), dim=0)  # (W*B, d)


def own_gather(x: torch.Tensor) -> torch.Tensor:
    """m3jepa's autograd all-gather (the nccl path), exposed for the test that compares both."""
    return _GatherWithGrad.apply(x)


def broadcast_float(value: float, info: DistInfo, device: torch.device) -> float:
    """Rank 0's value on every rank (validation metrics decide early stopping everywhere).

    `device` is the group's device: nccl moves only CUDA tensors, gloo only CPU ones.
    """
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t[0])


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's object on every rank (the validation recalls that steer the dynamic AGD schedule)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
