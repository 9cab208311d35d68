"""Seeded, group-preserving splits and the item table that numbers a dataset's records."""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from m3jepa.data.records import MODALITIES, DatasetError, Record

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FRACTIONS = (0.8, 0.1, 0.1)
SKIP_HINT = "pass --skip-bad (skip_bad=True) to drop such items; they are listed in dataset.skipped"


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders digit runs numerically ("9" < "10"), so numeric ids sort as numbers."""
    if text.isdigit():  # the common case (COCO ids) without a regex
        return ((0, int(text)),)
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


def _rank(seed: int, key: str) -> str:
    # A hash of (seed, key) orders clusters independently of input order and of Python's hash seed.
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def assign_clusters(
    sizes: Mapping[str, int],
    seed: int,
    fractions: Sequence[float] = FRACTIONS,
    names: Sequence[str] = SPLITS,
) -> dict[str, str]:
    """Assign each cluster (key → number of groups in it) to one split, deterministically from `seed`.

    Clusters are ordered by sha256(seed, key) and laid end to end on [0, 1) with widths
    proportional to their sizes; a cluster goes to the split whose interval holds its midpoint,
    so split sizes approach `fractions` (counted in groups) as clusters become many and small.
    """
    if len(fractions) != len(names) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions {list(fractions)} must be non-negative, one per split of {list(names)}")
    total = sum(sizes.values())
    bounds, acc = [], 0.0
    for f in fractions:
        acc += f / sum(fractions)
        bounds.append(acc)
    out: dict[str, str] = {}
    cumulative = 0
    for key in sorted(sizes, key=lambda k: (_rank(seed, k), k)):
        middle = (cumulative + sizes[key] / 2) / total
        cumulative += sizes[key]
        out[key] = next((n for n, b in zip(names, bounds, strict=True) if middle < b), names[-1])
    return out


def split_groups(
    cluster_of: Mapping[str, str],
    seed: int,
    fractions: Sequence[float] = FRACTIONS,
    names: Sequence[str] = SPLITS,
) -> dict[str, str]:
    """Map each group to a split so that groups sharing a cluster key always share a split."""
    sizes = Counter(cluster_of.values())
    cluster_split = assign_clusters(sizes, seed, fractions, names)
    return {group: cluster_split[cluster] for group, cluster in cluster_of.items()}


def caption_cluster(caption: str) -> str:
    """The key that makes identical captions one cluster (case and spacing do not count)."""
    return " ".join(caption.casefold().split())


@dataclass(frozen=True)
class Item:
    """One row before numbering: its split, group, id, modality and payload."""

    split: str
    group_id: str
    sample_id: str
    modality: str
    payload: str


class ItemCollector:
    """Gathers a dataset's items, refusing or skipping bad ones (the skip_bad policy lives here)."""

    def __init__(self, name: str, skip_bad: bool):
        self.name = name
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = []
        self._items: list[Item] = []
        self._dropped_groups: set[str] = set()

    def add(self, item: Item) -> None:
        """Keep one item."""
        self._items.append(item)

    def reject(self, sample_id: str, reason: str, group_id: str | None = None) -> None:
        """A bad item: a DatasetError, or (skip_bad) recorded and dropped with its whole group if given."""
        if not self.skip_bad:
            raise DatasetError(f"{self.name}: {sample_id}: {reason}; {SKIP_HINT}")
        self.skipped.append((sample_id, reason))
        if group_id is not None:
            self._dropped_groups.add(group_id)

    def items(self) -> list[Item]:
        """The kept items; a group left without any caption or without any media is dropped whole."""
        kept = [it for it in self._items if it.group_id not in self._dropped_groups]
        kinds: dict[str, set[str]] = defaultdict(set)
        for it in kept:
            kinds[it.group_id].add("text" if it.modality == "text" else "media")
        missing = {"text": "no usable caption", "media": "no usable image or audio"}
        for group in sorted(kinds, key=natural_key):
            for kind, reason in missing.items():
                if kind not in kinds[group] and group not in self._dropped_groups:
                    self.reject(group, f"group has {reason}", group_id=group)
        return [it for it in kept if it.group_id not in self._dropped_groups]


class ItemDataset:
    """A dataset held as items: records() filters, limits, sorts and numbers them."""

    def __init__(
        self,
        name: str,
        items: Iterable[Item],
        *,
        split_names: Sequence[str] = SPLITS,
        limit: int | None = None,
        skipped: list[tuple[str, str]] | None = None,
    ):
        if limit is not None and limit <= 0:
            raise DatasetError(f"{name}: limit={limit} must be a positive number of groups")
        self.name = name
        self.limit = limit
        self.skipped = skipped if skipped is not None else []
        self._split_names = list(split_names)
        self._table: dict[tuple[str, str], list[Item]] = defaultdict(list)
        self._cache: dict[tuple[str, str], list[Record]] = {}
        self._groups: dict[str, set[str]] = defaultdict(set)
        for it in items:
            if it.split not in self._split_names:
                raise DatasetError(f"{name}: {it.sample_id}: split {it.split!r} not in {self._split_names}")
            self._table[(it.split, it.modality)].append(it)
            self._groups[it.split].add(it.group_id)
        self._check_unique()

    def _check_unique(self) -> None:
        for (split, modality), items in self._table.items():
            counts = Counter(it.sample_id for it in items)
            dupes = sorted((s for s, c in counts.items() if c > 1), key=natural_key)
            if dupes:
                raise DatasetError(
                    f"{self.name}: sample id {dupes[0]!r} occurs {counts[dupes[0]]} times in "
                    f"{split}/{modality} ({len(dupes)} duplicated ids); ids must be unique"
                )

    def splits(self) -> list[str]:
        """The split names, in train/val/test order."""
        return list(self._split_names)

    def modalities(self) -> list[str]:
        """The modalities present, in the order of records.MODALITIES."""
        present = {modality for _, modality in self._table}
        return [m for m in MODALITIES if m in present]

    def groups(self, split: str) -> list[str]:
        """The group ids of a split after `limit`, sorted by natural key."""
        self._check_split(split)
        ordered = sorted(self._groups.get(split, ()), key=natural_key)
        return ordered if self.limit is None else ordered[: self.limit]

    def records(self, split: str, modality: str) -> list[Record]:
        """The records of one split and modality, sorted by (group, sample id); row_id = position."""
        self._check_split(split)
        if modality not in self.modalities():
            raise DatasetError(
                f"{self.name} has no {modality!r} records; it has {', '.join(self.modalities())}"
            )
        if (split, modality) not in self._cache:  # sorting COCO's 600k captions takes seconds: do it once
            rank = {g: i for i, g in enumerate(self.groups(split))}
            items = [it for it in self._table.get((split, modality), ()) if it.group_id in rank]
            items.sort(key=lambda it: (rank[it.group_id], natural_key(it.sample_id)))
            self._cache[(split, modality)] = [
                Record(i, it.sample_id, it.group_id, it.modality, it.payload) for i, it in enumerate(items)
            ]
        return list(self._cache[(split, modality)])

    def _check_split(self, split: str) -> None:
        if split not in self._split_names:
            raise DatasetError(f"{self.name} has no split {split!r}; it has {', '.join(self._split_names)}")

    def counts(self) -> dict[str, dict[str, int]]:
        """Records per split and modality (after `limit`), for logs and docs."""
        return {s: {m: len(self.records(s, m)) for m in self.modalities()} for s in self._split_names}
