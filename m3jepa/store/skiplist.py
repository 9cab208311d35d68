"""Per-shard skip lists: the rows of a shard skipped by --skip-bad, read back when a store finalizes."""

from __future__ import annotations

import json
from typing import Any

from m3jepa.location import Location, location, write_text
from m3jepa.store.manifest import SHARDS, shard_stem


def skip_list_path(store: str | Location, index: int) -> Location:
    """`shards/<index>.skipped.json`: the rows of shard `index` that were skipped (only when any were)."""
    return location(store) / SHARDS / f"{shard_stem(index)}.skipped.json"


def write_skip_list(store: Location, index: int, skipped: list[dict[str, Any]]) -> None:
    """Record (or clear) shard `index`'s skipped rows; written before the shard commits, read back by rank 0
    when it finalizes, so a committed shard always has its list."""
    path = skip_list_path(store, index)
    if skipped:
        write_text(path, json.dumps(skipped, indent=2, sort_keys=True) + "\n")
    else:
        path.unlink(missing_ok=True)  # a list from an earlier attempt at this shard must not linger


def read_skip_lists(store: Location, num_shards: int) -> list[dict[str, Any]]:
    """Every shard's skipped rows, in row order: what each rank (in this run or an earlier one) skipped."""
    out: list[dict[str, Any]] = []
    for index in range(num_shards):
        path = skip_list_path(store, index)
        if path.is_file():
            out += json.loads(path.read_text(encoding="utf-8"))
    return sorted(out, key=lambda s: s["row_id"])
