"""Property tests of stage-1 planning: shards tile the rows, ranks partition shards, batches permute rows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3jepa.encode.plan import batch_order, shard_owners
from m3jepa.store import plan_shards
from m3jepa.store.manifest import assign_shards

sizes = st.integers(min_value=0, max_value=5000)
positive = st.integers(min_value=1, max_value=700)


@settings(max_examples=1000, deadline=None)
@given(rows=sizes, shard_size=positive)
def test_shards_tile_rows_in_order(rows, shard_size):
    # The runner takes its shard plan from the store; it must tile the rows in order.
    shards = plan_shards(rows, shard_size)
    assert [index for index, _, _ in shards] == list(range(len(shards)))
    flat = [i for _, lo, hi in shards for i in range(lo, hi)]
    assert flat == list(range(rows))
    assert all(hi - lo == shard_size for _, lo, hi in shards[:-1])
    assert all(0 < hi - lo <= shard_size for _, lo, hi in shards)
    assert len(shards) == -(-rows // shard_size)


@settings(max_examples=1000, deadline=None)
@given(num_shards=st.integers(0, 300), world_size=st.integers(1, 17))
def test_ranks_partition_shards(num_shards, world_size):
    plan = plan_shards(num_shards * 3, 3)
    per_rank = [assign_shards(plan, r, world_size) for r in range(world_size)]
    flat = sorted(s for shards in per_rank for s in shards)
    assert flat == plan  # every shard written by exactly one rank
    counts = [len(s) for s in per_rank]
    assert max(counts) - min(counts) <= 1  # balanced
    assert assign_shards(plan, 0, 1) == plan


@settings(max_examples=1000, deadline=None)
@given(lengths=st.lists(st.integers(0, 80), max_size=300), batch_size=st.integers(1, 70))
def test_length_sorted_batches_are_a_permutation(lengths, batch_size):
    batches = batch_order(lengths, len(lengths), batch_size)
    order = [i for b in batches for i in b]
    assert sorted(order) == list(range(len(lengths)))
    assert all(len(b) == batch_size for b in batches[:-1])
    # Naive reference: longest first, position breaks ties.
    assert order == sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


@settings(max_examples=300, deadline=None)
@given(count=st.integers(0, 400), batch_size=st.integers(1, 70))
def test_unsorted_batches_are_consecutive(count, batch_size):
    batches = batch_order(None, count, batch_size)
    assert [i for b in batches for i in b] == list(range(count))
    assert all(b == list(range(b[0], b[0] + len(b))) for b in batches)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        batch_order([1, 2], 3, 4)
    with pytest.raises(ValueError):
        batch_order(None, 3, 0)


# ---------------------------------------------------------------- which rank writes which store shard


@settings(max_examples=300, deadline=None)
@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=12), shard_size=st.integers(1, 12),
       world=st.integers(1, 4))
def test_shard_owners_deal_whole_parts(counts, shard_size, world):
    starts = [sum(counts[:i]) for i in range(len(counts))]
    parts = [(s, s + n) for s, n in zip(starts, counts, strict=True)]
    rows = sum(counts)
    plan = plan_shards(rows, shard_size)
    owners = shard_owners(plan, parts, world)
    if world == 1:
        assert owners is None
        return
    assert owners is not None and len(owners) == len(plan)
    for (_, lo, _), owner in zip(plan, owners, strict=True):
        holder = max(p for p, (a, b) in enumerate(parts) if a <= lo < b)  # the part of the first row
        assert owner == holder % world
    # a rank reads the parts its shards touch: its own, and a part it does not own only for a shard that
    # starts in one of its own parts and runs on into the next ones
    for (_, lo, hi), owner in zip(plan, owners, strict=True):
        touched = [p for p, (a, b) in enumerate(parts) if a < hi and lo < b]
        assert touched[0] % world == owner
    assert shard_owners(plan, None, world) is None
