"""M3-JEPA losses: latent prediction (MSE or smooth-L1), symmetric InfoNCE, and their α-mix."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3jepa.config import LossConfig, ModelConfig
from m3jepa.model.predictor import PredictorOutput
from m3jepa.model.routing import OnRead

log = logging.getLogger(__name__)

# CLIP's bounds on the logit scale (≤ 100), so a learnable temperature cannot collapse or blow up.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1.0


@dataclass
class LossOutput:
    """L = α·L_pred + (1−α)·L_CL + w·aux + w_z·z."""

    total: Tensor  # ()
    pred: Tensor | None  # () L_pred; None when the predictor predicts no latent (linear baseline)
    cl: Tensor  # () symmetric InfoNCE
    aux: Tensor = OnRead()  # () load-balancing term, unweighted (total adds load_balance_weight · aux)
    alpha: float = 0.0  # the α actually used
    temperature: Tensor | None = None  # () τ used (detached), for logging
    # () router z-loss, unweighted (total adds router_z_loss_weight · z); None: no router. Both router
    # terms are computed when first read (routing.OnRead), so a run weighting them 0 never builds them.
    z: Tensor | None = OnRead(default=None)
    # task -> (N,) int64 assignments per expert in this forward (each row counts k times); {} without a router
    expert_counts: dict[str, Tensor] = field(default_factory=dict)


def prediction_loss(pred: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """Mean error between predicted and target latents (B, D): "mse" (paper) or "smooth_l1" (release)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)  # beta = 1, as the official release
    raise ValueError(f"loss.pred={kind!r} is not one of mse, smooth_l1")


