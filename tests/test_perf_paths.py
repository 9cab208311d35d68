"""Fast paths against their plain references: fused-task dispatch, f32 routing, fused AdamW, and the CPU
fast path of m3jepa.accel (bf16 weight shadows, one-pass AdamW kernel, folded clipping, dropout, search)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from m3jepa import accel
from m3jepa.accel import adamw
from m3jepa.accel import dropout as fast_dropout
from m3jepa.accel.adamw import ShadowAdamW, fused_adamw_bf16_shadow_
from m3jepa.accel.dropout import Bf16Dropout
from m3jepa.accel.search import coco_topk, topk_bf16_exact
from m3jepa.accel.shadows import (
    SHADOW_ATTR,
    Bf16Linear,
    attach_bf16_shadow,
    fresh_bf16_shadow,
    refresh_bf16_shadows,
    stale_bf16_shadows,
)
from m3jepa.config import LossConfig, ModelConfig, PipelineConfig
from m3jepa.core.device import CPU, Runtime
from m3jepa.core.objective import Objective
from m3jepa.knn import topk_search
from m3jepa.model.moe import DenseMixer, MultiGateMoE, route
from m3jepa.train.optim import adamw_impl, build_optimizer, optimizer_step

CPU_BF16 = Runtime(torch.device("cpu"), "bf16")  # the CPU fast path

DIMS = {"image": 24, "text": 40}


def _moe(**kw) -> MultiGateMoE:
    torch.manual_seed(0)
    return MultiGateMoE(16, 24, num_experts=5, top_k=2, **kw)


@pytest.mark.parametrize("routing", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("gates", ["multi", "shared"])
def test_forward_tasks_equals_one_call_per_task_and_dense_float64(routing: str, gates: str) -> None:
    moe = _moe(gates=gates, routing=routing).double()
    xs = {"pred": torch.randn(11, 16, dtype=torch.float64), "cl": torch.randn(7, 16, dtype=torch.float64)}
    fused = moe.forward_tasks(xs)
    dense = moe.forward_tasks(xs, dense=True)
    for task, x in xs.items():
        alone = moe(x, task)
        torch.testing.assert_close(fused[task].y, alone.y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused[task].y, dense[task].y, rtol=1e-12, atol=1e-12)
        assert torch.equal(fused[task].expert_counts, alone.expert_counts)
        torch.testing.assert_close(fused[task].aux_loss, alone.aux_loss)


def test_forward_tasks_gradients_equal_per_task_sum_float64() -> None:
    moe = _moe().double()
    xs = {t: torch.randn(9, 16, dtype=torch.float64) for t in ("pred", "cl")}
    probes = {t: torch.randn(9, 16, dtype=torch.float64) for t in xs}

    def grads(fused: bool) -> list[torch.Tensor]:
        moe.zero_grad()
        inp = {t: x.clone().requires_grad_(True) for t, x in xs.items()}
        ys = moe.forward_tasks(inp) if fused else {t: moe(x, t) for t, x in inp.items()}
        sum((ys[t].y * probes[t]).sum() for t in xs).backward()
        return [inp[t].grad for t in xs] + [p.grad for p in moe.parameters()]

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_each_expert_runs_once_for_all_tasks() -> None:
    moe = _moe()
    calls = [0] * moe.num_experts
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.__setitem__(e, calls[e] + 1))
    out = moe.forward_tasks({"pred": torch.randn(30, 16), "cl": torch.randn(30, 16)})
    used = (out["pred"].expert_counts + out["cl"].expert_counts) > 0
    assert calls == used.long().tolist()  # one call per used expert, not one per task


def test_bf16_autocast_routes_exactly_like_float32_and_stays_within_bf16_tolerance() -> None:
    moe = _moe()
    x = torch.randn(64, 16)
    ref = {t: moe(x, t) for t in ("pred", "cl")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = moe.forward_tasks({"pred": x, "cl": x})
        for t in ("pred", "cl"):
            r_fast = moe.route_rows(x, t)
            assert r_fast.weights.dtype == torch.float32
            r_ref = route(moe.gate_for(t)(x), moe.top_k, moe.routing)
            assert torch.equal(r_fast.experts, r_ref.experts)  # same decisions, not just close
    for t in ref:
        assert torch.equal(fast[t].expert_counts, ref[t].expert_counts)
        err = (fast[t].y.float() - ref[t].y).detach().norm() / ref[t].y.detach().norm()
        assert float(err) < 2e-2  # bf16: 8 mantissa bits through two layers


def test_bf16_expert_groups_are_padded_to_buckets_without_changing_results() -> None:
    moe = _moe()
    seen: list[int] = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    xs = {"pred": torch.randn(37, 16), "cl": torch.randn(23, 16)}
    results = {}
    for bucket in (16, 1):  # 1: no padding, the plain grouping
        moe.row_bucket = bucket
        inp = {t: x.clone().requires_grad_(True) for t, x in xs.items()}
        moe.zero_grad()
        with torch.autocast("cpu", dtype=BF16):
            out = moe.forward_tasks(inp)
        sum((out[t].y.float() * (i + 1)).sum() for i, t in enumerate(xs)).backward()
        results[bucket] = [out[t].y.float() for t in xs] + [inp[t].grad for t in xs]
        results[bucket] += [p.grad for p in moe.experts.parameters()]
        if bucket == 16:
            assert seen and all(n % 16 == 0 for n in seen)  # only whole buckets reach the experts
    for a, b in zip(results[16], results[1], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # pad rows change nothing but bf16 rounding


def test_dense_mixer_forward_tasks_matches_forward() -> None:
    torch.manual_seed(0)
    mixer = DenseMixer(16, 24)
    xs = {"pred": torch.randn(5, 16), "cl": torch.randn(3, 16)}
    out = mixer.forward_tasks(xs)
    for t, x in xs.items():
        torch.testing.assert_close(out[t].y, mixer(x, t).y)
        assert out[t].expert_counts.tolist() == [x.shape[0]]
        for alone in (out[t], mixer(x, t)):  # no router: both terms 0, whichever way they are built
            assert float(alone.aux_loss) == 0.0 and float(alone.z_loss) == 0.0


def test_build_optimizer_is_fused_on_cpu_and_matches_foreach() -> None:
    cfg = PipelineConfig()
    cfg.model = ModelConfig(dim=16, hidden=24, num_experts=3, top_k=2, cl_dim=8, dropout=0.0)
    torch.manual_seed(0)
    a = Objective(cfg.model, LossConfig(), DIMS)
    b = Objective(cfg.model, LossConfig(), DIMS)
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, cfg, CPU)
    assert opt_a.defaults["fused"] is True
    assert adamw_impl([torch.zeros(1, dtype=torch.float64)]) == {"fused": True}
    opt_b = torch.optim.AdamW(
        [
            {"params": [p for p in b.parameters() if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
            {"params": [p for p in b.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.train.lr,
        foreach=True,
    )
    x, y = torch.randn(6, 24), torch.randn(6, 40)
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(3):
            opt.zero_grad()
            model("image->text", x, y).total.backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["clipping", "not-clipping"])
def test_clipping_folded_into_fused_adamw_equals_clip_grad_norm(max_norm: float) -> None:
    """optimizer_step on torch's fused AdamW divides by the clip factor inside the update
    (accel.clipped_step): the same steps as clip_grad_norm_ then step, with one pass fewer."""
    from m3jepa.train.audit import StepAudit

    cfg = _cfg(bf16=False)
    a, b = _objective(cfg), _objective(cfg)
    opt_a, opt_b = build_optimizer(a, cfg, CPU), _plain_fused_adamw(b, cfg)
    assert accel.folds_clipping(opt_a) and opt_a.defaults["fused"]
    for step in range(4):
        torch.manual_seed(step)
        x, y = torch.randn(12, 24), torch.randn(12, 40)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(set_to_none=True)
            model("image->text", x, y).total.backward()
        with StepAudit() as audit:
            optimizer_step(opt_a, a, max_norm)
        torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
        opt_b.step()
        ops = audit.total().ops
        assert "aten._foreach_mul_.Tensor" not in ops and ops["aten._fused_adamw_.default"] == 2
        assert getattr(opt_a, "grad_scale", None) is None  # not left set for a later step
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bf16 weight shadows, ShadowAdamW

BF16 = torch.bfloat16


def _cfg(bf16: bool, dropout: float = 0.0) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.model = ModelConfig(dim=16, hidden=24, num_experts=3, top_k=2, cl_dim=8, dropout=dropout)
    cfg.runtime.precision = "bf16" if bf16 else "fp32"
    cfg.train.lr = 1e-2  # large enough that the updates, not the initial weights, dominate comparisons
    return cfg


def _objective(cfg: PipelineConfig, seed: int = 0) -> Objective:
    torch.manual_seed(seed)
    return Objective(cfg.model, LossConfig(), DIMS)


def _train(obj: Objective, opt: torch.optim.Optimizer, steps: range, clip: float, bf16: bool = True) -> None:
    """The loop's step: zero_grad, forward under autocast, backward, optimizer_step; seeded per step."""
    for step in steps:
        torch.manual_seed(1000 + step)  # dropout masks and the batch depend on the step only
        x, y = torch.randn(12, 24), torch.randn(12, 40)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16, enabled=bf16):
            loss = obj("image->text", x, y) if step % 2 == 0 else obj("text->image", y, x)
        loss.total.backward()
        optimizer_step(opt, obj, clip)


