"""Latent mixup (FuseMix, Vouitsis et al. 2024): mix paired latents with one λ and one partner per pair.

Pair i of a batch is mixed with pair π(i), where π is a permutation of the batch, with one weight
λ_i ~ Beta(α, α): x_i ← λ_i x_i + (1 − λ_i) x_π(i) and y_i ← λ_i y_i + (1 − λ_i) y_π(i). Source and target
(and every part of a concatenated input) use the same π and λ, so a mixed pair is still a pair.
The draws come from a numpy generator seeded by (seed, step, direction, rank), never from torch's
global RNG: a resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_STREAM = 0x4D495855  # "MIXU": keeps these draws apart from other streams seeded by the same numbers


@dataclass
class MixPlan:
    """One batch's mixing: which batches mix, with whom and how much."""

    mixed: bool  # False: the batch goes through unmixed (probability 1 − train.mixup)
    partner: np.ndarray  # (B,) int64 permutation π
    lam: np.ndarray  # (B,) float64 λ_i ~ Beta(α, α)


def mix_plan(
    batch: int, prob: float, alpha: float, seed: int, step: int, direction: int, rank: int = 0
) -> MixPlan:
    """The seeded draws of one (step, direction, rank) batch of `batch` rows."""
    rng = np.random.default_rng([_STREAM, seed, step, direction, rank])
    mixed = bool(prob > 0 and rng.random() < prob)
    return MixPlan(mixed=mixed, partner=rng.permutation(batch), lam=rng.beta(alpha, alpha, size=batch))


def mix(t: Tensor, partner: Tensor, lam: Tensor) -> Tensor:
    """λ_i t_i + (1 − λ_i) t_π(i) for t (B, D), partner (B,) int64 and lam (B,) on t's device."""
    w = lam.to(t.dtype).unsqueeze(-1)  # (B, 1)
    return w * t + (1 - w) * t.index_select(0, partner)  # (B, D)


def mixup_pair(
    x: Tensor | dict[str, Tensor], y: Tensor, plan: MixPlan
) -> tuple[Tensor | dict[str, Tensor], Tensor]:
    """Apply `plan` to a batch: x (B, D_s) or {modality: (B, D_m)}, y (B, D_t); unmixed plans return them."""
    if not plan.mixed:
        return x, y
    partner = torch.from_numpy(plan.partner).to(y.device, non_blocking=True)  # (B,)
    lam = torch.from_numpy(plan.lam).to(y.device, non_blocking=True)  # (B,)
    # a concatenated input: each part with the same π and λ
    x = {m: mix(v, partner, lam) for m, v in x.items()} if isinstance(x, dict) else mix(x, partner, lam)
    return x, mix(y, partner, lam)
