"""Losses against hand-computed values and float64 numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m3jepa.config import LossConfig, ModelConfig
from m3jepa.model import AlignmentLoss, ContrastiveTemperature, PredictorOutput, effective_alpha, info_nce
from m3jepa.model.losses import prediction_loss, symmetric_info_nce


def np_info_nce(q: np.ndarray, k: np.ndarray, offset: int, tau: float) -> float:
    """Reference: mean over rows of −log softmax(q_i·k / τ)[offset + i]."""
    logits = q @ k.T / tau  # (B, B_all)
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.mean([logp[i, offset + i] for i in range(q.shape[0])]))


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=-1)


def test_info_nce_hand_value() -> None:
    eye = torch.eye(2, dtype=torch.float64)
    # logits [[1, 0], [0, 1]]: each row −log(e / (e + 1)) = log(1 + e^−1).
    assert float(info_nce(eye, eye, 0, 1.0)) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)
    # τ = 0.5 doubles the margin.
    assert float(info_nce(eye, eye, 0, 0.5)) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-12)


@pytest.mark.parametrize("offset", [0, 3, 6])
def test_info_nce_gathered_matches_numpy(offset: int) -> None:
    q, k = unit(3, 5, 0), unit(9, 5, 1)
    got = float(info_nce(q, k, offset, 0.07))
    assert got == pytest.approx(np_info_nce(q.numpy(), k.numpy(), offset, 0.07), rel=1e-12)


def test_info_nce_rejects_offsets_past_the_keys() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        info_nce(unit(3, 4, 0), unit(4, 4, 1), offset=2)


def test_symmetric_is_the_mean_of_both_directions() -> None:
    q, k = unit(4, 6, 2), unit(4, 6, 3)
    want = 0.5 * (np_info_nce(q.numpy(), k.numpy(), 0, 0.03) + np_info_nce(k.numpy(), q.numpy(), 0, 0.03))
    assert float(symmetric_info_nce(q, k, 0.03)) == pytest.approx(want, rel=1e-12)


def test_cross_rank_losses_average_to_the_global_batch_loss() -> None:
    """Two simulated ranks with gathered negatives reproduce the single-process loss on 2B rows."""
    q_all, k_all = unit(8, 6, 4), unit(8, 6, 5)
    global_loss = symmetric_info_nce(q_all, k_all, 0.1)
    per_rank = [
        symmetric_info_nce(
            q_all[r * 4 : r * 4 + 4], k_all[r * 4 : r * 4 + 4], 0.1, q_all=q_all, k_all=k_all, offset=r * 4
        )
        for r in range(2)
    ]
    torch.testing.assert_close(sum(per_rank) / 2, global_loss)


def test_prediction_losses_match_numpy() -> None:
    p = torch.tensor([[0.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    t = torch.tensor([[0.2, 0.0], [0.5, 1.5]], dtype=torch.float64)
    d = (p - t).numpy()
    assert float(prediction_loss(p, t, "mse")) == pytest.approx(np.mean(d**2))
    huber = np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5)  # smooth-L1 with beta = 1
    assert float(prediction_loss(p, t, "smooth_l1")) == pytest.approx(np.mean(huber))
    with pytest.raises(ValueError, match="shape"):
        prediction_loss(p, t[:, :1])


def test_temperature_fixed_is_a_buffer_learnable_is_a_parameter() -> None:
    fixed = ContrastiveTemperature(0.03)
    assert list(fixed.parameters()) == [] and "log_tau" in fixed.state_dict()
    assert float(fixed()) == pytest.approx(0.03)
    learn = ContrastiveTemperature(0.07, learnable=True)
    (tau,) = learn.parameters()
    info_nce(unit(4, 3, 0), unit(4, 3, 1), 0, learn()).backward()
    assert tau.grad is not None and float(tau.grad) != 0.0
    with torch.no_grad():
        tau.fill_(math.log(1e-5))
    assert float(learn().detach()) == pytest.approx(0.01)  # clamped like CLIP's logit scale ≤ 100


def make_out(pred: torch.Tensor | None, q: torch.Tensor, aux: float = 0.0) -> PredictorOutput:
    return PredictorOutput(pred=pred, cl_query=q, aux_loss=torch.tensor(aux, dtype=q.dtype), expert_counts={})


def test_total_is_the_alpha_mix() -> None:
    q, k = unit(4, 6, 6), unit(4, 6, 7)
    pred, target = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    loss = AlignmentLoss(LossConfig(alpha=0.3, temperature=0.05))
    out = loss(make_out(pred, q), target, k)
    l_pred = float(((pred - target) ** 2).mean())
    l_cl = 0.5 * (np_info_nce(q.numpy(), k.numpy(), 0, 0.05) + np_info_nce(k.numpy(), q.numpy(), 0, 0.05))
    assert float(out.pred) == pytest.approx(l_pred)
    assert float(out.cl) == pytest.approx(l_cl, rel=1e-6)
    assert float(out.total) == pytest.approx(0.3 * l_pred + 0.7 * l_cl, rel=1e-6)
    weighted = AlignmentLoss(LossConfig(alpha=0.3, temperature=0.05), load_balance_weight=0.01)
    out_aux = weighted(make_out(pred, q, aux=1.5), target, k)
    assert float(out_aux.total - out.total) == pytest.approx(0.015)
    assert float(out_aux.aux) == 1.5  # reported unweighted


def test_linear_baseline_trains_with_infonce_only() -> None:
    assert effective_alpha(ModelConfig(predictor="linear"), LossConfig(alpha=0.5)) == 0.0
    assert effective_alpha(ModelConfig(predictor="moe"), LossConfig(alpha=0.5)) == 0.5
    q, k = unit(4, 6, 8), unit(4, 6, 9)
    loss = AlignmentLoss(LossConfig(alpha=0.5), predictor="linear")
    out = loss(make_out(None, q), torch.zeros(4, 3), k)
    assert out.alpha == 0.0 and out.pred is None
    torch.testing.assert_close(out.total, out.cl)
    with pytest.raises(ValueError, match="no latent prediction"):
        AlignmentLoss(LossConfig(alpha=0.5))(make_out(None, q), torch.zeros(4, 3), k)


# ---------------------------------------------------------------- precision under autocast


def _loss_and_grads(q: torch.Tensor, k: torch.Tensor, tau: float, bf16: bool) -> tuple[float, torch.Tensor]:
    q, k = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = symmetric_info_nce(q, k, tau)
    loss.backward()
    return float(loss.detach()), torch.cat([q.grad, k.grad])


@pytest.mark.parametrize("batch", [64, 256])
def test_infonce_under_bf16_autocast_is_within_0_1_percent_of_float32(batch: int) -> None:
    """The logits and their log-softmax stay float32 under autocast (bf16 rounding of the logits, then
    divided by τ = 0.03, moved the loss by 1.6-4.6% before); the inputs are the same float32 vectors."""
    q, k = unit(batch, 128, 0).float(), unit(batch, 128, 1).float()
    k = F.normalize(q + 0.7 * k, dim=-1)  # positives well above the negatives, as in training
    ref_loss, ref_grad = _loss_and_grads(q, k, 0.03, bf16=False)
    loss, grad = _loss_and_grads(q, k, 0.03, bf16=True)
    assert abs(loss - ref_loss) <= 1e-3 * abs(ref_loss)
    assert float((grad - ref_grad).norm() / ref_grad.norm()) <= 1e-3


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 x with its mantissa cut to TF32's 10 bits (round to nearest): what a GPU matmul reads."""
    bits = x.float().view(torch.int32)
    rounded = (bits + (1 << 12)) & ~((1 << 13) - 1)
    return rounded.view(torch.float32)