def _plain_fused_adamw(obj: Objective, cfg: PipelineConfig) -> torch.optim.AdamW:
    decay = [p for p in obj.parameters() if p.ndim >= 2]
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in obj.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True)


def test_bf16_linear_is_nn_linear_without_a_fresh_shadow_and_autocast_linear_with_one() -> None:
    torch.manual_seed(0)
    lin, plain = Bf16Linear(12, 8), nn.Linear(12, 8)
    plain.load_state_dict(lin.state_dict())
    x = torch.randn(5, 12)
    assert torch.equal(lin(x), plain(x))  # no shadow
    attach_bf16_shadow(lin.weight)
    assert torch.equal(lin(x), plain(x))  # a shadow, but no autocast: float32 as before
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        ya, yb = lin(xa), plain(xb)
    assert torch.equal(ya, yb)  # the shadow holds exactly autocast's cast of the weight
    probe = torch.randn(5, 8)
    (ya.float() * probe).sum().backward()
    (yb.float() * probe).sum().backward()
    shadow = getattr(lin.weight, SHADOW_ATTR).weight
    assert lin.weight.grad is None and shadow.grad.dtype == BF16  # the gradient stays bf16
    torch.testing.assert_close(shadow.grad.float(), plain.weight.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lin.bias.grad, plain.bias.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-2, atol=1e-2)


