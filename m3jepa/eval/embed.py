"""Query and gallery embeddings of one direction in the predicted-latent space or the CL space."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from m3jepa.core.device import CPU, Runtime
from m3jepa.core.directions import parse_direction
from m3jepa.core.objective import to_pred_space
from m3jepa.core.paired import PairedSplit

SPACES = ("pred", "cl")


@dataclass
class DirectionEmbeddings:
    """L2-normalised queries and gallery of one direction, with the group of every row.

    The latents stay where they were computed (`queries_t`, `gallery_t` on the run's device, for the
    device search); `queries`/`gallery` are their host copies (the same memory on a CPU).
    """

    direction: str
    space: str
    queries_t: torch.Tensor  # (Q, d) float32, on the predictor's device
    gallery_t: torch.Tensor  # (G, d) float32, on the predictor's device
    query_groups: np.ndarray  # (Q,)
    gallery_groups: np.ndarray  # (G,)
    query_rows: np.ndarray  # (Q,) row ids in the source store; (Q, S) for a concatenated input
    gallery_rows: np.ndarray  # (G,) row ids in the target store

    def __post_init__(self) -> None:
        self.queries = self.queries_t.cpu().numpy()  # (Q, d) float32
        self.gallery = self.gallery_t.cpu().numpy()  # (G, d) float32


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
    runtime: Runtime = CPU,
) -> DirectionEmbeddings:
    """Run the predictor over a split's rows for one direction and one space, on the predictor's device
    (`runtime.device`) and in its precision."""
    if space not in SPACES:
        raise ValueError(f"space {space!r} is not one of {SPACES}")
    src, tgt = parse_direction(direction)
    q_rows, g_rows = retrieval_rows(data, direction, protocol)
    queries, gallery = [], []
    for i in range(0, len(q_rows), batch_size):
        x = source_batch(data, src, q_rows[i : i + batch_size])  # on data.device, the predictor's
        with runtime.autocast():
            out = predictor(src, x, tgt)
        if space == "pred" and out.pred is None:
            raise ValueError("this predictor has no prediction head; score it in the 'cl' space")
        queries.append(out.pred if space == "pred" else out.cl_query)
    for i in range(0, len(g_rows), batch_size):
        y = data.rows(tgt, g_rows[i : i + batch_size])  # (b, D_tgt)
        if space == "pred":  # targets in the space `pred` lives in (standardised, if the run trained so)
            gallery.append(to_pred_space(predictor, tgt, y))
            continue
        with runtime.autocast():
            gallery.append(predictor.encode_target(tgt, y))
    return DirectionEmbeddings(
        direction=direction,
        space=space,
        queries_t=_normalise(torch.cat(queries)),
        gallery_t=_normalise(torch.cat(gallery)),
        query_groups=query_groups(data, direction, q_rows),
        gallery_groups=data.modalities[tgt].group_ids[g_rows],
        query_rows=q_rows,
        gallery_rows=g_rows,
    )


def source_batch(data: PairedSplit, src: str | tuple[str, ...], rows: np.ndarray):
    """Source latents of `rows`: (b, D_src), or {modality: (b, D_m)} when rows is (b, S)."""
    if isinstance(src, str):
        return data.rows(src, rows)  # (b, D_src)
    return {m: data.rows(m, rows[:, j]) for j, m in enumerate(src)}  # m -> (b, D_m)


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


def _normalise(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t.float(), dim=-1)  # (N, d) float32, where t is
