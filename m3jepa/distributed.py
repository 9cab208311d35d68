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

from m3jepa.device_table import CPU_KIND, DeviceKind, auto_kind, kind_of, visible

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

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (picklable; tensors in it must be on the CPU, as a pickle
        names their device)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]


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


def launch() -> tuple[str | None, int]:
    """(the launch's rendezvous id, how many times torchrun restarted this node's workers) from torchrun's
    TORCHELASTIC_RUN_ID / TORCHELASTIC_RESTART_COUNT; (None, 0) outside torchrun.

    A node whose workers torchrun restarted because another node's failed counts 0 here (its agent
    restarts them without spending a restart), so the ranks compare theirs (m3jepa.train.resume).
    """
    try:
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        restarts = 0
    return os.environ.get("TORCHELASTIC_RUN_ID"), restarts


@contextmanager
def process_group(
    device: str | torch.device = "auto", timeout: timedelta | None = None
) -> Iterator[DistInfo]:
    """Init the device table's backend (gloo for CPUs, nccl for GPUs) when launched by torchrun; destroy
    the group on the way out.

    `device` is a resolved torch.device (stages 2 and 3: m3jepa.core.device.resolve chose it from the
    table) or stage 1's "auto" | "cpu" | "cuda" (the table's first visible accelerator for "auto"; a type
    this host does not see falls back to the CPU's row, and stage 1's encoder resolution then names the
    problem). A per-rank device type (GPUs) becomes this rank's current device first. `timeout` bounds
    every collective (None: torch's default); one process yields rank 0 of 1.
    """
    ctx = env_info()
    if not ctx.enabled:
        yield ctx
        return
    kind, where = _rank_device(device, ctx)
    if kind.per_rank:
        kind.set_current(where)  # each rank owns one device; "auto"/"cuda" then resolve to it
    started = not dist.is_initialized()
    if started:
        kw = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend=kind.backend, rank=ctx.rank, world_size=ctx.world_size, **kw)
        log.info("rank %d/%d joined a %s process group", ctx.rank, ctx.world_size, kind.backend)
        if ctx.is_main:
            _warn_shared_store()
    try:
        yield ctx
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def _warn_shared_store() -> None:
    """Say so when torchrun may restart the processes of several nodes that share the rendezvous agent's
    store: the nodes count their restarts apart, and with torch 2.13 the second attempt can meet the
    first one's addresses (pytorch/pytorch#135712; docs/multinode.md)."""
    env = os.environ
    if (env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
            and env.get("GROUP_WORLD_SIZE", "1") != "1"):
        log.warning("torchrun --max-restarts=%s across %s nodes shares its rendezvous store between "
                    "attempts, so a restart may fail to connect (pytorch/pytorch#135712): export "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun on every node (docs/multinode.md)",
                    env["TORCHELASTIC_MAX_RESTARTS"], env["GROUP_WORLD_SIZE"])


def _rank_device(device: str | torch.device, ctx: DistInfo) -> tuple[DeviceKind, torch.device]:
    """(the table row, this rank's device) of a resolved device or of stage 1's device name."""
    if isinstance(device, torch.device):
        return kind_of(device), device
    kind = auto_kind() if device == "auto" else kind_of(device)
    if visible(kind) == 0:
        kind = CPU_KIND
    return kind, kind.device(ctx.local_rank if kind.per_rank else None)