def test_a_stale_shadow_is_never_used() -> None:
    lin = Bf16Linear(4, 3)
    attach_bf16_shadow(lin.weight)
    with torch.autocast("cpu", dtype=BF16):
        assert fresh_bf16_shadow(lin.weight) is not None
        with torch.no_grad():
            lin.weight.mul_(2.0)  # e.g. load_state_dict: the version counter moves
        assert fresh_bf16_shadow(lin.weight) is None
        assert stale_bf16_shadows([lin.weight]) == [lin.weight]
        refresh_bf16_shadows([lin.weight])
        assert torch.equal(fresh_bf16_shadow(lin.weight), lin.weight.detach().to(BF16))


def test_bf16_off_builds_torch_fused_adamw_and_no_shadows() -> None:
    obj = _objective(_cfg(bf16=False))
    opt = build_optimizer(obj, _cfg(bf16=False), CPU)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert not any(hasattr(p, SHADOW_ATTR) for p in obj.parameters())


def test_install_swaps_the_predictor_layers_in_place_and_keeps_the_state_dict() -> None:
    cfg = _cfg(bf16=True, dropout=0.1)
    obj = _objective(cfg)
    before = dict(obj.state_dict(keep_vars=True))
    x, y = torch.randn(6, 24), torch.randn(6, 40)
    obj.eval()
    ref = obj("image->text", x, y).total
    accel.install(obj)
    accel.install(obj)  # a second install changes nothing
    after = dict(obj.state_dict(keep_vars=True))
    assert list(after) == list(before)  # same keys, same order: checkpoints load either way
    assert all(after[k] is before[k] for k in before)  # the very same Parameter objects
    mixer = obj.predictor.mixer
    assert all(type(g) is nn.Linear for g in mixer.gates.values())  # the gates route in float32
    expert = mixer.experts[0]
    assert [type(m) for m in expert] == [Bf16Linear, nn.GELU, Bf16Dropout, Bf16Linear, Bf16Dropout]
    assert expert[2].p == 0.1 and not expert[2].training
    assert all(type(m) is Bf16Linear for m in obj.predictor.in_proj.values())
    assert mixer.row_bucket == accel.ROW_BUCKET
    assert torch.equal(obj("image->text", x, y).total, ref)  # no shadow, no autocast: nn.Linear exactly


