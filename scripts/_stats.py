"""Shared formatting for the result scripts: mean ± sample standard deviation over seeds."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def mean_std(values: Iterable[float], digits: int = 1) -> str:
    """'21.1 ± 2.6' over seeds (± 0.0 for a single seed), with `digits` decimals."""
    v = np.asarray(list(values), dtype=float)
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.{digits}f}"
