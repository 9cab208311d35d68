"""Fast paths against their plain references: fused-task dispatch, f32 routing, fused AdamW, bf16 search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3jepa.config import LossConfig, ModelConfig, PipelineConfig
from m3jepa.eval.fast_search import coco_topk, topk_bf16_exact
from m3jepa.eval.retrieval import topk_search
from m3jepa.model.moe import DenseMixer, MultiGateMoE, route
from m3jepa.train.objective import Objective
from m3jepa.train.optim import adamw_impl, build_optimizer

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


def test_dense_mixer_forward_tasks_matches_forward() -> None:
    torch.manual_seed(0)
    mixer = DenseMixer(16, 24)
    xs = {"pred": torch.randn(5, 16), "cl": torch.randn(3, 16)}
    out = mixer.forward_tasks(xs)
    for t, x in xs.items():
        torch.testing.assert_close(out[t].y, mixer(x, t).y)
        assert out[t].expert_counts.tolist() == [x.shape[0]]


def test_build_optimizer_is_fused_on_cpu_and_matches_foreach() -> None:
    cfg = PipelineConfig()
    cfg.model = ModelConfig(dim=16, hidden=24, num_experts=3, top_k=2, cl_dim=8, dropout=0.0)
    torch.manual_seed(0)
    a = Objective(cfg.model, LossConfig(), DIMS)
    b = Objective(cfg.model, LossConfig(), DIMS)
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, cfg)
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
    from m3jepa.store import open_store
    from m3jepa.train.data import load_split
    from m3jepa.train.distributed import DistInfo
    from m3jepa.train.feeder import Prefetcher, StorePairs
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
    from m3jepa.train.feeder import Prefetcher

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

    from m3jepa.store import open_store
    from m3jepa.train.feeder import RawRows

    make_split(tmp_path, "train", 150)  # shards of 64 rows: the last one is short
    for store_dir in sorted((tmp_path / "synthetic" / "train").glob("*/*")):
        store = open_store(store_dir)
        assert RawRows.supports(store)
        ids = np.random.default_rng(0).integers(0, len(store), 500)
        assert np.array_equal(RawRows(store).read(ids), store.read(ids, dtype=None))


def test_raw_rows_across_several_chunks_per_shard(tmp_path) -> None:
    from synthetic_stores import write_store

    from m3jepa.data.records import Record
    from m3jepa.store import open_store
    from m3jepa.train.feeder import RawRows

    n = 2600  # shards of 2500 rows hold chunks of 1024, 1024 and a short 452; then a 100-row shard
    feats = np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32)
    records = [Record(i, f"s{i}", f"g{i}", "image", f"{i}.png") for i in range(n)]
    store = open_store(write_store(tmp_path, "train", "image", records, feats, shard_size=2500))
    ids = np.random.default_rng(0).integers(0, n, 800)
    assert np.array_equal(RawRows(store).read(ids), feats[ids])
