"""Routing health (issue 14, part 1): shares and entropy, the collapse threshold, the Switch load-balancing
and ST-MoE z-loss terms against hand-written formulas, and their logging through training and evaluate."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic_stores import make_stores, overrides

from m3jepa.config import ConfigError, LossConfig, ModelConfig, load_pipeline
from m3jepa.core.paired import load_split
from m3jepa.eval.evaluate import evaluate_run, prediction_health
from m3jepa.model import AlignmentLoss, M3JepaPredictor
from m3jepa.model.moe import (
    MultiGateMoE,
    Routing,
    collapse_threshold,
    load_balance_loss,
    route,
    router_z_loss,
    routing_health,
    routing_summary,
    warn_unbalanced,
)
from m3jepa.model.predictor import PredictorOutput
from m3jepa.train.loop import train
from m3jepa.train.recipes import RoutingTally


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    return make_stores(tmp_path_factory.mktemp("stores"))


# ---------------------------------------------------------------- formulas


def test_switch_load_balance_matches_hand_formula() -> None:
    """N · Σ_e f_e · P_e with f_e the share of the T·k assignments and P_e the mean router probability."""
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-0.5, 1.5, 0.0], [1.0, 1.0, 3.0]])
    r = route(logits, top_k=2)
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    chosen = [sorted(range(3), key=lambda e: -row[e])[:2] for row in logits.tolist()]
    f = [sum(e in c for c in chosen) / (4 * 2) for e in range(3)]
    p = [sum(row[e] for row in probs) / 4 for e in range(3)]
    expected = 3 * sum(fe * pe for fe, pe in zip(f, p, strict=True))
    assert float(load_balance_loss(r, 3)) == pytest.approx(expected, rel=1e-6)


def test_router_z_loss_matches_hand_formula() -> None:
    """ST-MoE eq. 5: (1/T) Σ_t (log Σ_n exp(x_tn))²."""
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [10.0, -3.0, 4.0]], dtype=torch.float64)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 3
    assert float(router_z_loss(logits)) == pytest.approx(expected, rel=1e-12)
    assert float(router_z_loss(logits[:0])) == 0.0


def test_moe_returns_the_z_loss_of_its_gate_logits() -> None:
    torch.manual_seed(0)
    moe = MultiGateMoE(8, 16, num_experts=4, top_k=2).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    out = moe.forward_tasks({"pred": x, "cl": x + 1})
    for task, inp in (("pred", x), ("cl", x + 1)):
        gate = moe.gates[task]
        logits = inp @ gate.weight.T + gate.bias  # (5, 4)
        torch.testing.assert_close(out[task].z_loss, torch.logsumexp(logits, -1).square().mean())


def test_alignment_loss_adds_both_router_terms_with_their_weights() -> None:
    q = F.normalize(torch.randn(4, 6), dim=-1)
    k = F.normalize(torch.randn(4, 6), dim=-1)
    out = PredictorOutput(pred=torch.zeros(4, 3), cl_query=q, aux_loss=torch.tensor(1.7), expert_counts={},
                          z_loss=torch.tensor(2.5))
    base = AlignmentLoss(LossConfig())(out, torch.ones(4, 3), k)
    both = AlignmentLoss(LossConfig(), load_balance_weight=0.01, router_z_loss_weight=0.001)(
        out, torch.ones(4, 3), k
    )
    assert float(both.total - base.total) == pytest.approx(0.01 * 1.7 + 0.001 * 2.5, abs=1e-6)
    assert float(both.z) == 2.5


def test_predictor_z_loss_is_the_mean_over_the_two_gates() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, hidden=16, num_experts=4, top_k=2, cl_dim=8, dropout=0.0)
    model = M3JepaPredictor(cfg, {"image": 12, "text": 10})
    x = torch.randn(6, 12)
    out = model("image", x, "text")
    u = model.embed("image", x)
    zs = [router_z_loss(model.mixer.gates[t](u + model.task_emb[t])) for t in ("pred", "cl")]
    torch.testing.assert_close(out.z_loss, (zs[0] + zs[1]) / 2)


def test_routing_health_shares_entropy_and_collapse() -> None:
    # 4 rows, k = 2 of N = 4: every row to experts 0 and 1 -> the floor of a top-2 gate
    h = routing_health([4, 4, 0, 0], rows=4, top_k=2)
    assert h["share"] == {"e0": 1.0, "e1": 1.0, "e2": 0.0, "e3": 0.0}
    assert h["entropy"] == pytest.approx(math.log(2) / math.log(4))
    assert h["threshold"] == pytest.approx((math.log(2) + math.log(4)) / (2 * math.log(4)))
    assert h["collapsed"] and h["max_share"] == 1.0
    uniform = routing_health([2, 2, 2, 2], rows=4, top_k=2)
    assert uniform["entropy"] == pytest.approx(1.0) and not uniform["collapsed"]
    assert sum(uniform["share"].values()) == pytest.approx(2.0)  # shares sum to k
    # top-1: the threshold is the usual normalised entropy 0.5
    assert collapse_threshold(12, 1) == pytest.approx(0.5)
    assert list(routing_health([1] * 12, 12, 1)["share"])[:2] == ["e00", "e01"]  # sortable names


def test_routing_tally_sums_on_device_and_reads_once() -> None:
    tally = RoutingTally(top_k=2)
    c = torch.tensor([3, 1, 0, 0])
    tally.add({"image->text": ({"pred": c, "cl": c.flip(0)}, 2)})
    tally.add({"image->text": ({"pred": c, "cl": c.flip(0)}, 2)})
    out = tally.read()
    assert out["image->text"]["pred"]["share"] == {"e0": 1.5, "e1": 0.5, "e2": 0.0, "e3": 0.0}
    assert set(out["image->text"]["pred"]) == {"share", "entropy"}
    assert tally.read() == {}  # read starts over
    none = RoutingTally(top_k=None)  # no router (mlp, linear): nothing kept
    none.add({"image->text": ({"pred": torch.tensor([4])}, 4)})
    assert none.read() == {}


def test_router_weights_are_validated() -> None:
    with pytest.raises(ConfigError, match="router_z_loss_weight"):
        ModelConfig(router_z_loss_weight=-1.0)
    with pytest.raises(ConfigError, match="load_balance_weight"):
        ModelConfig(load_balance_weight=float("nan"))


def test_load_balancing_spreads_routing() -> None:
    """Minimising N·Σ f·P alone moves a collapsed gate toward uniform: the term is wired to the gate."""
    torch.manual_seed(0)
    moe = MultiGateMoE(8, 8, num_experts=4, top_k=1)
    with torch.no_grad():
        moe.gates["pred"].bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # every row to expert 0
    x = torch.randn(256, 8)
    before = routing_health(moe(x, "pred").expert_counts.tolist(), 256, 1)
    opt = torch.optim.SGD(moe.gates.parameters(), lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        moe(x, "pred").aux_loss.backward()
        opt.step()
    after = routing_health(moe(x, "pred").expert_counts.tolist(), 256, 1)
    assert before["collapsed"] and after["entropy"] > 0.9 > before["entropy"]


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_training_logs_routing_and_r2_and_evaluate_reports_them(stores, tmp_path, caplog) -> None:
    run = tmp_path / "run"
    cfg = load_pipeline(None, overrides(stores, run, **{"model.load_balance_weight": 0.01,
                                                        "model.router_z_loss_weight": 0.001}))
    train(cfg)
    lines = _lines(run)
    logged = [x for x in lines if "loss" in x]
    assert all(set(x["routing"]) == {"image->text", "text->image"} for x in logged)
    h = logged[-1]["routing"]["image->text"]["pred"]
    assert len(h["share"]) == 4 and 0.0 <= h["entropy"] <= 1.0
    assert sum(h["share"].values()) == pytest.approx(2.0)  # k = 2: each row counts twice
    vals = [x for x in lines if "val" in x]
    assert all(set(x["r2"]) == {"image->text", "text->image"} and "val_routing" in x for x in vals)
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_run(run).to_json()
    assert set(metrics["routing"]["text->image"]) == {"pred", "cl"}
    assert set(metrics["routing"]["text->image"]["cl"]) >= {"share", "entropy", "threshold", "collapsed"}
    assert "Routing and prediction" in (run / "metrics.md").read_text()
    assert (run / "routing.png").stat().st_size > 0
    assert metrics["r2"]["image->text"] > 0.0  # the synthetic text is a linear map of the image


def test_prediction_health_r2_matches_numpy(stores, tmp_path) -> None:
    """R² = 1 − SSE/SST over the split's pairs, against numpy on the same predictions."""
    cfg = load_pipeline(None, overrides(stores, tmp_path / "run"))
    data = load_split(cfg, "val", ["image->text"])
    torch.manual_seed(0)
    model = M3JepaPredictor(cfg.model, data.dims()).eval()
    got = prediction_health(model, data, ["image->text"], batch_size=7)  # several batches
    rows_s, rows_t = data.pairs["image->text"]
    with torch.no_grad():  # the same 7-row batches: a float32 forward's rounding depends on the batch shape
        src = data.rows("image", rows_s)
        pred = torch.cat([model("image", src[i : i + 7], "text").pred for i in range(0, len(src), 7)])
        pred = pred.double().numpy()
    t = data.rows("text", rows_t).double().numpy()
    expected = 1 - ((pred - t) ** 2).sum() / ((t - t.mean(axis=0)) ** 2).sum()
    assert got["r2"]["image->text"] == pytest.approx(expected, rel=1e-9)
    counts = got["routing"]["image->text"]["pred"]["share"]
    assert sum(counts.values()) == pytest.approx(cfg.model.top_k)
    assert isinstance(np.float64(got["routing"]["image->text"]["cl"]["entropy"]), np.float64)


