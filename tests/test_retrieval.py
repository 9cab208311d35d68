"""Retrieval metrics against naive numpy references: both directions, ties, faiss, protocols, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3jepa.eval.retrieval import paired_subset, recall_at_k, retrieval_metrics
from m3jepa.knn import l2_normalize, topk_search

N_IMAGES, PER_IMAGE, DIM = 200, 5, 32


def naive_recall(queries, gallery, query_groups, gallery_groups, ks):
    """Loop over queries, full stable argsort of cosine scores: the reference for recall@k."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    hits = {k: 0 for k in ks}
    for i in range(len(q)):
        ranked = np.argsort(-(g.astype(np.float64) @ q[i].astype(np.float64)), kind="stable")
        for k in ks:
            if any(gallery_groups[j] == query_groups[i] for j in ranked[:k]):
                hits[k] += 1
    return {f"R@{k}": 100.0 * hits[k] / len(q) for k in ks}


@pytest.fixture(scope="module")
def coco_like():
    """200 images and 5 noisy captions each (row order: image 0's captions first), string ids."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((N_IMAGES, DIM)).astype(np.float32)
    captions = np.repeat(images, PER_IMAGE, axis=0) + 1.5 * rng.standard_normal(
        (N_IMAGES * PER_IMAGE, DIM)
    ).astype(np.float32)
    image_ids = np.array([f"img{i:04d}" for i in range(N_IMAGES)])
    caption_ids = np.repeat(image_ids, PER_IMAGE)
    return images, captions, image_ids, caption_ids


@pytest.mark.parametrize("direction", ["text->image", "image->text"])
def test_recall_matches_naive_reference(coco_like, direction):
    images, captions, image_ids, caption_ids = coco_like
    if direction == "text->image":
        args = (captions, images, caption_ids, image_ids)
    else:
        args = (images, captions, image_ids, caption_ids)
    ks = (1, 5, 10)
    result = retrieval_metrics(*args, ks=ks)
    expected = naive_recall(*args, ks)
    assert result.recalls == pytest.approx(expected, abs=1e-9)
    assert result.n_queries == len(args[0]) and result.n_gallery == len(args[1])
    # Not a degenerate case: neither all hits nor all misses.
    assert 0 < result.recalls["R@1"] < 100
    assert result.search_ms >= 0 and result.backend == "matmul"


def test_perfect_and_reversed_hand_built():
    # Gallery: 4 one-hot images; queries point at image i exactly.
    gallery = np.eye(4, dtype=np.float32)
    groups = np.array([10, 11, 12, 13])
    perfect = retrieval_metrics(gallery, gallery, groups, groups, ks=(1, 2, 3, 4))
    assert perfect.recalls == {"R@1": 100.0, "R@2": 100.0, "R@3": 100.0, "R@4": 100.0}
    # Ranked lists put the correct item at rank 4, 3, 2, 1 for queries 0..3.
    topk = np.array([[1, 2, 3, 0], [0, 3, 1, 2], [3, 2, 0, 1], [3, 0, 1, 2]])
    got = recall_at_k(topk, groups, groups, ks=(1, 2, 3, 4))
    assert got == {"R@1": 25.0, "R@2": 50.0, "R@3": 75.0, "R@4": 100.0}


def test_image_to_caption_any_of_five_counts():
    # Image 0 has captions at rows 0..4; only row 4 (its last caption) is nearest: still a hit at R@1.
    topk = np.array([[4, 5], [0, 9]])
    caption_groups = ["a"] * 5 + ["b"] * 5
    assert recall_at_k(topk, ["a", "b"], caption_groups, ks=(1, 2)) == {"R@1": 50.0, "R@2": 100.0}


@pytest.mark.parametrize("k", [1, 7, 60])
def test_faiss_and_matmul_agree(k):
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((300, 48)).astype(np.float32)
    gallery = rng.standard_normal((500, 48)).astype(np.float32)
    by_matmul = topk_search(queries, gallery, k, use_faiss=False, block=64)
    by_faiss = topk_search(queries, gallery, k, use_faiss=True)
    assert by_matmul.dtype == by_faiss.dtype == np.int64
    exact = queries.astype(np.float64) @ gallery.T.astype(np.float64)  # (Q, G)
    reference = np.argsort(-exact, axis=1)[:, :k]
    # Two float32 paths may order near-ties differently (scores equal to ~1e-6), so compare on the
    # queries whose top k+1 scores are separated well beyond float32 rounding: almost all of them.
    top_scores = -np.sort(-exact, axis=1)[:, : k + 1]
    clear = np.diff(top_scores, axis=1).max(axis=1) < -1e-4  # (Q,): every gap wider than 1e-4
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(by_matmul[clear], reference[clear])
    np.testing.assert_array_equal(by_faiss[clear], reference[clear])


def test_faiss_threshold_picks_the_path():
    rng = np.random.default_rng(2)
    queries, gallery = rng.standard_normal((70, 8)), rng.standard_normal((80, 8))
    groups = np.arange(80)
    small = retrieval_metrics(queries, gallery, groups[:70], groups, faiss_threshold=100)
    large = retrieval_metrics(queries, gallery, groups[:70], groups, faiss_threshold=10)
    assert (small.backend, large.backend) == ("matmul", "faiss")
    assert small.recalls == large.recalls
    # A handful of queries (a latency probe) never pays for building a faiss index.
    few = retrieval_metrics(queries[:5], gallery, groups[:5], groups, faiss_threshold=10)
    assert few.backend == "matmul"


@pytest.mark.parametrize("use_faiss", [False, True])
def test_ties_rank_lower_gallery_index_first(use_faiss):
    # Integer-valued vectors: scores are exact in float32, so the ties are real ties on both paths.
    gallery = np.array([[1, 0], [2, 0], [1, 0], [2, 0], [0, 1], [2, 0], [1, 0]], dtype=np.float32)
    queries = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    got = topk_search(queries, gallery, 4, use_faiss=use_faiss, block=1)
    expected = np.array(
        [
            [1, 3, 5, 0],  # scores 2, 2, 2 then the first of the 1s (rows 0, 2, 6 tie)
            [4, 0, 1, 2],  # one 1, then six 0s tied: lowest indices first
            [4, 0, 2, 6],  # 0 first, then the -1s, then the -2s
        ]
    )
    np.testing.assert_array_equal(got, expected)


def test_ties_across_the_kth_place_are_deterministic():
    # Many equal scores straddle the k-th place; argpartition alone would pick arbitrarily.
    rng = np.random.default_rng(3)
    gallery = rng.integers(-1, 2, size=(400, 3)).astype(np.float32)
    queries = rng.integers(-1, 2, size=(50, 3)).astype(np.float32)
    reference = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10]
    for use_faiss in (False, True):
        np.testing.assert_array_equal(topk_search(queries, gallery, 10, use_faiss=use_faiss), reference)


def test_paired_subset_keeps_first_caption_by_row_order():
    caption_groups = ["b", "a", "b", "c", "a", "c", "b"]
    np.testing.assert_array_equal(paired_subset(caption_groups), [0, 1, 3])
    assert paired_subset(caption_groups).dtype == np.int64


def test_paired_protocol_matches_reference(coco_like):
    images, captions, image_ids, caption_ids = coco_like
    keep = paired_subset(caption_ids)
    np.testing.assert_array_equal(keep, np.arange(0, N_IMAGES * PER_IMAGE, PER_IMAGE))
    paired_caps, paired_ids = captions[keep], caption_ids[keep]
    result = retrieval_metrics(images, paired_caps, image_ids, paired_ids)
    assert result.n_gallery == N_IMAGES
    assert result.recalls == pytest.approx(
        naive_recall(images, paired_caps, image_ids, paired_ids, (1, 5, 10))
    )


def test_missing_group_raises_with_count_and_example():
    gallery = np.eye(3, dtype=np.float32)
    queries = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    with pytest.raises(ValueError, match=r"2 of 4 queries .*'zzz'"):
        retrieval_metrics(queries, gallery, ["a", "b", "zzz", "zzz"], ["a", "b", "c"], ks=(1,))
    with pytest.raises(ValueError, match="2 of 4 queries"):
        recall_at_k(np.zeros((4, 1), dtype=np.int64), ["a", "b", "zzz", "zzz"], ["a", "b", "c"], ks=(1,))


def test_allow_missing_drops_and_counts():
    gallery = np.eye(3, dtype=np.float32)
    queries = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    result = retrieval_metrics(
        queries, gallery, ["a", "b", "zzz", "zzz"], ["a", "b", "c"], ks=(1,), allow_missing=True
    )
    assert result.n_dropped == 2 and result.n_queries == 2
    assert result.recalls == {"R@1": 100.0}


def test_bad_inputs_are_clear_errors():
    g = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="R@10 needs top-10"):
        recall_at_k(np.zeros((3, 5), dtype=np.int64), [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="k=4"):
        topk_search(g, g, 4)
    with pytest.raises(ValueError, match="dim"):
        topk_search(g, np.eye(4, dtype=np.float32), 1)
    for use_faiss in (False, True):
        with pytest.raises(ValueError, match="NaN"):
            topk_search(np.full((1, 3), np.nan, dtype=np.float32), g, 1, use_faiss=use_faiss)
        with pytest.raises(ValueError, match="NaN"):
            topk_search(
                g, np.array([[1, 0, 0], [0, np.inf, 0], [0, 0, 1]], np.float32), 1, use_faiss=use_faiss
            )
    with pytest.raises(ValueError, match="must match"):
        retrieval_metrics(g, g, [0, 1], [0, 1, 2])


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


@settings(max_examples=60, deadline=None)
@given(
    n_groups=st.integers(1, 12),
    n_queries=st.integers(1, 30),
    dim=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_recall_is_monotone_in_k_and_bounded(n_groups, n_queries, dim, seed):
    rng = np.random.default_rng(seed)
    gallery_groups = rng.integers(0, n_groups, size=n_groups + rng.integers(0, 10))
    gallery_groups[:n_groups] = np.arange(n_groups)  # every group present at least once
    query_groups = rng.integers(0, n_groups, size=n_queries)
    gallery = rng.standard_normal((len(gallery_groups), dim))
    queries = rng.standard_normal((n_queries, dim))
    ks = sorted({k for k in (1, 2, 5) if k <= len(gallery_groups)} | {len(gallery_groups)})
    recalls = [
        retrieval_metrics(queries, gallery, query_groups, gallery_groups, ks=ks).recalls[f"R@{k}"] for k in ks
    ]
    assert all(0.0 <= r <= 100.0 for r in recalls)
    assert all(a <= b for a, b in zip(recalls, recalls[1:], strict=False))
    assert recalls[-1] == 100.0  # k = gallery size always finds the group


def test_gallery_smaller_than_k_is_searched_whole():
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((3, 8)).astype(np.float32)
    queries = gallery[[0, 1, 2, 0]] + 0.01
    res = retrieval_metrics(queries, gallery, [0, 1, 2, 0], [0, 1, 2], ks=(1, 5, 10))
    assert res.recalls == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
    wrong = retrieval_metrics(queries, gallery, [1, 2, 0, 1], [0, 1, 2], ks=(1, 2, 10))
    assert wrong.recalls["R@1"] == 0.0 and wrong.recalls["R@10"] == 100.0  # k >= G: everything retrieved
