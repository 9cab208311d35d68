"""Exact ranks scored in bf16 (search.exact_ranks) against float64 and float32 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3jepa.accel import search as fs
from m3jepa.accel.search import bf16, int8, rows, scan
from m3jepa.accel.search import native as kernels
from m3jepa.eval import retrieval as rt
from m3jepa.eval.retrieval import cross_retrieval_metrics, retrieval_metrics
from m3jepa.knn import l2_normalize

PATHS = [pytest.param(True, id="native"), pytest.param(False, id="torch")]


def native_or_skip(native: bool) -> bool:
    if native and kernels.load() is None:
        pytest.skip("no C compiler: the native band kernel is not built")
    return native


def naive_ranks(q: np.ndarray, g: np.ndarray, q_codes, g_codes, k_max: int) -> np.ndarray:
    """Rank of each query's best correct item in a full stable argsort of float64 scores."""
    scores = q.astype(np.float64) @ g.astype(np.float64).T  # (Q, G)
    out = np.full(len(q), fs.NO_RANK, dtype=np.int64)
    for i in range(len(q)):
        order = np.argsort(-scores[i], kind="stable")
        hits = np.flatnonzero(g_codes[order] == q_codes[i])
        if len(hits):
            out[i] = min(int(hits[0]), k_max)
    return out


def coco_like(n_img: int, per: int, d: int, noise: float, seed: int, tie_eps: float = 1e-5, every: int = 7):
    """Images and `per` noisy captions each, with planted exact duplicates and near-ties (`tie_eps`),
    two pairs of images in every `every`.

    Near-ties of 1e-5 lie far below bf16 resolution (~2e-3) but some fall below float32 rounding
    (~1e-7), where float32 kernels disagree with each other: those are checked against float64.
    Comparisons with the float32 search use 3e-4, whose gaps all exceed float32 rounding here.
    """
    rng = np.random.default_rng(seed)
    img = l2_normalize(rng.standard_normal((n_img, d), dtype=np.float32))
    img[1::every] = img[0::every][: len(img[1::every])]  # exact duplicates: equal scores, lower index first
    cap = np.repeat(img, per, axis=0) + noise * rng.standard_normal((n_img * per, d), dtype=np.float32)
    cap = l2_normalize(cap)
    near = img[2::every][: len(img[3::every])] + tie_eps * rng.standard_normal((1, d), dtype=np.float32)
    img[3::every] = l2_normalize(near)
    return img, cap, np.arange(n_img), np.repeat(np.arange(n_img), per)


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("block", [64, 1000])
def test_exact_ranks_match_float64_reference_both_directions(native, block):
    img, cap, ig, cg = coco_like(150, 5, 48, noise=1.2, seed=0)
    got = fs.exact_ranks(cap, img, cg, ig, 10, block=block, native=native_or_skip(native))
    np.testing.assert_array_equal(got.rows, naive_ranks(cap, img, cg, ig, 10))
    np.testing.assert_array_equal(got.cols, naive_ranks(img, cap, ig, cg, 10))
    # Not degenerate: hits and misses at every k, and some queries resolved in the band.
    for r in (got.rows, got.cols):
        assert 0 < (r == 0).mean() < 1 and 0 < (r == 10).mean() < 1
    assert got.stats["resolved"] > 0


@pytest.mark.parametrize("native", PATHS)
def test_integer_ties_follow_the_lower_index_rule(native):
    # Integer vectors: every score is exact in bf16, float32 and float64, so ties are real ties.
    rng = np.random.default_rng(1)
    g = rng.integers(-1, 2, size=(300, 4)).astype(np.float32)
    q = rng.integers(-1, 2, size=(120, 4)).astype(np.float32)
    q_codes, g_codes = rng.integers(0, 40, size=120), rng.integers(0, 40, size=300)
    got = fs.exact_ranks(q, g, q_codes, g_codes, 10, block=32, native=native_or_skip(native))
    np.testing.assert_array_equal(got.rows, naive_ranks(q, g, q_codes, g_codes, 10))
    np.testing.assert_array_equal(got.cols, naive_ranks(g, q, g_codes, q_codes, 10))


