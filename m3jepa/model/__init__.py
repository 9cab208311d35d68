"""The M3-JEPA predictor: multi-gate mixture of experts, baselines, and losses."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from m3jepa.config import ModelConfig
from m3jepa.model.baselines import LinearAligner
from m3jepa.model.losses import AlignmentLoss, ContrastiveTemperature, LossOutput, effective_alpha, info_nce
from m3jepa.model.predictor import (
    Direction,
    M3JepaPredictor,
    PredictorOutput,
    count_parameters,
    paper_parameter_count,
    paper_preset,
    parse_direction,
)

__all__ = [
    "AlignmentLoss",
    "ContrastiveTemperature",
    "Direction",
    "LinearAligner",
    "LossOutput",
    "M3JepaPredictor",
    "PredictorOutput",
    "build_predictor",
    "count_parameters",
    "effective_alpha",
    "info_nce",
    "paper_parameter_count",
    "paper_preset",
    "parse_direction",
]


def build_predictor(cfg: ModelConfig, dims: Mapping[str, int]) -> nn.Module:
    """The predictor `cfg.predictor` names, for modalities with latent dims `dims` ({"image": 1024, ...})."""
    if not dims:
        raise ValueError("build_predictor needs at least one modality dimension, e.g. {'image': 1024}")
    if cfg.predictor in ("moe", "mlp"):
        return M3JepaPredictor(cfg, dims)
    if cfg.predictor == "linear":
        return LinearAligner(cfg, dims)
    raise ValueError(f"model.predictor={cfg.predictor!r} is not one of moe, mlp, linear")
