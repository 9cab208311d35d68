"""Pooling over padded token sequences: masked means and padding removal."""

from __future__ import annotations

import torch


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` (B, T, D) over the positions where `mask` (B, T) is nonzero → (B, D).

    Padding never enters the sum or the count; a row with no valid position gives zeros.
    """
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"masked_mean: hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)} disagree")
    weights = (mask != 0).to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    total = (hidden * weights).sum(dim=1)  # (B, D)
    count = weights.sum(dim=1).clamp_min(1.0)  # (B, 1)
    return total / count


def unpad(hidden: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Split `hidden` (B, T, D) into B tensors (T_i, D) holding only the positions where `mask` is set."""
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"unpad: hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)} disagree")
    keep = mask != 0  # (B, T)
    return [row[k] for row, k in zip(hidden, keep, strict=True)]
