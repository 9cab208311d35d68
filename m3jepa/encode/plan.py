"""Pure stage-1 planning: batches within a shard, and which rank writes each shard.

Shard row ranges are the store's (`m3jepa.store.plan_shards`). Row order is restored by writing each
result at its own position, so no inverse permutation is kept.
"""

from __future__ import annotations

from bisect import bisect_right
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


def shard_owners(
    shards: Sequence[tuple[int, int, int]], parts: Sequence[tuple[int, int]] | None, world_size: int
) -> list[int] | None:
    """The rank that writes each store shard (index, lo, hi), or None for the store's round-robin.

    With `parts` (the row ranges of the dataset's tar shards, in order, covering the rows) part p goes to
    rank p % world_size, as WebDataset's split_by_node deals shards, and a store shard to the rank of the
    part holding its first row: each rank reads whole parts, plus at most the head of the part after each
    of its own when a store shard runs across the boundary. Which rank writes a shard changes nothing in
    its bytes, so the store equals a one-process store whatever the world size.
    """
    if parts is None or world_size == 1:
        return None
    starts = [lo for lo, _ in parts]
    if not starts or starts[0] != 0 or any(a[1] != b[0] for a, b in zip(parts, parts[1:], strict=False)):
        raise ValueError(f"parts {list(parts)[:4]}... must be consecutive row ranges from row 0")
    end = parts[-1][1]
    owners = []
    for _, lo, _ in shards:
        if not 0 <= lo < end:
            raise ValueError(f"store shard starting at row {lo} lies outside the parts' rows 0..{end - 1}")
        owners.append((bisect_right(starts, lo) - 1) % world_size)  # the last part starting at or before lo
    return owners
