"""Pure batch planning within a shard: consecutive or length-sorted batches of shard positions.

Shard row ranges and rank assignment are the store's (`m3jepa.store.plan_shards`, `assign_shards`).
Row order is restored by writing each result at its own position, so no inverse permutation is kept.
"""

from __future__ import annotations

from collections.abc import Sequence


def batch_order(lengths: Sequence[int] | None, count: int, batch_size: int) -> list[list[int]]:
    """Batches of positions 0..count-1 within one shard.

    With `lengths` (text), positions are sorted by length, longest first (ties by position), so a
    batch pads to similar lengths; without (images), batches are consecutive. The result depends only
    on the shard's own rows, so a resumed run forms exactly the batches an uninterrupted one did.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if lengths is not None and len(lengths) != count:
        raise ValueError(f"{len(lengths)} lengths for {count} rows")
    order = list(range(count))
    if lengths is not None:
        order.sort(key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]