def test_mlp_predictor_logs_no_routing(stores, tmp_path) -> None:
    run = tmp_path / "run"
    train(load_pipeline(None, overrides(stores, run, **{"model.predictor": "mlp", "train.max_steps": 10,
                                                        "train.eval_every": 10})))
    assert not any("routing" in x or "val_routing" in x for x in _lines(run))


def test_routing_wrapper_types() -> None:
    r = route(torch.randn(3, 4), top_k=2)
    assert isinstance(r, Routing) and r.logits is not None and r.logits.shape == (3, 4)


# ---------------------------------------------------------------- a quiet report (issue 21 item 6)


def _collapsed_routing() -> dict:
    """Top-4 of 12: the pred gate sends every row to e00, e03, e06, e08; the cl gate is uniform."""
    pred = routing_health([10 if e in (0, 3, 6, 8) else 0 for e in range(12)], rows=10, top_k=4)
    cl = routing_health([10] * 12, rows=30, top_k=4)
    return {"text->image": {"pred": pred, "cl": cl}}


def test_routing_health_is_one_line_that_explains_a_100_percent_share() -> None:
    line = routing_summary(_collapsed_routing(), "test split")
    assert "\n" not in line and line.startswith("routing (test split; each row uses 4 of 12 experts)")
    assert "0.56-1.00 over 2 gates" in line and "0.56 = every row through the same 4 experts" in line
    assert "collapsed (below 0.78): text->image pred" in line and "nothing to do" in line
    uniform = {"a->b": {"cl": routing_health([10] * 12, rows=30, top_k=4)}}
    assert "collapsed" not in routing_summary(uniform, "val")


