"""The predictor: sparse MoE dispatch against dense and per-row references, heads, gates, counts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3jepa.config import ModelConfig
from m3jepa.model import (
    LinearAligner,
    M3JepaPredictor,
    build_predictor,
    count_parameters,
    paper_parameter_count,
    paper_preset,
    parse_direction,
)
from m3jepa.model.moe import MultiGateMoE, load_balance_loss, route

DIMS = {"image": 24, "text": 40, "audio": 16}


def small_cfg(**kw) -> ModelConfig:
    base = dict(dim=32, hidden=48, num_experts=6, top_k=2, dropout=0.0, cl_dim=16)
    return ModelConfig(**{**base, **kw})


def naive_moe(moe: MultiGateMoE, x: torch.Tensor, task: str) -> torch.Tensor:
    """Independent reference: row by row, softmax over the k best logits (or the release's rule)."""
    rows = []
    for xi in x:
        logits = moe.gate_for(task)(xi)  # (N,)
        top = sorted(range(moe.num_experts), key=lambda e: -float(logits[e].detach()))[: moe.top_k]
        if moe.routing == "topk_softmax":
            w = torch.softmax(logits[top], dim=0)  # (k,)
        else:
            w = torch.softmax(logits, dim=0)[top]  # (k,)
        rows.append(sum(w[j] * moe.experts[e](xi) for j, e in enumerate(top)))
    return torch.stack(rows)  # (T, d)


@pytest.mark.parametrize("routing", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("gates", ["multi", "shared"])
def test_sparse_matches_dense_and_per_row_reference_float64(routing: str, gates: str) -> None:
    torch.manual_seed(0)
    moe = MultiGateMoE(8, 16, num_experts=5, top_k=2, gates=gates, routing=routing).double()
    x = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    for task in ("pred", "cl"):
        sparse = moe(x, task).y
        dense = moe(x, task, dense=True).y
        torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sparse, naive_moe(moe, x, task), rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(t=st.integers(1, 20), n=st.integers(1, 7), data=st.data())
def test_sparse_and_dense_gradients_agree(t: int, n: int, data) -> None:
    k = data.draw(st.integers(1, n))
    torch.manual_seed(t * 31 + n)
    moe = MultiGateMoE(6, 10, num_experts=n, top_k=k).double()
    x = torch.randn(t, 6, dtype=torch.float64)
    probe = torch.randn(t, 6, dtype=torch.float64)  # a random linear functional of the output

    def grads(dense: bool) -> list[torch.Tensor]:
        moe.zero_grad()
        xx = x.clone().requires_grad_(True)
        ((moe(xx, "pred", dense=dense).y * probe).sum()).backward()
        return [xx.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in moe.parameters()]

    for gs, gd in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(gs, gd, rtol=1e-10, atol=1e-12)


def test_only_selected_experts_run_on_their_rows() -> None:
    torch.manual_seed(1)
    moe = MultiGateMoE(8, 16, num_experts=6, top_k=2)
    seen = [0] * 6
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, inp, out, e=e: seen.__setitem__(e, seen[e] + inp[0].shape[0]))
    out = moe(torch.randn(10, 8), "cl")
    assert seen == out.expert_counts.tolist()
    assert sum(seen) == 10 * 2  # T·k rows, not T·N


def test_routing_rules() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    r = route(logits, 2, "topk_softmax")
    assert r.experts.tolist() == [[0, 2]]
    e = torch.exp(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(r.weights, (e / e.sum()).unsqueeze(0))  # softmax over the k selected
    r2 = route(logits, 2, "softmax_topk")
    full = torch.softmax(logits, -1)
    torch.testing.assert_close(r2.weights, full[:, [0, 2]])  # the release: not renormalised
    assert float(r2.weights.sum()) < 1.0


def test_load_balance_loss_hand_values() -> None:
    # Uniform probabilities and perfectly balanced assignments: N · Σ (1/N)(1/N) = 1.
    uniform = route(torch.zeros(4, 4), 1)
    uniform.experts = torch.tensor([[0], [1], [2], [3]])
    assert float(load_balance_loss(uniform, 4)) == pytest.approx(1.0)
    # Everything on expert 0: f = (1, 0), P = softmax([1, 0]) → 2 · e/(e+1).
    r = route(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 1)
    expected = 2 * torch.e / (torch.e + 1)
    assert float(load_balance_loss(r, 2)) == pytest.approx(expected)


def test_aux_loss_is_unweighted_and_reaches_gates() -> None:
    torch.manual_seed(0)
    model = build_predictor(small_cfg(), DIMS)
    out = model("image", torch.randn(9, DIMS["image"]), "text")
    assert float(out.aux_loss.detach()) >= 1.0 - 1e-6  # N · Σ f·P ≥ 1, with equality only when balanced
    out.aux_loss.backward()
    assert all(
        g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in model.mixer.gates.values()
    )
    mlp = build_predictor(small_cfg(predictor="mlp"), DIMS)
    assert float(mlp("image", torch.randn(3, DIMS["image"]), "text").aux_loss) == 0.0


def test_multi_gate_has_one_gate_per_task_and_shared_one() -> None:
    multi = build_predictor(small_cfg(gates="multi"), DIMS)
    shared = build_predictor(small_cfg(gates="shared"), DIMS)
    assert sorted(multi.mixer.gates) == ["cl", "pred"]
    assert list(shared.mixer.gates) == ["shared"]
    assert shared.mixer.gate_for("pred") is shared.mixer.gate_for("cl")
    gate_params = 32 * 6 + 6
    assert count_parameters(multi) - count_parameters(shared) == gate_params
    # Different gates route the same rows differently.
    torch.manual_seed(3)
    out = multi("image", torch.randn(64, DIMS["image"]), "text")
    assert not torch.equal(out.expert_counts["pred"], out.expert_counts["cl"])


@pytest.mark.parametrize(
    "direction", ["image->text", "text->image", "audio->text", "image+text->text", "text+audio->image"]
)
def test_every_direction_uses_the_same_classes(direction: str) -> None:
    torch.manual_seed(0)
    model = build_predictor(small_cfg(), DIMS).eval()
    d = parse_direction(direction)
    b = 5
    x = {m: torch.randn(b, DIMS[m]) for m in d.sources}
    src = d.source
    out = model(src, x[src] if isinstance(src, str) else x, d.target)
    assert out.pred.shape == (b, DIMS[d.target])
    assert out.cl_query.shape == (b, 16)
    torch.testing.assert_close(out.cl_query.norm(dim=-1), torch.ones(b))
    keys = model.encode_target(d.target, torch.randn(b, DIMS[d.target]))
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(b))
    for counts in out.expert_counts.values():
        assert counts.shape == (6,) and int(counts.sum()) == b * 2


def test_multimodal_input_is_the_sum_of_its_parts() -> None:
    model = build_predictor(small_cfg(), DIMS)
    xi, xt = torch.randn(3, 24), torch.randn(3, 40)
    both = model.embed(("image", "text"), {"image": xi, "text": xt})
    torch.testing.assert_close(both, model.embed("image", xi) + model.embed("text", xt))


def test_predictor_sparse_vs_dense_end_to_end_float64() -> None:
    torch.manual_seed(0)
    model = build_predictor(small_cfg(), DIMS).double().eval()
    x = torch.randn(7, 24, dtype=torch.float64)
    a, b = model("image", x, "text"), model("image", x, "text", dense=True)
    torch.testing.assert_close(a.pred, b.pred)
    torch.testing.assert_close(a.cl_query, b.cl_query)


def per_task_forward(model: M3JepaPredictor, source: str, x: torch.Tensor, target: str):
    """The predictor as written before both tasks shared one dispatch: one mixer call per task."""
    z = model.embed(source, x)  # (B, d)
    h = {}
    for task in ("pred", "cl"):
        u = z + model.task_emb[task]  # (B, d)
        h[task] = u + torch.nn.functional.gelu(model.norms[task](model.mixer(u, task).y))  # (B, d)
    pred = model.pred_head[target](h["pred"])  # (B, D_target)
    return pred, torch.nn.functional.normalize(model.cl_head[target](h["cl"]), dim=-1)  # (B, d_cl)


@pytest.mark.parametrize("predictor", ["moe", "mlp"])
def test_forward_equals_one_mixer_call_per_task_float64(predictor: str) -> None:
    torch.manual_seed(0)
    model = build_predictor(small_cfg(predictor=predictor), DIMS).double()
    x = torch.randn(9, 40, dtype=torch.float64)
    out = model("text", x, "audio")
    pred, query = per_task_forward(model, "text", x, "audio")
    torch.testing.assert_close(out.pred, pred, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.cl_query, query, rtol=1e-12, atol=1e-12)


def test_forward_runs_each_expert_once_for_both_tasks() -> None:
    torch.manual_seed(0)
    model = build_predictor(small_cfg(), DIMS)
    calls = [0] * 6
    for e, expert in enumerate(model.mixer.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.__setitem__(e, calls[e] + 1))
    out = model("image", torch.randn(20, 24), "text")
    used = (out.expert_counts["pred"] + out.expert_counts["cl"]) > 0
    assert calls == used.long().tolist()


@pytest.mark.parametrize("routing", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("gates", ["multi", "shared"])
@pytest.mark.parametrize("predictor", ["moe", "mlp"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 17])
def test_query_is_the_cl_query_of_the_plain_forward(
    predictor: str, gates: str, routing: str, rows: int
) -> None:
    """`query` (the search path: cl task only, a per-row expert loop for 1-2 rows) against the plain
    forward's cl_query, float32 in eval mode (dropout on, so eval must switch it off) and float64 against
    the naive per-row reference, for one source and a concatenated one."""
    torch.manual_seed(rows)
    model = build_predictor(small_cfg(predictor=predictor, gates=gates, routing=routing, dropout=0.3),
                            DIMS).eval()
    x = torch.randn(rows, 40)
    with torch.inference_mode():
        torch.testing.assert_close(model.query("text", x, "image"), model("text", x, "image").cl_query,
                                   rtol=1e-5, atol=1e-6)
        both = {"image": torch.randn(rows, 24), "text": x}
        torch.testing.assert_close(model.query(("image", "text"), both, "audio"),
                                   model(("image", "text"), both, "audio").cl_query, rtol=1e-5, atol=1e-6)
    model = model.double()
    x = x.double()
    u = model.embed("text", x) + model.task_emb["cl"]  # (B, d)
    mixed = naive_moe(model.mixer, u, "cl") if predictor == "moe" else model.mixer.mlp(u)  # (B, d)
    want = torch.nn.functional.normalize(
        model.cl_head["image"](u + torch.nn.functional.gelu(model.norms["cl"](mixed))), dim=-1)
    torch.testing.assert_close(model.query("text", x, "image"), want, rtol=1e-12, atol=1e-12)


def test_query_runs_only_the_chosen_experts_of_one_row_and_no_pred_head() -> None:
    torch.manual_seed(0)
    model = build_predictor(small_cfg(), DIMS).eval()
    calls = [0] * 6
    for e, expert in enumerate(model.mixer.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.__setitem__(e, calls[e] + 1))
    heads = []
    for head in model.pred_head.values():
        head.register_forward_hook(lambda m, i, o: heads.append(1))
    x = torch.randn(1, 24)
    chosen = model.mixer.route_rows(model.embed("image", x) + model.task_emb["cl"], "cl").experts[0]
    model.query("image", x, "text")
    assert calls == [int(e in chosen.tolist()) for e in range(6)] and not heads


def test_all_parameters_train() -> None:
    torch.manual_seed(0)
    model = build_predictor(small_cfg(num_experts=3, top_k=3), {"image": 24, "text": 40})
    x, y = torch.randn(6, 24), torch.randn(6, 40)
    o1 = model("image", x, "text")
    o2 = model("text", y, "image")
    loss = o1.pred.sum() + o1.cl_query.sum() + o2.pred.sum() + o2.cl_query.sum()
    loss = loss + model.encode_target("text", y).sum() + model.encode_target("image", x).sum()
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_mlp_predictor_replaces_experts_with_one_dense_mlp() -> None:
    moe = build_predictor(small_cfg(), DIMS)
    mlp = build_predictor(small_cfg(predictor="mlp"), DIMS)
    assert isinstance(mlp, M3JepaPredictor) and not hasattr(mlp.mixer, "experts")
    expert = 32 * 48 + 48 + 48 * 32 + 32
    gates = 2 * (32 * 6 + 6)
    assert count_parameters(moe) - count_parameters(mlp) == 5 * expert + gates
    out = mlp("text", torch.randn(4, 40), "image")
    assert out.pred.shape == (4, 24) and out.expert_counts["pred"].tolist() == [4]


def test_linear_baseline_has_no_prediction() -> None:
    model = build_predictor(small_cfg(predictor="linear"), DIMS)
    assert isinstance(model, LinearAligner)
    assert count_parameters(model) == sum(dm * 16 + 16 for dm in DIMS.values())
    x = torch.randn(4, 24)
    out = model("image", x, "text")
    assert out.pred is None and out.expert_counts == {}
    w, bias = model.proj["image"].weight, model.proj["image"].bias
    torch.testing.assert_close(out.cl_query, torch.nn.functional.normalize(x @ w.T + bias, dim=-1))


def official_layout_count(n=12, d=2048, h=2048, d_cl=2048, image=1024, text=4096) -> int:
    """Hand count of the official release (MoE_predictor + MMJepa's CL target projections)."""
    lin = lambda a, b: a * b + b  # noqa: E731
    experts = n * (lin(d, h) + lin(h, d))
    gate = lin(d, n)
    norms = 2 * 2 * d
    task_emb = 2 * d
    in_proj = lin(image, d) + lin(text, d)
    pred_heads = lin(d, image) + lin(d, text)
    cl_heads = 2 * lin(d, d_cl)
    cl_targets = lin(image, d_cl) + lin(text, d_cl)
    modality_emb = image + text  # the release adds them in the encoders' spaces
    return experts + gate + norms + task_emb + in_proj + pred_heads + cl_heads + cl_targets + modality_emb


def test_paper_parameter_count() -> None:
    ours, ours_shared = paper_parameter_count("multi"), paper_parameter_count("shared")
    official = official_layout_count()
    print(f"paper preset: {ours:,} (multi gate), {ours_shared:,} (shared gate); release {official:,}")
    assert official == 140_617_740  # the "140.6M" of the paper
    # Ours differs only in where the modality embeddings live (d, not D_m) and in the second gate.
    assert ours_shared == official - (1024 + 4096) + 2 * 2048
    assert ours == ours_shared + 2048 * 12 + 12
    assert round(ours / 1e6, 1) == 140.6
    cfg = paper_preset()
    assert (cfg.num_experts, cfg.top_k, cfg.hidden, cfg.dropout) == (12, 4, 2048, 0.1)


def test_bad_inputs_fail_loudly() -> None:
    model = build_predictor(small_cfg(), DIMS)
    with pytest.raises(ValueError, match=r"expected \(B, 24\)"):
        model("image", torch.randn(3, 40), "text")
    with pytest.raises(KeyError, match="unknown modality"):
        model("video", torch.randn(3, 24), "text")
    with pytest.raises(KeyError, match="unknown target"):
        model("image", torch.randn(3, 24), "video")
    with pytest.raises(ValueError, match="exactly those keys"):
        model(("image", "text"), {"image": torch.randn(3, 24)}, "text")
    with pytest.raises(ValueError, match="source->target"):
        parse_direction("image-text")


@pytest.mark.slow  # a fresh interpreter imports torch: ~9 s on a busy CPU
def test_training_path_does_not_import_transformers() -> None:
    code = "import sys, m3jepa.model, m3jepa.train.schedule; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("predictor", ["moe", "mlp", "linear"])
def test_the_plain_model_is_made_of_torch_layers_only(predictor: str) -> None:
    """No fast-path module in the model itself: m3jepa.accel.install puts them in from outside."""
    model = build_predictor(small_cfg(predictor=predictor, dropout=0.1), DIMS)
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Dropout)):
            assert type(m) in (torch.nn.Linear, torch.nn.Dropout), f"{name} is a {type(m).__name__}"
        assert not type(m).__module__.startswith("m3jepa.accel"), name
    assert all(m.row_bucket == 1 for m in model.modules() if isinstance(m, MultiGateMoE))  # no padding


