"""Run under torchrun (2 gloo ranks) with an output folder: gradients through both autograd all-gathers
against one process, one JSON file per rank."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd

from m3jepa.core.collectives import gather_with_grad
from m3jepa.distributed import env_info

B, D = 8, 16


def _loss(q_loc, k_loc, q_all, k_all, off: int):
    """Symmetric InfoNCE of the local rows against every rank's, as m3jepa's Objective scores them."""
    t = torch.arange(off, off + B)
    ce = torch.nn.functional.cross_entropy
    return ce(q_loc @ k_all.T, t) + ce(k_loc @ q_all.T, t)


def public_gather(x: torch.Tensor) -> torch.Tensor:
    """torch's public (deprecated) autograd all-gather of x (B, d) into (W*B, d)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_autograd.all_gather(x), dim=0)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    q_ref = torch.randn(world * B, D, dtype=torch.float64, generator=gen).requires_grad_(True)
    k_ref = torch.randn(world * B, D, dtype=torch.float64, generator=gen).requires_grad_(True)
    sl = slice(rank * B, (rank + 1) * B)
    # one process: the sum of every rank's local loss
    sum(_loss(q_ref[r * B:(r + 1) * B], k_ref[r * B:(r + 1) * B], q_ref, k_ref, r * B)
        for r in range(world)).backward()
    errors = {}
    info = env_info()
    for name, gather in (("public", public_gather), ("own", lambda t: gather_with_grad(t, info))):
        q = q_ref.detach()[sl].clone().requires_grad_(True)
        k = k_ref.detach()[sl].clone().requires_grad_(True)
        _loss(q, k, gather(q), gather(k), rank * B).backward()
        errors[name] = max(float((q.grad - q_ref.grad[sl]).abs().max() / q_ref.grad.abs().max()),
                           float((k.grad - k_ref.grad[sl]).abs().max() / k_ref.grad.abs().max()))
    # one file per rank: two ranks printing to one stdout can interleave their lines
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps({"rank": rank, **errors}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
