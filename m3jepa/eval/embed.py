"""Query and gallery embeddings of one direction in the predicted-latent space or the CL space."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from m3jepa.core.directions import parse_direction
from m3jepa.core.paired import PairedSplit

SPACES = ("pred", "cl")


@dataclass
class DirectionEmbeddings:
    """L2-normalised queries and gallery of one direction, with the group of every row."""

    direction: str
    space: str
    queries: np.ndarray  # (Q, d) float32
    gallery: np.ndarray  # (G, d) float32
    query_groups: np.ndarray  # (Q,)
    gallery_groups: np.ndarray  # (G,)
    query_rows: np.ndarray  # (Q,) row ids in the source store; (Q, S) for a concatenated input
    gallery_rows: np.ndarray  # (G,) row ids in the target store


def first_per_group(rows: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Keep the first row (in row order) of each group: the 1:1 paired protocol."""
    rows = np.sort(rows)
    _, first = np.unique(groups[rows], return_index=True)
    return np.sort(rows[first])


def retrieval_rows(data: PairedSplit, direction: str, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, gallery rows): every source and target row that has a partner in this split."""
    src, tgt = parse_direction(direction)
    rows_s, rows_t = data.pairs[direction]
    if rows_s.ndim == 2:  # a concatenated input: every (image, question) pair is one query
        return rows_s, np.unique(rows_t)
    q, g = np.unique(rows_s), np.unique(rows_t)
    if protocol == "paired":
        q = first_per_group(q, data.modalities[src].group_ids)
        g = first_per_group(g, data.modalities[tgt].group_ids)
    return q, g


@torch.no_grad()
def embed_direction(
    predictor: nn.Module,
    data: PairedSplit,
    direction: str,
    space: str,
    protocol: str = "multi",
    batch_size: int = 2048,
) -> DirectionEmbeddings:
    """Run the predictor over a split's rows for one direction and one space."""
    if space not in SPACES:
        raise ValueError(f"space {space!r} is not one of {SPACES}")
    src, tgt = parse_direction(direction)
    q_rows, g_rows = retrieval_rows(data, direction, protocol)
    ys = data.modalities[tgt].features
    queries, gallery = [], []
    for i in range(0, len(q_rows), batch_size):
        out = predictor(src, source_batch(data, src, q_rows[i : i + batch_size]), tgt)
        if space == "pred" and out.pred is None:
            raise ValueError("this predictor has no prediction head; score it in the 'cl' space")
        queries.append(out.pred if space == "pred" else out.cl_query)
    for i in range(0, len(g_rows), batch_size):
        y = ys[torch.from_numpy(g_rows[i : i + batch_size])].float()  # (b, D_tgt)
        gallery.append(y if space == "pred" else predictor.encode_target(tgt, y))
    return DirectionEmbeddings(
        direction=direction,
        space=space,
        queries=_normalise(torch.cat(queries)),
        gallery=_normalise(torch.cat(gallery)),
        query_groups=query_groups(data, direction, q_rows),
        gallery_groups=data.modalities[tgt].group_ids[g_rows],
        query_rows=q_rows,
        gallery_rows=g_rows,
    )


def source_batch(data: PairedSplit, src: str | tuple[str, ...], rows: np.ndarray):
    """Source latents of `rows`: (b, D_src), or {modality: (b, D_m)} when rows is (b, S)."""
    if isinstance(src, str):
        return data.modalities[src].features[torch.from_numpy(rows)].float()  # (b, D_src)
    return {m: data.modalities[m].features[torch.from_numpy(rows[:, j])].float() for j, m in enumerate(src)}


def query_groups(data: PairedSplit, direction: str, q_rows: np.ndarray) -> np.ndarray:
    """The group each query must retrieve: its source group, or for a concatenated input (one pair per
    question) the group of its paired target row (the question's answer)."""
    src, tgt = parse_direction(direction)
    if isinstance(src, str):
        return data.modalities[src].group_ids[q_rows]
    rows_s, rows_t = data.pairs[direction]
    if q_rows is not rows_s:
        raise ValueError("a concatenated input's queries are its pairs, in pair order")
    return data.modalities[tgt].group_ids[rows_t]


def _normalise(t: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(t.float(), dim=-1).numpy().astype(np.float32, copy=False)
