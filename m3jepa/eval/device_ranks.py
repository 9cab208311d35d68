"""Exact recall@k on any torch device: blocked float64 products, ranks counted where the latents are.

The GPU path of stage 3 (the CPU keeps its exact-rank engine, m3jepa.accel.search). Scores are float64
products of the L2-normalised latents, blocked over queries so a (b, G) score block stays under
`block_bytes`; each block is reduced to one rank per query on the device, so only the (Q,) ranks come
back to the host. Ranks follow `topk_search`'s tie rule (an equal score goes to the lower gallery index),
so recalls equal a float64 reference computed on the host.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from m3jepa.eval.retrieval import DEFAULT_KS, RetrievalResult, answerable, check_ks

# One float64 score block: 256 MiB (plus a few masks of the same shape in bool).
BLOCK_BYTES = 2**28


def best_correct_ranks(
    queries: Tensor,
    gallery: Tensor,
    query_codes: Tensor,
    gallery_codes: Tensor,
    block_bytes: int = BLOCK_BYTES,
) -> Tensor:
    """(Q,) int64: the 0-based rank of each query's best correct gallery item, on the tensors' device.

    queries (Q, d) and gallery (G, d) are L2-normalised; a query's correct items are the gallery rows of
    its group code. Every query must have one (callers drop the others first).
    rank = #{j: s_j > s*} + #{j < c*: s_j == s*}, s* the best correct score and c* the lowest correct
    index scoring it: the position topk_search would give c*.
    """
    q64, g64 = queries.double(), gallery.double()  # (Q, d), (G, d)
    n_gallery = g64.shape[0]
    block = max(1, block_bytes // (8 * max(n_gallery, 1)))
    index = torch.arange(n_gallery, device=g64.device)  # (G,)
    out = []
    for lo in range(0, q64.shape[0], block):
        s = q64[lo : lo + block] @ g64.T  # (b, G) float64
        correct = query_codes[lo : lo + block, None] == gallery_codes[None, :]  # (b, G)
        best = torch.where(correct, s, torch.full_like(s, -torch.inf)).amax(dim=1, keepdim=True)  # (b, 1)
        at_best = correct & (s == best)  # (b, G)
        first = torch.where(at_best, index, n_gallery).amin(dim=1, keepdim=True)  # (b, 1) c*
        above = (s > best).sum(dim=1)  # (b,)
        tied_before = ((s == best) & (index < first)).sum(dim=1)  # (b,)
        out.append(above + tied_before)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=q64.device)


def device_retrieval_metrics(
    queries: Tensor,
    gallery: Tensor,
    query_groups: Sequence[Any],
    gallery_groups: Sequence[Any],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    allow_missing: bool = False,
) -> RetrievalResult:
    """Recall@k (percent) of queries (Q, d) against gallery (G, d), both on one device and normalised.

    The same contract as eval.retrieval.retrieval_metrics (missing queries raise, or are dropped with
    `allow_missing`), computed where the tensors are.
    """
    q_codes, g_codes, missing, keep = answerable(
        len(queries), len(gallery), query_groups, gallery_groups, allow_missing
    )
    ks = check_ks(ks, max(int(k) for k in ks) if ks else 0)
    device = queries.device
    t0 = time.perf_counter()
    keep_t = torch.from_numpy(keep).to(device)
    ranks = best_correct_ranks(
        queries[keep_t],
        gallery,
        torch.from_numpy(q_codes[keep]).to(device),
        torch.from_numpy(g_codes).to(device),
    )
    hits = torch.stack([(ranks < k).sum() for k in ks]).cpu().numpy()  # the one copy back: (len(ks),)
    ms = 1000.0 * (time.perf_counter() - t0)
    recalls = {f"R@{k}": 100.0 * float(h) / len(keep) for k, h in zip(ks, hits, strict=True)}
    return RetrievalResult(
        recalls=recalls,
        n_queries=len(keep),
        n_gallery=len(gallery),
        search_ms=ms,
        n_dropped=int(missing.sum()),
        backend=f"{device.type}-blocked-f64",
    )