def test_retrieval_metrics_rank_path_equals_float32_topk(monkeypatch):
    img, cap, ig, cg = coco_like(200, 5, 64, noise=1.3, seed=2, tie_eps=3e-4)
    ref = {
        name: retrieval_metrics(*args, use_faiss=False)
        for name, args in {"t2i": (cap, img, cg, ig), "i2t": (img, cap, ig, cg)}.items()
    }
    monkeypatch.setattr(rt, "RANK_MIN_SCORES", 0)
    for name, args in {"t2i": (cap, img, cg, ig), "i2t": (img, cap, ig, cg)}.items():
        fast = retrieval_metrics(*args)
        assert fast.backend == "bf16-rank" and ref[name].backend == "matmul"
        assert fast.recalls == ref[name].recalls, name
        assert 0 < fast.recalls["R@1"] < fast.recalls["R@10"] < 100
    both = cross_retrieval_metrics(cap, img, cg, ig)
    assert [r.backend for r in both] == ["bf16-rank-both"] * 2
    assert (both[0].recalls, both[1].recalls) == (ref["t2i"].recalls, ref["i2t"].recalls)
    assert (both[0].n_queries, both[0].n_gallery, both[1].n_queries) == (1000, 200, 200)


def test_unnormalized_and_string_groups(monkeypatch):
    monkeypatch.setattr(rt, "RANK_MIN_SCORES", 0)
    rng = np.random.default_rng(3)
    g = rng.standard_normal((90, 16)).astype(np.float32) * 3
    q = g[rng.integers(0, 90, size=60)] + rng.standard_normal((60, 16)).astype(np.float32) * 2
    g_groups = np.array([f"id{i % 45}" for i in range(90)])  # two gallery items per group
    q_groups = np.array([f"id{i % 45}" for i in range(60)])
    for normalize in (True, False):
        fast = retrieval_metrics(q, g, q_groups, g_groups, normalize=normalize)
        ref = retrieval_metrics(q, g, q_groups, g_groups, normalize=normalize, use_faiss=False)
        assert fast.backend == "bf16-rank" and fast.recalls == ref.recalls


def test_missing_groups_raise_or_are_dropped(monkeypatch):
    monkeypatch.setattr(rt, "RANK_MIN_SCORES", 0)
    img, cap, ig, cg = coco_like(40, 5, 16, noise=1.0, seed=4, tie_eps=1e-3)
    img_groups = ig.copy()
    img_groups[0] = 999  # image 0's captions have no image; image 999 has no caption
    with pytest.raises(ValueError, match="no item in the gallery"):
        cross_retrieval_metrics(cap, img, cg, img_groups)
    t2i, i2t = cross_retrieval_metrics(cap, img, cg, img_groups, allow_missing=True)
    assert (t2i.n_dropped, t2i.n_queries, i2t.n_dropped, i2t.n_queries) == (5, 195, 1, 39)
    # The reference is float64 with the stable tie rule: the float32 matmul search breaks the planted
    # exact duplicates (images 7 and 8 score equal) by its BLAS's summation order, which differs by host.
    cap_n, img_n = l2_normalize(cap), l2_normalize(img)
    a, b = np.isin(cg, img_groups), np.isin(img_groups, cg)
    ref_t2i = fs.recalls_from_ranks(naive_ranks(cap_n[a], img_n, cg[a], img_groups, 10), (1, 5, 10))
    ref_i2t = fs.recalls_from_ranks(naive_ranks(img_n[b], cap_n, img_groups[b], cg, 10), (1, 5, 10))
    assert (t2i.recalls, i2t.recalls) == (ref_t2i, ref_i2t)


def test_non_finite_inputs_are_refused():
    q = np.ones((4, 8), np.float32)
    g = np.ones((6, 8), np.float32)
    g[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        fs.exact_ranks(q, g, np.arange(4), np.arange(6), 3)


def test_bf16_keys_round_outwards_and_keep_order():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(2000), rng.standard_normal(200) * 1e-3, [0.0, -0.0, 1.0, -1.0]])
    for up in (True, False):
        keys = bf16.keys(x, up=up)
        vals = bf16.key_values(keys).numpy().astype(np.float64)
        assert (vals >= x).all() if up else (vals <= x).all()
        order = np.argsort(vals, kind="stable")
        assert (np.diff(keys[order].astype(np.int64)) >= 0).all()  # key order = value order
        assert (np.abs(vals - x) <= 2**-7 * np.abs(x) + 1e-300).all()  # at most one bf16 step away


