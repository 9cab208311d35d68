"""torchrun support for both stages: this process's rank, the process group, barriers and gathers.

Stage 2's gradient-carrying collectives live in m3jepa.core.collectives, on top of this.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Stage 1's ranks meet at a barrier after each store; the wait is at most about one shard of encoding
# (shards are dealt round robin), which for a large encoder on CPU can exceed torch's default 30 minutes.
ENCODE_BARRIER_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: rank of world_size (1 process: rank 0 of 1, no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when a process group is running (more than one process)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes what is written once (manifests, checkpoints) and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (a no-op for one process)."""
        if self.enabled:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (picklable objects; small ones only)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def env_info() -> DistInfo:
    """The rank, world size and local rank torchrun put in the environment (defaults: one process)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, as torchrun sets them: {e}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    return DistInfo(rank, world_size, local_rank)


@contextmanager
def process_group(
    device: str | torch.device = "auto", timeout: timedelta | None = None
) -> Iterator[DistInfo]:
    """Init a gloo (CPU) or nccl (CUDA) group when launched by torchrun; destroy it on the way out.

    `device` is a resolved torch.device (stages 2 and 3: m3jepa.core.device.resolve chose it and its
    backend together) or stage 1's "auto" | "cpu" | "cuda". `timeout` bounds every collective (None:
    torch's default); one process yields rank 0 of 1.
    """
    ctx = env_info()
    if not ctx.enabled:
        yield ctx
        return
    if isinstance(device, torch.device):
        use_cuda = device.type == "cuda"
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            # Each rank owns one GPU; "auto"/"cuda" then resolve to it.
            torch.cuda.set_device(ctx.local_rank)
    backend = "nccl" if use_cuda else "gloo"
    started = not dist.is_initialized()
    if started:
        kw = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size, **kw)
        log.info("rank %d/%d joined a %s process group", ctx.rank, ctx.world_size, backend)
    try:
        yield ctx
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()
