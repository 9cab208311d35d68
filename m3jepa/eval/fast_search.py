"""Former home of the bf16 exact search, now the `m3jepa.eval.search` subpackage; kept for old imports."""

from m3jepa.eval.search import (
    NO_RANK,
    CrossRanks,
    coco_topk,
    exact_ranks,
    recalls_from_ranks,
    top_m,
    topk_bf16_exact,
)

__all__ = [
    "NO_RANK",
    "CrossRanks",
    "coco_topk",
    "exact_ranks",
    "recalls_from_ranks",
    "top_m",
    "topk_bf16_exact",
]