@pytest.mark.parametrize("native", PATHS)
def test_ranks_pinned_only_as_far_as_ks_need(native):
    # With ks = [1, 5] a rank is only decided against 1 and 5; every `rank < k` must still be right.
    img, cap, ig, cg = coco_like(150, 5, 48, noise=1.2, seed=6)
    got = fs.exact_ranks(cap, img, cg, ig, 5, ks=[1, 5], block=100, native=native_or_skip(native))
    refs = naive_ranks(cap, img, cg, ig, 10), naive_ranks(img, cap, ig, cg, 10)
    for ranks, ref in zip((got.rows, got.cols), refs, strict=True):
        for k in (1, 5):
            np.testing.assert_array_equal(ranks < k, ref < k)


def test_native_rows_and_pair_dots_match_torch():
    kernel = native_or_skip(True) and kernels.load()
    rng = np.random.default_rng(7)
    x = rng.standard_normal((37, 21)).astype(np.float32) * np.float32(3.0)  # d not a multiple of 8
    x[3] = x[5]  # equal rows must score bit-equal (ties)
    nat, ref = rows.prepare(x, kernel), rows.prepare(x, None)
    assert torch.equal(nat.x16.view(torch.int16), ref.x16.view(torch.int16))  # round to nearest even
    block = nat.block16(4, 30, torch.empty((26, 21), dtype=torch.bfloat16))
    assert torch.equal(block.view(torch.int16), ref.x16[4:30].view(torch.int16))
    x64, x16 = x.astype(np.float64), ref.x16.double().numpy()
    for bound, exact in ((nat.norm, x64), (nat.err, x64 - x16), (nat.norm16, x16)):
        true = np.linalg.norm(exact, axis=1)
        assert (bound >= true).all() and np.allclose(bound, true, rtol=1e-9)
    ai, bi = rng.integers(0, 37, 500), rng.integers(0, 37, 500)
    got = rows.pair_dots(nat.x, nat.x, ai, bi, kernel)
    np.testing.assert_allclose(got, np.einsum("pd,pd->p", x64[ai], x64[bi]), rtol=0, atol=1e-12)
    ties = rows.pair_dots(nat.x, nat.x, np.array([3, 0, 3]), np.array([0, 5, 7]), kernel)
    assert ties[0] == ties[1] == rows.pair_dots(nat.x, nat.x, np.array([0]), np.array([3]), kernel)[0]


# ---------------------------------------------------------------- the int8 first stage


def int8_or_skip(monkeypatch) -> None:
    """Skip where the oneDNN int8 product is not exact; on a VNNI CPU without AMX (where the stage stays
    off in use, for speed) turn it on for this test only, so its exactness is still checked there."""
    native_or_skip(True)
    if not int8.available(kernels.load(), 64):
        if not (int8._cpu_has_int8_dot() and int8._self_test()):
            pytest.skip("no int8 first stage here (no AMX/VNNI CPU or no oneDNN qlinear op)")
        monkeypatch.setattr(int8, "_OK", True)  # VNNI without AMX: exact, only slow


def test_int8_stage_matches_float64_reference_with_rescored_rows(monkeypatch):
    # Well separated (caption–image cosine ≈ 0.9) with planted duplicates and 1e-5 near-ties: int8
    # decides most rows; the tied ones stay open, are scored again in bf16, then exactly.
    int8_or_skip(monkeypatch)
    img, cap, ig, cg = coco_like(400, 5, 64, noise=0.05, seed=8, every=100)  # 4% of the rows tie
    got = fs.exact_ranks(cap, img, cg, ig, 10, block=256, int8_first=True)
    np.testing.assert_array_equal(got.rows, naive_ranks(cap, img, cg, ig, 10))
    np.testing.assert_array_equal(got.cols, naive_ranks(img, cap, ig, cg, 10))
    assert got.stats["int8_rows"] == len(cap)
    assert 0 < got.stats["rescored_rows"] < 0.1 * len(cap) and got.stats["resolved"] > 0


