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
