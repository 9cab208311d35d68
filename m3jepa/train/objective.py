"""The training objective: predictor + temperature, L = alpha * L_pred + (1 - alpha) * L_CL per direction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from m3jepa.config import LossConfig, ModelConfig
from m3jepa.model import build_predictor
from m3jepa.model.losses import ContrastiveTemperature, info_nce, prediction_loss
from m3jepa.train.data import parse_direction
from m3jepa.train.distributed import DistInfo, gather_with_grad


@dataclass
class LossParts:
    """One direction's losses (scalars, still on the graph)."""

    total: Tensor
    pred: Tensor
    cl: Tensor
    aux: Tensor


class Objective(nn.Module):
    """Everything that trains: the predictor and (when learnable) the contrastive temperature."""

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, dims: dict[str, int]):
        super().__init__()
        self.loss_cfg = loss_cfg
        self.load_balance_weight = model_cfg.load_balance_weight
        self.predictor = build_predictor(model_cfg, dims)
        self.temperature = ContrastiveTemperature(loss_cfg.temperature, learnable=loss_cfg.learn_temperature)

    def forward(self, direction: str, x: Tensor, y: Tensor, dist_info: DistInfo | None = None) -> LossParts:
        """x (B, D_source) source latents, y (B, D_target) target latents of the same rows."""
        info = dist_info or DistInfo()
        source, target = parse_direction(direction)
        out = self.predictor(source, x, target)
        keys = self.predictor.encode_target(target, y)  # (B, d_cl), L2-normalised
        # Negatives come from every rank: gather both sides, score the local rows against all.
        q_all = gather_with_grad(out.cl_query, info)  # (W*B, d_cl)
        k_all = gather_with_grad(keys, info)  # (W*B, d_cl)
        offset = info.rank * x.shape[0]
        tau = self.temperature()
        cl = 0.5 * (info_nce(out.cl_query, k_all, offset, tau) + info_nce(keys, q_all, offset, tau))
        if out.pred is None:  # the linear baseline has no prediction head: InfoNCE only
            pred, alpha = torch.zeros((), device=x.device), 0.0
        else:
            pred, alpha = prediction_loss(out.pred.float(), y.float(), self.loss_cfg.pred), self.loss_cfg.alpha
        total = alpha * pred + (1.0 - alpha) * cl + self.load_balance_weight * out.aux_loss
        return LossParts(total=total, pred=pred.detach(), cl=cl.detach(), aux=out.aux_loss.detach())
