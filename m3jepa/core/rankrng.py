"""Each torchrun rank's random generators: seeded apart after the shared initialisation, saved and restored
per rank with the checkpoint (docs/training.md, "Multi-process")."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from m3jepa.core import checkpoint as ckpt
from m3jepa.distributed import DistInfo

log = logging.getLogger(__name__)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The torch seed of torchrun rank `rank` > 0 after the shared initialisation (rank 0 keeps `seed`'s
    stream): a SeedSequence of (seed, rank, step), so no rank of one run repeats another run's seed."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


def seed_ranks(start: ckpt.Checkpoint | None, seed: int, info: DistInfo, device: torch.device,
               step: int) -> None:
    """This rank's generators once the model is built: a fresh run reseeds ranks > 0 by `rank_seed`
    (rank 0 draws on as one process does); a resumed one restores each rank's saved generators (a
    checkpoint without this rank's, from another world size or an older version, reseeds it by
    `rank_seed` of the step, and says so)."""
    if start is None:
        if info.rank > 0:
            torch.manual_seed(rank_seed(seed, info.rank))
        return
    saved = start.optimizer
    ranks = saved.get("rank_rng")
    if ranks is not None and len(ranks) == info.world_size:
        ckpt.restore_rng(ranks[info.rank], device)
    elif info.rank == 0:
        ckpt.restore_rng(saved, device)
    else:
        log.warning("checkpoint %s holds no generator of rank %d (of %d): its dropout masks restart from "
                    "a seed of step %d", start.path, info.rank, info.world_size, step)
        torch.manual_seed(rank_seed(seed, info.rank, step))


def rng_states(model: torch.nn.Module, info: DistInfo) -> dict[str, Any]:
    """What a checkpoint saves of the generators: this process's (rank 0's, as one process saves them)
    and, under torchrun, every rank's in rank order (`rank_rng`; a collective: every rank calls it)."""
    mine = ckpt.rng_state(model)
    if not info.enabled:
        return mine
    return {**mine, "rank_rng": info.gather(mine)}