def test_build_optimizer_installs_the_fast_path_only_for_bf16_on_a_cpu() -> None:
    cfg = _cfg(bf16=True)
    for runtime in (CPU, Runtime(torch.device("cuda"), "bf16"), Runtime(torch.device("cuda"), "fp32")):
        obj = _objective(cfg)
        opt = build_optimizer(obj, cfg, runtime)  # a cuda Runtime with CPU parameters: only the choice
        assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True, runtime
        assert not any(isinstance(m, (Bf16Linear, Bf16Dropout)) for m in obj.modules()), runtime
        assert obj.predictor.mixer.row_bucket == 1
    obj = _objective(cfg)
    opt = build_optimizer(obj, cfg, CPU_BF16)
    assert isinstance(opt, ShadowAdamW) and obj.predictor.mixer.row_bucket == accel.ROW_BUCKET
    assert {id(p) for p in opt.shadowed} == {
        id(m.weight) for m in obj.modules() if isinstance(m, Bf16Linear)
    }


def test_one_pass_kernel_matches_torch_fused_adamw() -> None:
    torch.manual_seed(0)
    shapes = [(64, 48), (7, 5), (1000,)]
    p = [torch.randn(s) for s in shapes]
    g = [torch.randn(s).to(BF16) for s in shapes]
    m = [torch.randn(s) * 0.1 for s in shapes]
    v = [torch.rand(s) * 0.01 for s in shapes]
    p_ref, m_ref, v_ref = ([t.clone() for t in ts] for ts in (p, m, v))
    shadows = [torch.empty(s, dtype=BF16) for s in shapes]
    steps, steps_ref = [torch.tensor(3.0) for _ in shapes], [torch.tensor(3.0) for _ in shapes]
    coef = torch.tensor(0.7)  # a clip factor
    hyper = dict(lr=1e-3, weight_decay=0.05, eps=1e-8)
    assert fused_adamw_bf16_shadow_(p, g, m, v, shadows, steps, betas=(0.9, 0.999), grad_mult=coef, **hyper)
    torch._fused_adamw_(
        p_ref, [t.float() for t in g], m_ref, v_ref, [], steps_ref, beta1=0.9, beta2=0.999,
        amsgrad=False, maximize=False, grad_scale=coef.reciprocal(), **hyper,
    )
    for a, b in zip(p + m + v, p_ref + m_ref + v_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)  # a few float32 ulps
    assert all(torch.equal(s, t.to(BF16)) for s, t in zip(shadows, p, strict=True))


def test_shadow_adamw_folds_clipping_like_clip_grad_norm() -> None:
    # Float32 forward: no shadow is used, every gradient is float32 and takes torch's fused AdamW
    # with the clip factor as grad_scale; the reference clips with clip_grad_norm_ first.
    cfg = _cfg(bf16=True)
    a, b = _objective(cfg), _objective(cfg)
    opt_a, opt_b = build_optimizer(a, cfg, CPU_BF16), _plain_fused_adamw(b, cfg)
    assert isinstance(opt_a, ShadowAdamW)
    _train(a, opt_a, range(3), clip=0.05, bf16=False)
    _train(b, opt_b, range(3), clip=0.05, bf16=False)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", [True, False])