def test_l2_normalize_is_f_normalize_forward_and_backward() -> None:
    """The predictors' normalisation (a shorter backward) against torch's F.normalize, zero rows and rows
    under the 1e-12 floor included."""
    from m3jepa.model.predictor import l2_normalize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    x[1] = 0.0
    x[2] *= 1e-14  # under the floor: divided by 1e-12, a linear map
    probe = torch.randn(7, 5, generator=g, dtype=torch.float64)
    ours = x.clone().requires_grad_(True)
    ref = x.clone().requires_grad_(True)
    (l2_normalize(ours) * probe).sum().backward()
    (torch.nn.functional.normalize(ref, dim=-1) * probe).sum().backward()
    torch.testing.assert_close(l2_normalize(x), torch.nn.functional.normalize(x, dim=-1), rtol=1e-15, atol=0)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=0)
    unit = x[[0, 3, 4, 5, 6]].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(l2_normalize, (unit,))


def test_flops_per_sample_match_a_hand_count() -> None:
    from m3jepa.model import flops

    cfg = ModelConfig(dim=4, hidden=6, num_experts=3, top_k=2, cl_dim=5)
    dims = {"image": 2, "text": 3}
    # multiply-adds of one image->text sample: in_proj 2·4, gates 2 tasks · 4·3, experts 2 tasks · top-2 ·
    # (4·6 + 6·4), pred head 4·3, cl head 4·5, cl target 3·5
    data_fed, inner = 2 * 4 + 3 * 5, 2 * 4 * 3 + 2 * 2 * (4 * 6 + 6 * 4) + 4 * 3 + 4 * 5
    assert flops.forward_flops(cfg, dims, "image->text") == 2 * (data_fed + inner)
    assert flops.train_flops(cfg, dims, "image->text") == 2 * (2 * data_fed + 3 * inner)
    assert flops.logits_flops(cfg, 16) == 2 * 16 * 5 * 3
    mlp = ModelConfig(predictor="mlp", dim=4, hidden=6, cl_dim=5)
    mlp_inner = 2 * (4 * 6 + 6 * 4) + 4 * 3 + 4 * 5  # one dense MLP for both tasks, no gates
    assert flops.forward_flops(mlp, dims, "image->text") == 2 * (data_fed + mlp_inner)
    linear = ModelConfig(predictor="linear", cl_dim=5)
    assert flops.train_flops(linear, dims, "image->text") == 2 * 2 * (2 * 5 + 3 * 5)
    concat = flops.forward_flops(cfg, {**dims, "audio": 7}, "image+audio->text")
    assert concat == flops.forward_flops(cfg, dims, "image->text") + 2 * 7 * 4


