"""Exact top-k search scored in bf16 and certified in float32: the same answer as topk_search, faster."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from m3jepa.accel.search.bf16 import BF16_UNIT, FP32_UNIT
from m3jepa.knn import as_matrix, topk_search


def topk_bf16_exact(
    queries: np.ndarray, gallery: np.ndarray, k: int, extra: int = 16, stats: dict | None = None
) -> np.ndarray:
    """Top-k gallery rows of each query by inner product, (Q, k) int64: exactly `topk_search`'s answer.

    Scores come from one bf16 matrix product (AMX / AVX512-bf16 run it several times faster than
    float32); the k + `extra` best candidates of each row are re-scored in float32 and the row is
    certified by an error bound (`_certify`); rows the bound cannot certify are searched again
    exactly (counted in `stats["redone"]`).
    """
    q, g = as_matrix("queries", queries), as_matrix("gallery", gallery)
    if k + extra >= g.shape[0]:
        return topk_search(q, g, k)
    qt, gt = torch.from_numpy(q), torch.from_numpy(g)
    scores = qt.bfloat16() @ gt.bfloat16().T  # (Q, G) bf16
    return _certified(qt, gt, scores, k, extra, stats)


def coco_topk(
    captions: np.ndarray, images: np.ndarray, k: int, extra: int = 16, stats: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(text→image (C, k), image→text (I, k)) top-k from ONE bf16 product: the two directions of the
    multi-caption protocol score the same (C, I) matrix, read by rows and by columns."""
    c, i = as_matrix("captions", captions), as_matrix("images", images)
    ct, it = torch.from_numpy(c), torch.from_numpy(i)
    scores = ct.bfloat16() @ it.bfloat16().T  # (C, I) bf16
    t2i = _certified(ct, it, scores, k, extra, stats) if k + extra < len(i) else topk_search(c, i, k)
    i2t = (
        _certified(it, ct, scores.T.contiguous(), k, extra, stats)
        if k + extra < len(c)
        else topk_search(i, c, k)
    )
    return t2i, i2t


def top_m(scores: Tensor, m: int, group: int = 32) -> tuple[Tensor, Tensor]:
    """The m largest entries of each row of `scores` (Q, G) and their columns, (Q, m) each.

    torch.topk over long rows is slow on CPU; the m best entries lie in the m groups (of `group`
    consecutive columns) with the largest maxima, so one pass of max-reduction narrows each row to
    m·group entries first. Exact, not approximate.
    """
    n_rows, n_cols = scores.shape
    pad = (-n_cols) % group
    padded = torch.nn.functional.pad(scores, (0, pad), value=float("-inf")) if pad else scores
    group_max = padded.view(n_rows, -1, group).amax(dim=-1)  # (Q, G/group)
    groups = group_max.topk(min(m, group_max.shape[1]), dim=1).indices  # (Q, m)
    cols = (groups.unsqueeze(-1) * group + torch.arange(group)).view(n_rows, -1)  # (Q, m·group)
    vals, j = padded.gather(1, cols).topk(m, dim=1)  # (Q, m)
    return vals, cols.gather(1, j)


def _certified(
    q: Tensor, g: Tensor, scores: Tensor, k: int, extra: int, stats: dict | None, block: int = 1024
) -> np.ndarray:
    """Re-rank the bf16 candidates of `scores` (Q, G) in float32; redo uncertified rows exactly."""
    m = k + extra
    top_s, cand = top_m(scores, m + 1)  # (Q, m+1) bf16 scores, int64 columns
    cand = cand[:, :m].contiguous()  # (Q, m)
    exact = torch.empty(cand.shape)  # (Q, m) float32 scores of the candidates
    for lo in range(0, len(q), block):  # blocks keep the gathered (b, m, d) rows in cache
        hi = lo + block
        exact[lo:hi] = torch.bmm(g[cand[lo:hi]], q[lo:hi].unsqueeze(-1)).squeeze(-1)
    # Rank candidates by score descending, then gallery index ascending (topk_search's tie rule).
    order = np.lexsort((cand.numpy(), -exact.numpy()), axis=1)[:, :k]  # (Q, k)
    top = np.take_along_axis(cand.numpy(), order, axis=1)  # (Q, k)
    kth = np.take_along_axis(exact.numpy(), order[:, -1:], axis=1)[:, 0]  # (Q,)
    ok = _certify(q, g, top_s[:, m].float(), torch.from_numpy(kth))  # (Q,) bool
    redo = np.flatnonzero(~ok.numpy())
    if stats is not None:
        stats["redone"] = stats.get("redone", 0) + len(redo)
        stats["rows"] = stats.get("rows", 0) + len(top)
    if len(redo):
        top[redo] = topk_search(q.numpy()[redo], g.numpy(), k)
    return top.astype(np.int64)


def _certify(q: Tensor, g: Tensor, outside: Tensor, kth: Tensor) -> Tensor:
    """Rows (Q,) whose best non-candidate provably scores below the k-th exact candidate score.

    For s = q·g and s' its bf16 product: s' - s = (q'-q)·g' + q·(g'-g) + accumulation + output
    rounding, so |s' - s| ≤ ‖q'-q‖·max‖g'‖ + ‖q‖·max‖g'-g‖ + d·u32·‖q'‖·max‖g'‖ + u16·|s'| / (1-u16).
    Every non-candidate has s' ≤ `outside` (the (m+1)-th bf16 score), so its exact score is at most
    outside + u16·|outside|/(1-u16) + the rest; strictly below the k-th exact score means it cannot
    enter the top k (not even by a tie). The float32 reference's own rounding is added once more.
    """
    qb, gb = q.bfloat16().float(), g.bfloat16().float()
    d = q.shape[1]
    g_norm = gb.norm(dim=1).max()  # max ‖g'‖
    g_err = (gb - g).norm(dim=1).max()  # max ‖g' - g‖
    q_norm, q_err = q.norm(dim=1), (qb - q).norm(dim=1)  # (Q,) each
    accumulate = (
        2 * d * FP32_UNIT * torch.maximum(q_norm, qb.norm(dim=1)) * torch.maximum(g_norm, g.norm(dim=1).max())
    )
    bound = q_err * g_norm + q_norm * g_err + accumulate  # (Q,)
    upper = outside + outside.abs() * (BF16_UNIT / (1 - BF16_UNIT)) + bound * 1.001  # (Q,) 0.1% slack
    return upper < kth