def test_shadow_adamw_tracks_autocast_with_fused_adamw(kernel: bool, monkeypatch) -> None:
    cfg = _cfg(bf16=True)
    a, b = _objective(cfg), _objective(cfg)
    start = [p.detach().clone() for p in a.parameters()]
    if not kernel:  # the eager fallback (no C++ compiler): widen, torch's fused AdamW, refresh
        monkeypatch.setattr(adamw, "fused_adamw_bf16_shadow_", lambda *args, **kw: False)
    opt_a, opt_b = build_optimizer(a, cfg, CPU_BF16), _plain_fused_adamw(b, cfg)
    _train(a, opt_a, range(4), clip=0.5)
    _train(b, opt_b, range(4), clip=0.5)
    for p0, pa, pb in zip(start, a.parameters(), b.parameters(), strict=True):
        da, db = pa.detach() - p0, pb.detach() - p0  # the updates, not the weights, are compared
        assert float((da - db).norm()) <= 0.05 * float(db.norm()) + 1e-6  # bf16 gradients
    for p in opt_a.shadowed:  # every shadow is exactly the cast of its master after the update
        assert torch.equal(getattr(p, SHADOW_ATTR).weight.detach(), p.detach().to(BF16))
        assert p.grad is None


def test_shadow_adamw_resume_is_bit_exact_and_state_dict_is_torch_adamw() -> None:
    cfg = _cfg(bf16=True, dropout=0.1)
    whole = _objective(cfg)
    opt = build_optimizer(whole, cfg, CPU_BF16)
    _train(whole, opt, range(4), clip=0.5)

    first = _objective(cfg)
    opt1 = build_optimizer(first, cfg, CPU_BF16)
    _train(first, opt1, range(2), clip=0.5)
    weights = {k: v.clone() for k, v in first.state_dict().items()}
    opt_state = copy.deepcopy(opt1.state_dict())
    plain = _plain_fused_adamw(_objective(cfg), cfg)
    plain.load_state_dict(copy.deepcopy(opt_state))  # the checkpoint format is torch's AdamW

    resumed = _objective(cfg, seed=7)  # different initial weights: everything must come from the state
    opt2 = build_optimizer(resumed, cfg, CPU_BF16)
    resumed.load_state_dict(weights)  # the loop's order: weights, then optimizer
    opt2.load_state_dict(opt_state)
    _train(resumed, opt2, range(2, 4), clip=0.5)
    for pa, pb in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("kernel", [True, False])