def test_flops_per_sample_equal_torch_flop_counter_on_a_real_step() -> None:
    """An independent count: torch's FlopCounterMode over one real forward and backward (the loop over
    the experts a row chose), less the two products the per-sample count leaves apart: the InfoNCE logits
    and the (T, 1, k) x (T, k, d) mix of each row's k outputs."""
    from torch.utils.flop_counter import FlopCounterMode

    from m3jepa.config import LossConfig
    from m3jepa.core.objective import Objective
    from m3jepa.model import flops

    cfg = ModelConfig(dim=8, hidden=12, num_experts=3, top_k=2, cl_dim=4, dropout=0.0)
    dims, b = {"image": 6, "text": 10}, 8
    torch.manual_seed(0)
    obj = Objective(cfg, LossConfig(), dims)
    with FlopCounterMode(display=False) as counter:
        obj("image->text", torch.randn(b, 6), torch.randn(b, 10)).total.backward()
    mix = 2 * 3 * (2 * b * cfg.top_k * cfg.dim)  # two tasks; forward and the two gradients
    measured = counter.get_total_flops() - b * flops.logits_flops(cfg, b) - mix
    assert measured == b * flops.train_flops(cfg, dims, "image->text")


def test_model_info_prints_flops_per_sample_beside_the_parameters() -> None:
    from typer.testing import CliRunner

    from m3jepa import cli

    result = CliRunner().invoke(cli.app, ["model-info"])
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    # the paper preset, by hand: (1024·2048 in, 2·2048·12 gates, 2·4·2·2048² experts, 2048·4096 pred,
    # 2048² cl, 4096·2048 target) multiply-adds
    data_fed = 1024 * 2048 + 4096 * 2048  # no input gradient: backward costs one product, not two
    inner = 2 * 2048 * 12 + 2 * 4 * 2 * 2048**2 + 2048 * 4096 + 2048**2
    train = 2 * (2 * data_fed + 3 * inner)
    assert out[1].split() == ["image->text", f"{2 * (data_fed + inner) / 1e9:.4f}", f"{train / 1e9:.4f}"]
    assert out[-1].startswith("total") and "140,641,304" in out[-1]
