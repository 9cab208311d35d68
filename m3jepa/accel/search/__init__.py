"""Exact retrieval scored in bf16: the same answers as the float32 search, several times faster.

- `topk`: top-k lists, bf16 candidates re-ranked in float32 and certified by an error bound.
- `ranks`: recall@k from exact ranks of the correct items, both directions from one product.
- `scan`, `int8`: the block loop of that product, int8 (AMX) where its wider bound decides, else bf16.
- `count`, `rows`, `native`: the passes of the rank path, each a small C kernel with a torch fallback.
- `bf16`: unit roundoffs and monotone int16 keys of bf16 values.
"""

from m3jepa.accel.search.ranks import NO_RANK, CrossRanks, exact_ranks, recalls_from_ranks
from m3jepa.accel.search.topk import coco_topk, top_m, topk_bf16_exact

__all__ = [
    "NO_RANK",
    "CrossRanks",
    "coco_topk",
    "exact_ranks",
    "recalls_from_ranks",
    "top_m",
    "topk_bf16_exact",
]