def test_int8_stage_hands_over_to_bf16_and_undoes_its_counts(monkeypatch):
    # Hard data with int8 forced past its sample check: the first int8 blocks pass (their rows are
    # easy), then a block opens too many rows and it and all later blocks are redone in bf16.
    int8_or_skip(monkeypatch)
    monkeypatch.setattr(scan.Int8Stage, "pays", lambda *a, **k: True)
    monkeypatch.setattr(scan, "INT8_BLOCK", 100)
    rng = np.random.default_rng(9)
    easy_img = l2_normalize(rng.standard_normal((60, 48), dtype=np.float32))  # no ties: nothing open
    easy_cap = l2_normalize(np.repeat(easy_img, 5, axis=0) + 0.05 * rng.standard_normal((300, 48)))
    hard_img, hard_cap, _, _ = coco_like(90, 5, 48, noise=1.2, seed=10)
    img, cap = np.concatenate([easy_img, hard_img]), np.concatenate([easy_cap, hard_cap])
    ig, cg = np.arange(150), np.repeat(np.arange(150), 5)
    got = fs.exact_ranks(cap, img, cg, ig, 10, block=128, int8_first=True)
    np.testing.assert_array_equal(got.rows, naive_ranks(cap, img, cg, ig, 10))
    np.testing.assert_array_equal(got.cols, naive_ranks(img, cap, ig, cg, 10))
    assert 0 < got.stats["int8_rows"] < len(cap)


def test_int8_stage_skipped_on_hard_data_and_off_without_native(monkeypatch):
    img, cap, ig, cg = coco_like(150, 5, 48, noise=1.2, seed=0)
    if kernels.load() is not None and int8.available(kernels.load(), 48):
        got = fs.exact_ranks(cap, img, cg, ig, 10, int8_first=None)
        assert got.stats["int8_rows"] == 0  # the sample check saw too many open rows
    got = fs.exact_ranks(cap, img, cg, ig, 10, native=False)
    assert got.stats["int8_rows"] == 0 and got.stats["native"] == 0
    with pytest.raises(RuntimeError, match="int8"):
        fs.exact_ranks(cap, img, cg, ig, 10, native=False, int8_first=True)


def test_cross_retrieval_metrics_int8_path_equals_float32_topk(monkeypatch):
    int8_or_skip(monkeypatch)
    img, cap, ig, cg = coco_like(400, 5, 64, noise=0.05, seed=11, tie_eps=3e-4, every=100)
    assert fs.exact_ranks(cap, img, cg, ig, 10, int8_first=None).stats["int8_rows"] == len(cap)
    monkeypatch.setattr(rt, "RANK_MIN_SCORES", 0)
    both = cross_retrieval_metrics(cap, img, cg, ig)
    ref = (
        retrieval_metrics(cap, img, cg, ig, use_faiss=False).recalls,
        retrieval_metrics(img, cap, ig, cg, use_faiss=False).recalls,
    )
    assert (both[0].recalls, both[1].recalls) == ref
    assert both[1].recalls["R@1"] < 100  # the duplicates and near-ties cost some hits


def test_native_quantize_bounds_and_int8_product(monkeypatch):
    int8_or_skip(monkeypatch)
    kernel = kernels.load()
    rng = np.random.default_rng(12)
    x = rng.standard_normal((53, 37)).astype(np.float32) * np.float32(0.05)  # d not a multiple of 16
    x[4] = 0.0  # a zero row: scale 1, q = 0
    p = rows.prepare(x, kernel, copy=False)
    np.testing.assert_array_equal(p.amax, np.abs(x).max(1))
    for q in (int8.quantize(p), int8.quantize_shared(p, 3, 50, torch.empty((53, 37), dtype=torch.int8))):
        lo = 0 if len(q.scale) == 53 else 3
        xh = q.scale[:, None].astype(np.float64) * q.q.numpy()  # (n, d)
        err = np.linalg.norm(x[lo : lo + len(xh)] - xh, axis=1)
        assert (q.err >= err).all() and np.allclose(q.err, err, rtol=1e-3)
        assert (q.norm >= np.linalg.norm(xh, axis=1)).all() and np.abs(q.q.numpy()).max() == 127
    qa, qb = int8.quantize_shared(p, 0, 53, torch.empty((53, 37), dtype=torch.int8)), int8.quantize(p)
    out = int8.Product(qb, 53)(qa.q, float(qa.scale[0])).double().numpy()  # (53, 53)
    exact = (qa.q.double() @ qb.q.double().T).numpy() * float(qa.scale[0]) * qb.scale.astype(np.float64)
    assert (np.abs(out - exact) <= int8.OUT_UNIT * np.abs(exact)).all()