def test_bf16_dropout_is_nn_dropout_outside_autocast_and_unbiased_inside(kernel: bool, monkeypatch) -> None:
    if not kernel:  # the torch path (no C++ compiler): 64 bits from torch's generator per 4 elements
        monkeypatch.setattr(fast_dropout, "available", lambda x: False)
    fast, plain = Bf16Dropout(0.1), nn.Dropout(0.1)
    x = torch.randn(400, 256)
    torch.manual_seed(3)
    a = fast(x)
    torch.manual_seed(3)
    assert torch.equal(a, plain(x))  # float32: the same masks from the same generator
    xb = x.to(BF16).requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        y = fast(xb)
    dropped = y == 0
    p = 6554 / 65536  # 0.1 on the 2^-16 grid
    n = dropped.numel()
    assert abs(float(dropped.float().mean()) - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(y[~dropped], (xb * (1 / (1 - p)))[~dropped].detach())  # kept values rescaled
    y.float().sum().backward()
    assert torch.equal(xb.grad == 0, dropped)  # no gradient through dropped elements
    fast.eval()
    with torch.autocast("cpu", dtype=BF16):
        assert torch.equal(fast(xb), xb)


def _hash_mask_reference(n: int, seed: int, threshold: int) -> np.ndarray:
    """(n,) bool: fast_dropout's keep mask, from its definition (splitmix64 of seed + (i // 4 + 1)·γ)."""
    with np.errstate(over="ignore"):
        j = np.arange(n // 4, dtype=np.uint64)
        z = np.uint64(seed) + (j + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    shifts = np.uint64(16) * np.arange(4, dtype=np.uint64)
    bits = (z[:, None] >> shifts[None, :]) & np.uint64(0xFFFF)  # (n/4, 4): element 4j + e
    return bits.reshape(-1) >= threshold


@pytest.mark.parametrize("n", [4, 1000, 4 * 40_000 + 8])  # one group, a partial block, two threads
def test_hash_dropout_kernel_matches_its_definition_forward_and_backward(n: int) -> None:
    if not fast_dropout.available(torch.zeros(4, dtype=BF16)):
        pytest.skip("no C++ compiler: Bf16Dropout takes its torch path (tested below)")
    seed, threshold, scale = 0x1234_5678_9ABC_DEF0, 6554, 65536 / (65536 - 6554)
    x = torch.randn(n).to(BF16)
    x[:3] = torch.tensor([float("inf"), float("-inf"), -0.0])
    keep = torch.from_numpy(_hash_mask_reference(n, seed, threshold))
    expected = torch.where(keep, x * scale, 0.0)  # torch's bf16 multiply: float32, rounded to nearest even
    xg = x.clone().requires_grad_(True)
    y = fast_dropout.HashDropout.apply(xg, seed, threshold, scale)
    assert torch.equal(y, expected)
    g = torch.randn(n).to(BF16)
    y.backward(g)
    assert torch.equal(xg.grad, torch.where(keep, g * scale, 0.0))  # the same mask, recomputed
    with torch.no_grad():  # the mask depends on neither the thread count nor the call
        torch.set_num_threads(1)
        try:
            assert torch.equal(fast_dropout.apply_mask(x, seed, threshold, scale), expected)
        finally:
            torch.set_num_threads(2)
    other = torch.from_numpy(_hash_mask_reference(n, seed + 1, threshold))
    assert n < 100 or not torch.equal(keep, other)  # another seed, another mask


def test_bf16_dropout_draws_its_seed_from_torch_generator() -> None:
    drop = Bf16Dropout(0.1)
    x = torch.randn(64, 256).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        torch.manual_seed(5)
        a, b = drop(x), drop(x)
        torch.manual_seed(5)
        assert torch.equal(drop(x), a)  # a resumed RNG state draws the same masks
    assert not torch.equal(a, b)


def test_native_bf16_sum_of_squares_matches_float64() -> None:
    grads = [torch.randn(s).to(BF16) * 3 for s in [(2048, 33), (7,), (16,), (1,), (100_001,)]]
    got = adamw.sumsq_bf16(grads)
    if got is None:
        pytest.skip("no C++ compiler: the clip norm takes torch's norms")
    want = sum(float(g.double().square().sum()) for g in grads)
    assert abs(float(got) - want) <= 1e-6 * want


def test_shadow_gradient_is_written_into_one_buffer_and_accumulates_like_autograd() -> None:
    torch.manual_seed(0)
    lin, plain = Bf16Linear(12, 8), nn.Linear(12, 8)
    plain.load_state_dict(lin.state_dict())
    attach_bf16_shadow(lin.weight)
    shadow = getattr(lin.weight, SHADOW_ATTR)
    x1, x2 = torch.randn(5, 12), torch.randn(3, 12)

    def grads(use_twice: bool) -> tuple[torch.Tensor, torch.Tensor]:
        for m in (lin, plain):
            m.zero_grad(set_to_none=True)
        shadow.weight.grad = None
        with torch.autocast("cpu", dtype=BF16):
            ya = lin(x1).float().sum() + (lin(x2).float().square().sum() if use_twice else 0)
            yb = plain(x1).float().sum() + (plain(x2).float().square().sum() if use_twice else 0)
        ya.backward()
        yb.backward()
        return shadow.weight.grad, plain.weight.grad

    first, ref = grads(use_twice=False)
    torch.testing.assert_close(first.float(), ref, rtol=1e-2, atol=1e-2)
    buffer, first = first.data_ptr(), first.clone()
    twice, ref2 = grads(use_twice=True)  # the weight used twice in one backward: summed
    assert twice.data_ptr() == buffer  # the same memory, overwritten, not a new tensor
    torch.testing.assert_close(twice.float(), ref2, rtol=2e-2, atol=2e-2)
    again, _ = grads(use_twice=False)  # after zero_grad the buffer is overwritten, not added to
    assert torch.equal(again.float(), first.float()) and again.data_ptr() == buffer


# ---------------------------------------------------------------- retrieval


def _unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_bf16_search_equals_float32_exact_search(k: int) -> None:
    rng = np.random.default_rng(0)
    q, g = _unit(300, 64, rng), _unit(700, 64, rng)
    g[5] = g[3]  # an exact tie: the lower index must come first, as in topk_search
    q[7] = g[3]
    assert np.array_equal(topk_bf16_exact(q, g, k), topk_search(q, g, k))


def test_bf16_search_with_clustered_near_ties() -> None:
    rng = np.random.default_rng(1)
    base = _unit(20, 32, rng)
    g = base[rng.integers(0, 20, 500)] + 1e-3 * rng.standard_normal((500, 32)).astype(np.float32)
    q = base[rng.integers(0, 20, 100)]
    assert np.array_equal(topk_bf16_exact(q, g, 10), topk_search(q, g, 10))


def test_coco_topk_scores_both_directions_from_one_product() -> None:
    rng = np.random.default_rng(2)
    caps, imgs = _unit(250, 48, rng), _unit(50, 48, rng)
    t2i, i2t = coco_topk(caps, imgs, 10)
    assert np.array_equal(t2i, topk_search(caps, imgs, 10))
    assert np.array_equal(i2t, topk_search(imgs, caps, 10))


# ---------------------------------------------------------------- store-fed batches


def test_store_batches_equal_in_memory_batches_and_prefetch_keeps_order(tmp_path) -> None:
    from synthetic_stores import make_split, overrides

    from m3jepa.config import load_pipeline
    from m3jepa.core.feeder import StorePairs
    from m3jepa.core.paired import load_split
    from m3jepa.distributed import DistInfo
    from m3jepa.prefetch import Prefetcher
    from m3jepa.store import open_store
    from m3jepa.train.loop import _batch

    make_split(tmp_path, "train", 100)
    cfg = load_pipeline(None, overrides(tmp_path, tmp_path / "run"))
    data = load_split(cfg, "train", ["text->image"])
    rows_s, rows_t = data.pairs["text->image"]
    pairs = StorePairs(
        open_store(data.modalities["text"].store), open_store(data.modalities["image"].store), rows_s, rows_t
    )
    with Prefetcher(lambda step: pairs.batch(32, 0, step), range(3, 12), depth=2) as feed:
        for step, (x, y) in feed:
            xm, ym = _batch(data, "text->image", 32, 0, step, DistInfo())
            assert torch.equal(x, xm) and torch.equal(y, ym)


def test_prefetcher_reraises_errors_in_the_consumer() -> None:
    from m3jepa.prefetch import Prefetcher

    def make(step: int) -> int:
        if step == 2:
            raise OSError("disk gone")
        return step

    got = []
    with pytest.raises(OSError, match="disk gone"), Prefetcher(make, range(5)) as feed:
        for _step, value in feed:
            got.append(value)
    assert got == [0, 1]


def test_raw_rows_equal_feature_store_reads(tmp_path) -> None:
    from synthetic_stores import make_split

    from m3jepa.core.feeder import RawRows
    from m3jepa.store import open_store

    make_split(tmp_path, "train", 150)  # shards of 64 rows: the last one is short
    for store_dir in sorted((tmp_path / "synthetic" / "train").glob("*/*")):
        store = open_store(store_dir)
        assert RawRows.supports(store)
        ids = np.random.default_rng(0).integers(0, len(store), 500)
        assert np.array_equal(RawRows(store).read(ids), store.read(ids, dtype=None))


def test_raw_rows_across_several_chunks_per_shard(tmp_path) -> None:
    from synthetic_stores import write_store

    from m3jepa.core.feeder import RawRows
    from m3jepa.data.records import Record
    from m3jepa.store import open_store

    n = 2600  # shards of 2500 rows hold chunks of 1024, 1024 and a short 452; then a 100-row shard
    feats = np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32)
    records = [Record(i, f"s{i}", f"g{i}", "image", f"{i}.png") for i in range(n)]
    store = open_store(write_store(tmp_path, "train", "image", records, feats, shard_size=2500))
    ids = np.random.default_rng(0).integers(0, n, 800)
    assert np.array_equal(RawRows(store).read(ids), feats[ids])
