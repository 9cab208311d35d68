"""The batch order: which pairs each global step draws, a pure function of (seed, step)."""

from __future__ import annotations

import numpy as np


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation of n pair indices: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The pair indices of global batch `step`: pure, so resuming needs no replay.

    Each epoch is a fresh permutation; the incomplete tail batch is dropped so every step has the
    same size (the contrastive loss depends on the batch size).
    """
    per_epoch = max(1, n // batch_size)
    epoch, b = divmod(step, per_epoch)
    perm = epoch_permutation(n, seed, epoch)
    return perm[b * batch_size : (b + 1) * batch_size]