def test_collapse_is_warned_only_where_load_balancing_was_asked_for(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        warn_unbalanced(_collapsed_routing(), 0.0, "test split")
    assert not caplog.records  # collapse alone: reported, not warned (docs/results.md)
    warned: set = set()
    with caplog.at_level(logging.WARNING):
        warn_unbalanced(_collapsed_routing(), 0.1, "validation", warned)
        warn_unbalanced(_collapsed_routing(), 0.1, "validation", warned)  # once per gate
    assert len(caplog.records) == 1
    assert "model.load_balance_weight=0.1 did not balance the pred gate of text->image" in caplog.text


def test_the_report_explains_shares_and_r2(stores, tmp_path, caplog) -> None:
    run = tmp_path / "run"
    train(load_pipeline(None, overrides(stores, run, **{"train.max_steps": 20})))
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_run(run)
    assert not [r for r in caplog.records if r.name == "m3jepa.model.moe"]
    printed = metrics.table()
    assert sum(x.startswith("- routing (test split") for x in printed.splitlines()) == 1
    assert "- R² of the predicted latents: image->text" in printed and "below 0 worse" in printed
    md = (run / "metrics.md").read_text()
    assert "share of rows¹" in md and "¹ share: the fraction" in md and "so the shares sum to k × 100%" in md
    assert "| R²² |" in md and "² R²: 1 − SSE/SST" in md
