"""AGD schedules as pure functions of the step: learning rate and which directions train."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

SCHEDULES = ("alternate", "random", "dynamic", "joint")
DYNAMIC_EPS = 0.05  # floor on a direction's weight so a direction at R@1 = 1 still trains sometimes


def lr_at(
    step: int, total_steps: int, base_lr: float, warmup_frac: float = 0.1, min_lr_frac: float = 0.0
) -> float:
    """Linear warm-up over the first warmup_frac·total_steps steps, then cosine down to min_lr_frac·base_lr.

    Warm-up reaches base_lr on its last step ((step + 1) / warmup) so step 0 already moves; steps at
    or past total_steps stay at the minimum.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    warmup = int(warmup_frac * total_steps)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    min_lr = min_lr_frac * base_lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _rng(seed: int, step: int) -> np.random.Generator:
    # Seeded by (seed, step) alone, so any step's draw is reproducible without replaying earlier ones.
    return np.random.default_rng([seed, step])


def _normalise(weights: Sequence[float], what: str) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"{what} must be finite, non-negative and not all zero, got {list(weights)}")
    return w / w.sum()


def dynamic_probs(directions: Sequence[str], recalls: Mapping[str, float] | None) -> np.ndarray:
    """p_d ∝ (1 − R@1_d) + ε: a weaker direction gets more steps; uniform before any evaluation.

    Recalls are fractions in [0, 1] (not percentages); every direction must have one.
    """
    if not recalls:
        return np.full(len(directions), 1.0 / len(directions))
    missing = [d for d in directions if d not in recalls]
    if missing:
        raise ValueError(f"dynamic schedule: no recall for {', '.join(missing)}")
    r = np.array([recalls[d] for d in directions], dtype=np.float64)
    if np.any(r < 0) or np.any(r > 1):
        raise ValueError(f"recalls must be fractions in [0, 1], got {dict(recalls)}")
    return _normalise(1.0 - r + DYNAMIC_EPS, "dynamic weights")


def directions_at(
    step: int,
    directions: Sequence[str],
    schedule: str,
    *,
    probs: Sequence[float] | None = None,
    seed: int = 0,
    recalls: Mapping[str, float] | None = None,
) -> list[str]:
    """The directions trained at `step`.

    alternate: round robin, [directions[step % n]] (image->text on even steps, text->image on odd);
    random: one direction drawn with `probs` (uniform if None) from a generator seeded by (seed, step);
    dynamic: one direction drawn with p ∝ (1 − R@1) + ε from the latest validation `recalls`;
    joint: all directions (their losses are summed: the paper's ablation).
    """
    if not directions:
        raise ValueError("directions is empty")
    n = len(directions)
    if schedule == "alternate":
        return [directions[step % n]]
    if schedule == "joint":
        return list(directions)
    if schedule == "random":
        if probs is not None and len(probs) != n:
            raise ValueError(f"{len(probs)} probabilities for {n} directions")
        p = np.full(n, 1.0 / n) if probs is None else _normalise(probs, "probs")
    elif schedule == "dynamic":
        p = dynamic_probs(directions, recalls)
    else:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    return [directions[int(_rng(seed, step).choice(n, p=p))]]
