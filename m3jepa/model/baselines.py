"""The LiT/ShareLock-style baseline: one linear projection per modality into the contrastive space."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from m3jepa.config import ModelConfig
from m3jepa.model.predictor import PredictorOutput, as_inputs, l2_normalize


class LinearAligner(nn.Module):
    """Each modality has one linear map D_m → d_cl, used both as query (source) and key (target) side.

    It predicts no target latent: `PredictorOutput.pred` is None, so it trains with InfoNCE only
    (the loss uses α = 0; see `m3jepa.model.losses.effective_alpha`).
    """

    def __init__(self, cfg: ModelConfig, dims: Mapping[str, int]) -> None:
        super().__init__()
        self.dims = dict(dims)
        self.proj = nn.ModuleDict({m: nn.Linear(dm, cfg.cl_dim) for m, dm in self.dims.items()})

    def forward(
        self,
        source: str | tuple[str, ...],
        x: Tensor | Mapping[str, Tensor],
        target_modality: str,
        dense: bool = False,
    ) -> PredictorOutput:
        """Query (B, d_cl) from source latents; a multimodal source sums its projections."""
        if target_modality not in self.dims:
            raise KeyError(f"unknown target {target_modality!r}; built for {', '.join(self.dims)}")
        inputs = as_inputs(source, x, self.dims)
        q = torch.stack([self.proj[m](t) for m, t in inputs.items()]).sum(dim=0)  # (B, d_cl)
        first = next(iter(inputs.values()))
        return PredictorOutput(
            pred=None,
            cl_query=l2_normalize(q),  # (B, d_cl)
            aux_loss=first.new_zeros(()),
            expert_counts={},
        )

    def encode_target(self, target_modality: str, y: Tensor) -> Tensor:
        """Target latents y (B, D_target) → L2-normalised keys (B, d_cl)."""
        return l2_normalize(self.proj[target_modality](y))  # (B, d_cl)
