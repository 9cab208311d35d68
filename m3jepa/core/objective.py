"""The training objective: the predictor and its loss (with the temperature) as one module for DDP."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from m3jepa.config import LossConfig, ModelConfig
from m3jepa.core.collectives import gather_with_grad
from m3jepa.core.directions import parse_direction
from m3jepa.distributed import DistInfo
from m3jepa.model import build_predictor
from m3jepa.model.losses import AlignmentLoss, LossOutput

log = logging.getLogger(__name__)


class Objective(nn.Module):
    """Everything that trains: the predictor and (when learnable) the contrastive temperature."""

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, dims: dict[str, int]):
        super().__init__()
        self.predictor = build_predictor(model_cfg, dims)
        if loss_cfg.pred_target == "standardized" and hasattr(self.predictor, "standardize_targets"):
            self.predictor.standardize_targets()  # buffers set from the train split by the loop
        self.loss = AlignmentLoss(
            loss_cfg, model_cfg.predictor, model_cfg.load_balance_weight, model_cfg.router_z_loss_weight
        )

    def forward(
        self,
        direction: str,
        x: Tensor | dict[str, Tensor],
        y: Tensor,
        dist_info: DistInfo | None = None,
        pred_target: Tensor | None = None,
    ) -> LossOutput:
        """x (B, D_source) source latents (or {modality: (B, D_m)}), y (B, D_target) of the same rows.

        `pred_target` (B, D_target), when given, is L_pred's target instead of y (the LoRA mode passes
        y detached there, while the contrastive keys keep y's gradient).
        """
        info = dist_info or DistInfo()
        source, target = parse_direction(direction)
        out = self.predictor(source, x, target)
        keys = self.predictor.encode_target(target, y)  # (B, d_cl), L2-normalised
        if out.pred is not None:
            out.pred = out.pred.float()  # the loss in float32 even under bf16 autocast
        # L_pred's target in the space `pred` lives in (loss.pred_target: raw, or standardised)
        l_target = to_pred_space(self.predictor, target, (y if pred_target is None else pred_target).float())
        # Negatives come from every rank: gather both sides, score the local rows against all of them.
        return self.loss(
            out,
            l_target,
            keys,
            queries_all=gather_with_grad(out.cl_query, info),  # (W*B, d_cl)
            keys_all=gather_with_grad(keys, info),  # (W*B, d_cl)
            offset=info.rank * y.shape[0],  # y: x is a dict for a concatenated input
        )


def to_pred_space(predictor: nn.Module, modality: str, y: Tensor) -> Tensor:
    """Target latents y (B, D_m) in the predictor's `pred` space: standardised when the run trained with
    loss.pred_target = "standardized" (the predictor holds the statistics), else y itself."""
    space = getattr(predictor, "pred_space", None)
    return y if space is None else space(modality, y)  # (B, D_m)


def loss_scalars(parts: LossOutput) -> tuple[Tensor, Tensor]:
    """(L_pred, L_CL) detached for logging; L_pred is 0 for the linear baseline."""
    pred = parts.pred.detach() if parts.pred is not None else torch.zeros((), device=parts.cl.device)
    return pred, parts.cl.detach()


def parameter_report(objective: nn.Module) -> dict[str, Any]:
    """Exactly what trains: counts per part and every trainable parameter's name and shape."""
    named = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    parts: dict[str, int] = {}
    for n, p in named:
        key = ".".join(n.split(".")[:2]) if n.startswith("encoders.") else n.split(".")[0]
        parts[key] = parts.get(key, 0) + p.numel()
    frozen = sum(p.numel() for p in objective.parameters() if not p.requires_grad and p.device.type != "meta")
    return {
        "trainable": sum(p.numel() for _, p in named),
        "frozen_loaded": frozen,
        "parts": parts,
        "parameters": {n: list(p.shape) for n, p in named},
    }


def write_parameter_report(objective: nn.Module, path: Path) -> dict[str, Any]:
    """Write parameter_report() as JSON and log its summary."""
    report = parameter_report(objective)
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    log.info("trainable parameters: %s in total; %s; frozen tail weights loaded: %s",
             f"{report['trainable']:,}", ", ".join(f"{k} {v:,}" for k, v in report["parts"].items()),
             f"{report['frozen_loaded']:,}")
    return report