def contrastive_logits(q: Tensor, k: Tensor, temperature: float | Tensor) -> Tensor:
    """q kᵀ / τ (B, N) in float32 (float64 stays float64), also under autocast, for q (B, d), k (N, d).

    Under bf16 autocast the product would be rounded to bf16 (8 significant bits) before the division
    by τ = 0.03 magnifies the error 33 times: the loss moved by 1.6-4.6% and its gradients by 2.3-5.8%
    against float32. The product is 2·B·N·d FLOPs, small beside the predictor's, so it runs in float32
    (TF32 on a GPU with runtime.matmul_precision "high": 10 significant bits on the inputs, float32 sums
    and result; tests/test_losses.py bounds both against float64).
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        return torch.mm(q.to(dtype), k.to(dtype).t()) / temperature  # (B, N)


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    # log-softmax and the mean in the logits' float32, whatever autocast says
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits, labels)


def info_nce(q: Tensor, k: Tensor, offset: int = 0, temperature: float | Tensor = 0.03) -> Tensor:
    """One-directional InfoNCE of local queries q (B, d) against keys k (B_all, d).

    Row i of q is positive with row offset + i of k; every other row of k is a negative. With DDP,
    k is all_gather'ed from every rank (with gradient) and offset = rank · B; alone, k is the local
    batch and offset 0. Inputs are expected L2-normalised (the predictors return them so). Logits and
    log-softmax are float32 under autocast (`contrastive_logits`).
    """
    b = q.shape[0]
    if offset < 0 or offset + b > k.shape[0]:
        raise ValueError(f"offset {offset} + batch {b} exceeds the {k.shape[0]} keys")
    labels = torch.arange(offset, offset + b, device=q.device)  # (B,)
    return _cross_entropy(contrastive_logits(q, k, temperature), labels)  # ()


def symmetric_info_nce(
    q: Tensor,
    k: Tensor,
    temperature: float | Tensor = 0.03,
    *,
    q_all: Tensor | None = None,
    k_all: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """½ [InfoNCE(q → k_all) + InfoNCE(k → q_all)] for local pairs (q_i, k_i), q and k (B, d).

    q_all / k_all (B_all, d) are the gathered queries / keys of all ranks (default: the local ones);
    offset is where this rank's rows start in them. Alone (no other rank: the "gathered" sides are q
    and k themselves), the second direction's logits are the first's transpose: one product serves both.
    """
    if (q_all is None or q_all is q) and (k_all is None or k_all is k) and offset == 0:
        logits = contrastive_logits(q, k, temperature)  # (B, B)
        # both directions in one cross-entropy over classes dim 1: [..., 0] rows of q kᵀ, [..., 1] its
        # columns; the mean over the 2B terms is the mean of the two directions' means
        both = torch.stack([logits, logits.t()], dim=-1)  # (B, B, 2)
        labels = torch.arange(q.shape[0], device=q.device).unsqueeze(1).expand(-1, 2)  # (B, 2)
        return _cross_entropy(both, labels)
    q_all = q if q_all is None else q_all
    k_all = k if k_all is None else k_all
    return 0.5 * (info_nce(q, k_all, offset, temperature) + info_nce(k, q_all, offset, temperature))


class ContrastiveTemperature(nn.Module):
    """τ, fixed (a buffer) or learnable (a log-τ parameter, clamped to [0.01, 1])."""

    def __init__(self, init: float = 0.03, learnable: bool = False) -> None:
        super().__init__()
        if not MIN_TEMPERATURE <= init <= MAX_TEMPERATURE:
            raise ValueError(f"temperature {init} outside [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
        log_tau = torch.tensor(math.log(init))
        if learnable:
            self.log_tau = nn.Parameter(log_tau)
        else:  # a buffer: saved in checkpoints, never handed to the optimizer
            self.register_buffer("log_tau", log_tau)

    def forward(self) -> Tensor:
        """τ as a 0-d tensor."""
        return self.log_tau.clamp(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)).exp()


def effective_alpha(model: ModelConfig, loss: LossConfig) -> float:
    """α for this model: the linear baseline predicts no latent, so it trains with InfoNCE only (α = 0)."""
    return 0.0 if model.predictor == "linear" else loss.alpha


class AlignmentLoss(nn.Module):
    """The M3-JEPA objective for one direction; owns the (possibly learnable) temperature."""

    def __init__(
        self,
        cfg: LossConfig,
        predictor: str = "moe",
        load_balance_weight: float = 0.0,
        router_z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.load_balance_weight = load_balance_weight  # model.load_balance_weight; the paper uses 0
        self.router_z_loss_weight = router_z_loss_weight  # model.router_z_loss_weight; the paper uses 0
        self.kind = cfg.pred
        self.alpha = 0.0 if predictor == "linear" else cfg.alpha
        if self.alpha != cfg.alpha:
            log.info("predictor=linear predicts no latent: loss.alpha=%s replaced by 0", cfg.alpha)
        self.temperature = ContrastiveTemperature(cfg.temperature, cfg.learn_temperature)

    def forward(
        self,
        out: PredictorOutput,
        target: Tensor,
        keys: Tensor,
        *,
        queries_all: Tensor | None = None,
        keys_all: Tensor | None = None,
        offset: int = 0,
    ) -> LossOutput:
        """`out` is a PredictorOutput; target (B, D_target) the true latents; keys (B, d_cl) their
        `encode_target`; queries_all / keys_all (B_all, d_cl) and offset for cross-rank negatives."""
        pred = out.pred  # (B, D_target) or None
        if pred is None and self.alpha > 0:
            raise ValueError(
                f"the predictor returned no latent prediction but loss.alpha={self.alpha}; "
                "set loss.alpha=0 or build AlignmentLoss with predictor='linear'"
            )
        tau = self.temperature()  # ()
        cl = symmetric_info_nce(out.cl_query, keys, tau, q_all=queries_all, k_all=keys_all, offset=offset)
        l_pred = None if pred is None else prediction_loss(pred, target, self.kind)
        total = (1.0 - self.alpha) * cl  # ()
        if self.load_balance_weight:  # the router terms are read (so computed) only when weighted in
            total = total + self.load_balance_weight * out.aux_loss
        if l_pred is not None:
            total = total + self.alpha * l_pred
        if self.router_z_loss_weight and out.z_loss is not None:
            total = total + self.router_z_loss_weight * out.z_loss
        return LossOutput(
            total=total, pred=l_pred, cl=cl, aux=lambda: out.aux_loss, alpha=self.alpha,
            temperature=tau.detach(), z=lambda: out.z_loss, expert_counts=out.expert_counts,
        )
