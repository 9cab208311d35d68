"""Stage 2's collectives over m3jepa.distributed's process group: an all-gather with gradients, broadcasts."""

from __future__ import annotations

import torch
import torch.distributed as dist

from m3jepa.core.device import Runtime
from m3jepa.distributed import DistInfo

# torch's public autograd all-gather (torch.distributed.nn.functional.all_gather) gives the same gradients
# as this function in isolation on gloo (2 ranks, a symmetric InfoNCE with both sides gathered, float64:
# relative error 1.9e-16; tests/test_device.py::test_both_all_gathers_give_exact_gradients_alone). Inside
# DDP training it did not (measured with torch 2.13 on gloo while the loop still wrapped the model in torch's
# DistributedDataParallel): a 2-process run ended 12 steps with weights up to 0.017 away (relative 3.5)
# from the one-process run, against rtol 1e-4 with this function. Its backward is an all-to-all on gloo
# and a reduce-scatter on nccl (not measured: no multi-GPU host), issued while DDP's bucket all-reduces
# ran; this function's backward is one all-reduce, correct beside any other collective. So both backends
# use this one (GradReducer, below, now reduces after the backward instead of during it).


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
    return info.broadcast(obj)


# ---------------------------------------------------------------- the gradient all-reduce

# Gradients are flattened into buckets of at most this many bytes, each all-reduced with one collective
# (DDP's default bucket cap): fewer, larger messages than one per parameter, without a second full copy.
BUCKET_BYTES = 25 * 2**20
COMPRESSIONS = ("none", "bf16")


def resolve_compression(setting: str, runtime: Runtime) -> str:
    """runtime.grad_compression as the reducer takes it: "auto" is the device table's choice for the
    run's device type (bf16 on GPUs, none on CPUs), anything else as given."""
    return runtime.kind.grad_compression if setting == "auto" else setting


class GradReducer:
    """Average the gradients of the trainable parameters over the ranks, after the step's backward.

    DDP's job for stage 2, without DDP's constraints, each of which broke or taxed a path here: one
    backward may follow several forwards (the joint schedule), frozen encoder layers may stay on the meta
    device (the LoRA mode's tails), and a step trains only its direction's heads. Each step all-reduces
    which parameters have a gradient on any rank (a few bytes: an expert may get rows on one rank and none
    on another), then only those gradients, bucketed; a parameter no rank used keeps no gradient, exactly
    as in one process, and costs nothing. `compression` "bf16" sends the buckets in bfloat16 (half the
    bytes; each rank's share is divided by the world size before the cast, as torch's bf16_compress_hook
    does), "none" in their own dtype. Measurements: docs/benchmarks.md, "DDP".
    """

    def __init__(self, module: torch.nn.Module, info: DistInfo, compression: str = "none",
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"gradient compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.info, self.compression, self.bucket_bytes = info, compression, bucket_bytes
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.reduced_bytes = 0  # bytes sent into all-reduces so far (what compression and skipping save)

    def broadcast_from_main(self, module: torch.nn.Module) -> None:
        """Rank 0's trainable parameters and materialised buffers on every rank (DDP's start)."""
        if not self.info.enabled:
            return
        tensors = [*self.params, *(b for b in module.buffers() if b.device.type != "meta")]
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t, src=0)

    def reduce(self) -> None:
        """Replace each used parameter's .grad by its mean over the ranks (0 where a rank did not use it)."""
        if not self.info.enabled or not self.params:
            return
        # (P,) 1 where this rank has a gradient; MAX over ranks: used anywhere. Read on the host (the one
        # sync: the buckets' layout depends on it), as DDP with find_unused_parameters reads its map.
        used = torch.tensor([p.grad is not None for p in self.params], dtype=torch.uint8, device=self.device)
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
        live = [p for p, u in zip(self.params, used.tolist(), strict=True) if u]
        pending = [self._start(bucket) for bucket in self._buckets(live)]
        for bucket, flat, work in pending:
            work.wait()
            self._finish(bucket, flat)

    def _buckets(self, params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
        buckets: list[list[torch.nn.Parameter]] = []
        size, key = 0, None
        for p in params:
            nbytes = p.numel() * p.element_size()
            if not buckets or (p.dtype, p.device) != key or size + nbytes > self.bucket_bytes:
                buckets.append([])
                size, key = 0, (p.dtype, p.device)
            buckets[-1].append(p)
            size += nbytes
        return buckets

    def _start(self, bucket: list[torch.nn.Parameter]):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.info.world_size)  # (n,): sum = mean
        wire = flat.to(torch.bfloat16) if self.compression == "bf16" else flat
        self.reduced_bytes += wire.numel() * wire.element_size()
        return bucket, wire, dist.all_reduce(wire, async_op=True)

    def _finish(self, bucket: list[torch.nn.Parameter], wire: torch.Tensor) -> None:
        flat = wire.to(bucket[0].dtype)  # no copy unless compressed
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
            p.grad = g.view_as(p)
