"""Stage 2's collectives over m3jepa.distributed's process group: an all-gather with gradients, broadcasts."""

from __future__ import annotations

import torch
import torch.distributed as dist

from m3jepa.distributed import DistInfo

# torch's public autograd all-gather (torch.distributed.nn.functional.all_gather) gives the same gradients
# as this function in isolation on gloo (2 ranks, a symmetric InfoNCE with both sides gathered, float64:
# relative error 1.9e-16; tests/test_device.py::test_both_all_gathers_give_exact_gradients_alone). Inside
# DDP training it does not: with it, tests/test_train.py::test_two_process_ddp_matches_one_process
# ends 12 steps with weights up to 0.017 away (relative 3.5) from the one-process run, against rtol 1e-4
# with this function (measured with torch 2.13 on gloo). Its backward is an all-to-all on gloo and a
# reduce-scatter on nccl (not measured: no multi-GPU host), issued while DDP's bucket all-reduces run;
# this function's backward is one all-reduce, correct beside them. So both backends use this one.


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