def test_tf32_logits_stay_within_0_1_percent() -> None:
    """On a GPU with runtime.matmul_precision "high" the float32 logits are TF32 products (inputs rounded
    to 10 significant bits, float32 sums): emulated here in float64, the loss stays within 0.1%."""
    q, k = unit(256, 2048, 2), unit(256, 2048, 3)
    k = F.normalize(q + 0.7 * k, dim=-1)
    exact = float(symmetric_info_nce(q, k, 0.03))
    tf32 = float(symmetric_info_nce(_tf32(q).double(), _tf32(k).double(), 0.03))
    assert abs(tf32 - exact) <= 1e-3 * exact
    assert (_tf32(q) != q.float()).any()  # the emulation does round


def test_shared_logits_equal_the_two_products_of_a_gathered_batch() -> None:
    """Alone, both directions come from one q kᵀ; given as gathered sides (DDP) they take two products."""
    q, k = unit(7, 5, 4), unit(7, 5, 5)
    shared = symmetric_info_nce(q, k, 0.1)
    two = 0.5 * (info_nce(q, k, 0, 0.1) + info_nce(k, q, 0, 0.1))
    gathered = symmetric_info_nce(q, k, 0.1, q_all=q.clone(), k_all=k.clone())  # not the same objects
    assert float(shared) == pytest.approx(float(two), rel=1e-12)
    assert float(gathered) == pytest.approx(float(two), rel=1e-12)
    assert float(shared) == pytest.approx(0.5 * (np_info_nce(q.numpy(), k.numpy(), 0, 0.1)
                                                 + np_info_nce(k.numpy(), q.numpy(), 0, 0.1)), rel=1e-12)


def test_router_terms_are_computed_only_when_weighted_or_read() -> None:
    from m3jepa.core.objective import Objective
    from m3jepa.train.audit import StepAudit

    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, hidden=16, num_experts=4, top_k=2, cl_dim=8)
    x, y = torch.randn(6, 12), torch.randn(6, 20)
    for weight, built in ((0.0, False), (0.5, True)):
        cfg.router_z_loss_weight = weight
        obj = Objective(cfg, LossConfig(), {"image": 12, "text": 20})
        with StepAudit() as audit:
            parts = obj("image->text", x, y)
        ran = "aten.logsumexp.default" in audit.total().ops
        assert ran == built, f"router z-loss with weight {weight}: computed {ran}"
        logits = [obj.predictor.mixer.route_rows(
            obj.predictor.embed("image", x) + obj.predictor.task_emb[t], t).logits for t in ("pred", "cl")]
        expected = sum(torch.logsumexp(g, -1).square().mean() for g in logits) / 2
        torch.testing.assert_close(parts.z, expected)  # read on demand: the same value either way
