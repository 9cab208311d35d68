"""Paired training data from feature stores: rows of two modalities joined by group id, never by position."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3jepa.config import ConfigError, EncodeConfig, PipelineConfig
from m3jepa.core.device import CPU_DEVICE, kind_of, pin, to_device
from m3jepa.core.directions import direction_modalities, parse_direction, source_modalities
from m3jepa.core.errors import StoreDataError
from m3jepa.core.feeder import ReadAhead, RowReader
from m3jepa.core.order import batch_indices
from m3jepa.data import DEFAULT_ENCODERS, check_dataset_name
from m3jepa.data.records import encoder_modality
from m3jepa.data.vqa import JoinTable, read_join_table
from m3jepa.location import Location, StoreURL, location
from m3jepa.store import open_store, store_path
from m3jepa.store.manifest import load_manifest, store_variant

log = logging.getLogger(__name__)

FEEDS = ("auto", "memory", "store", "device")
# train.feed = "auto" reads a split into memory when its stores take less than this share of RAM. Loading
# briefly holds a float32 copy beside the stored one, so the peak is about 3x the float16 size.
AUTO_MEMORY_FRACTION = 0.25
# ... and on a GPU keeps it resident there (feed "device") when its stored bytes take less than this share
# of the GPU's free memory: the rest is for the model, the optimizer state and the activations (the paper
# preset at B = 4,096 needs about 6 GB), and a float32 batch is cast on the device.
AUTO_DEVICE_FRACTION = 0.5


def encoder_for(enc: EncodeConfig, modality: str) -> str:
    """The encoder whose store feeds `modality`: the configured one, else the dataset's default."""
    # a question/answer store takes encode.text_encoder when set, as in stage 1 (docs/vqa.md)
    name = getattr(enc, f"{modality}_encoder", None)
    name = name or getattr(enc, f"{encoder_modality(modality)}_encoder", None)
    if name:
        return name
    check_dataset_name(enc.dataset)  # a misspelt name is unknown, not a dataset without defaults
    defaults = DEFAULT_ENCODERS.get(enc.dataset, {})
    if modality not in defaults:
        raise StoreDataError(
            f"no default {modality} encoder for dataset {enc.dataset!r}; set encode.{modality}_encoder"
        )
    return defaults[modality]


@dataclass
class ModalityFeatures:
    """One modality of one split: its row ids, and its features in memory or read from the store."""

    modality: str
    store: Location  # a local folder or a StoreURL
    features: torch.Tensor | None  # (N, D) stored dtype (float16 by default; cast per batch); None: `reader`
    group_ids: np.ndarray  # (N,) object: the group each row belongs to
    valid: np.ndarray  # (N,) bool
    texts: list[str | None]
    encoder: str
    revision: str
    reader: RowReader | None = None  # train.feed = "store": rows (b,) -> (b, D) float32, read from the store
    # the LoRA mode: rows (b,) -> a PrefixBatch of prefix states, for a modality its tail re-encodes
    prefix: Callable[[np.ndarray], Any] | None = None

    @property
    def dim(self) -> int:
        return int(self.features.shape[1]) if self.features is not None else int(self.reader.dim)

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """(b, D) features of `rows` (b,) in the stored dtype, in the order given, from memory or store.

        Features resident on a device (feed "device") are indexed there: only the (b,) row ids move.
        """
        if self.prefix is not None:
            return self.prefix(rows)
        if self.features is not None:
            index = torch.from_numpy(rows).to(self.features.device, non_blocking=True)  # (b,)
            return self.features[index]
        return self.reader(rows)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


_WARNED_CACHE: set[str] = set()


def store_root(enc: EncodeConfig) -> Location:
    """encode.store_root as a location: a local folder, or a URL read through encode.store_cache when set."""
    root = location(enc.store_root, cache=enc.store_cache)
    if enc.store_cache is not None and not isinstance(root, StoreURL) and enc.store_root not in _WARNED_CACHE:
        _WARNED_CACHE.add(enc.store_root)
        log.warning("encode.store_cache=%r does nothing: encode.store_root %r is a local folder, read in "
                    "place; unset it, or use it with a store root at a URL", enc.store_cache, enc.store_root)
    return root


def modality_store(cfg: PipelineConfig, split: str, modality: str) -> Location:
    """The directory (or URL) of the store of (split, modality); a missing store is an error naming the
    fix."""
    enc = cfg.encode
    # encode.kind = "prefix": the prefix stores (their `features` column is the pooled latent, bit for bit)
    variant = store_variant(enc.kind, enc.tunable_layers)
    # the one path rule of stage 1: a folder dataset (jsonl, ...) is found by its root's hash
    encoder = encoder_for(enc, modality)
    path = store_path(store_root(enc), enc.dataset, split, modality, encoder, variant, enc.root)
    if not (path / "manifest.json").is_file():
        raise StoreDataError(
            f"no {modality} store for split {split!r} at {path}; run "
            f"`m3jepa encode --dataset {enc.dataset} --split {split} --modality {modality}` first"
        )
    return path


def load_modality(cfg: PipelineConfig, split: str, modality: str, feed: str = "memory") -> ModalityFeatures:
    """Open the complete store of (split, modality), check it, and load its features.

    feed "memory" reads every row now and checks them all; "store" keeps only the row metadata and reads
    (and checks) each batch's rows when the loop asks for them, so the features never sit in RAM.
    """
    path = modality_store(cfg, split, modality)
    store = open_store(path)
    if len(store) == 0:
        raise StoreDataError(f"store {path} is empty: split {split!r} has no {modality} rows")
    m = store.manifest
    features, reader = None, None
    if feed == "store":
        if isinstance(path, StoreURL) and path.cache is None:
            log.warning("train.feed=store from %s without encode.store_cache: every batch costs a ranged GET "
                        "per row (docs/benchmarks.md §3); set encode.store_cache to a local folder to read "
                        "the bucket once", path)
        reader = RowReader(store)
    else:
        features = _read_checked(store)
    return ModalityFeatures(
        modality=modality,
        store=path,
        features=features,
        group_ids=np.asarray(store.rows.group_ids, dtype=object),
        valid=np.asarray(store.rows.valid, dtype=bool),
        texts=list(store.rows.texts),
        encoder=m.encoder,
        revision=m.encoder_revision,
        reader=reader,
    )


def _read_checked(store) -> torch.Tensor:
    """Every row of `store` as an (N, D) tensor in the stored dtype; a NaN or inf row is an error.

    The shard files are checked first and each shard's sha256 on the bytes read (`read_checked`), so a
    missing chunk, a changed byte or a wrong shape is an error naming the store, never zeros or numpy's.
    """
    feats = store.read_checked()  # (N, D) stored dtype
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise StoreDataError(
            f"store {store.path} has {int(bad.sum())} rows with NaN or infinite features "
            f"(first: row {row}, sample {store.rows.sample_ids[row]}); re-encode it"
        )
    return torch.from_numpy(feats)


def resolve_feed(
    cfg: PipelineConfig,
    split: str,
    directions: list[str],
    feed: str,
    device: torch.device = CPU_DEVICE,
    free_device_bytes: int | None = None,
) -> str:
    """The feed ("memory", "store" or "device") that train.feed = `feed` means for `split` on `device`.

    "auto" on a GPU is device when the split's stored bytes take under AUTO_DEVICE_FRACTION of the GPU's
    free memory (`free_device_bytes`, measured when None); otherwise memory when the stores, one copy per
    process on this host, take under AUTO_MEMORY_FRACTION of RAM, else store. "device" on a CPU device is
    an error: there is no device memory apart from RAM (use "memory").
    """
    if feed not in FEEDS:
        raise ConfigError(f"train.feed={feed!r} is not one of {', '.join(FEEDS)}")
    kind = kind_of(device)
    if feed == "device" and not kind.accelerator:
        raise ConfigError(
            'train.feed="device" keeps the split in GPU memory, but runtime.device is the CPU; '
            'set train.feed = "memory" (or "auto"), or runtime.device = "cuda"'
        )
    if feed != "auto":
        return feed
    stored = 0
    for m in direction_modalities(directions):
        man = load_manifest(modality_store(cfg, split, m))
        stored += man.rows * man.dim * np.dtype(man.dtype).itemsize
    if kind.accelerator:  # the device table's memory probe
        free = kind.free_memory(device) if free_device_bytes is None else free_device_bytes
        if stored < AUTO_DEVICE_FRACTION * free:
            log.info("train.feed=auto: device (stores %.2f GB, %s free %.1f GB)", stored / 1e9, device,
                     free / 1e9)
            return "device"
    # every DDP process on this host loads its own copy
    need = stored * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    ram = ram_bytes()
    chosen = "memory" if need < AUTO_MEMORY_FRACTION * ram else "store"
    log.info("train.feed=auto: %s (stores %.2f GB x processes, RAM %.1f GB)", chosen, need / 1e9, ram / 1e9)
    return chosen


def ram_bytes() -> int:
    """Physical RAM, or the cgroup's memory limit when that is lower (a container's real budget)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return ram
    return min(ram, int(limit)) if limit.isdigit() else ram


def pair_rows(a: ModalityFeatures, b: ModalityFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Join two modalities by group id: (rows_a, rows_b), one pair per valid row of the many side.

    Image-caption data has one image and several captions per group, so each caption row is paired
    with its group's image row. A valid row whose group is absent from the other store is an error
    (the stores do not belong together); one whose partner was skipped at encode time is dropped.
    """
    many, one, swapped = (a, b, False) if _rows_per_group(a) >= _rows_per_group(b) else (b, a, True)
    index: dict[object, int] = {}
    skipped_groups: set[object] = set()
    for row, (g, ok) in enumerate(zip(one.group_ids, one.valid, strict=True)):
        if ok:
            index.setdefault(g, row)
        else:
            skipped_groups.add(g)
    rows_many, rows_one, orphans = [], [], []
    for row, (g, ok) in enumerate(zip(many.group_ids, many.valid, strict=True)):
        if not ok:
            continue
        if g in index:
            rows_many.append(row)
            rows_one.append(index[g])
        elif g not in skipped_groups:
            orphans.append(g)
    if orphans:
        raise StoreDataError(
            f"{len(orphans)} {many.modality} rows of {many.store} have no {one.modality} row in "
            f"{one.store} (e.g. group {orphans[0]!r}): the stores come from different datasets or splits; "
            "re-encode both with the same dataset, split and --limit"
        )
    if not rows_many:
        raise StoreDataError(f"{a.store} and {b.store} share no group: nothing to train or score")
    ra, rb = np.asarray(rows_many), np.asarray(rows_one)
    return (rb, ra) if swapped else (ra, rb)


def _rows_per_group(m: ModalityFeatures) -> float:
    return len(m.group_ids) / max(1, len(set(m.group_ids.tolist())))


def join_rows(
    mods: dict[str, ModalityFeatures],
    sources: tuple[str, ...],
    target: str,
    join: JoinTable,
    keep_unanswered: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Join through the anchor (question) store: (source rows (P, S), target rows (P,)), one per question.

    Column j of the source rows indexes store sources[j]. The join table maps each question id to the
    group id of its row in every other store. A question whose target link is None (its answer is
    outside the K candidates) has target row -1 when `keep_unanswered`, else it is left out; one whose
    partner row was skipped at encode time is left out; a link to a group absent from a store is an
    error (the stores and the table come from different encodes).
    """
    anchor = mods.get(join.anchor)
    if anchor is None:
        raise StoreDataError(f"a direction over this split's join table must include {join.anchor!r}")
    index = {m: _row_index(mods[m]) for m in (*sources, target) if m != join.anchor}
    rows_s, rows_t = [], []
    for row, (qid, ok) in enumerate(zip(anchor.group_ids, anchor.valid, strict=True)):
        links = join.links.get(qid)
        if links is None:
            raise StoreDataError(
                f"question {qid!r} of {anchor.store} is not in the split's join table: re-encode the split"
            )
        picked = [
            row if m == join.anchor else _linked(index, mods, m, links, qid) for m in (*sources, target)
        ]  # one row per source, then the target's
        if not ok or any(p is None for p in picked[:-1]) or (picked[-1] is None and not keep_unanswered):
            continue
        rows_s.append(picked[:-1])
        rows_t.append(-1 if picked[-1] is None else picked[-1])
    if not rows_s:
        raise StoreDataError(f"no question of {anchor.store} has all of {', '.join(sources)} and {target}")
    return np.asarray(rows_s, dtype=np.int64), np.asarray(rows_t, dtype=np.int64)


def _row_index(m: ModalityFeatures) -> tuple[dict[object, int], set[object]]:
    """(group id → its first valid row, groups whose rows were skipped at encode time)."""
    index: dict[object, int] = {}
    for row, (g, ok) in enumerate(zip(m.group_ids, m.valid, strict=True)):
        if ok:
            index.setdefault(g, row)
    return index, {g for g, ok in zip(m.group_ids, m.valid, strict=True) if not ok} - set(index)


def _linked(
    index: dict[str, tuple[dict[object, int], set[object]]],
    mods: dict[str, ModalityFeatures],
    modality: str,
    links: dict,
    qid: object,
) -> int | None:
    group = links.get(modality)
    if group is None:  # an answer outside the K candidates
        return None
    rows, skipped = index[modality]
    if group in rows:
        return rows[group]
    if group in skipped:
        return None
    raise StoreDataError(
        f"question {qid!r} links to {modality} {group!r}, which {mods[modality].store} does not hold: "
        "the stores come from different encodes; re-encode the split"
    )


@dataclass
class PairedSplit:
    """All modalities of one split, and for each direction the paired row indices.

    Source rows are (P,) for one source modality and (P, S) for a concatenated input of S modalities.
    """

    split: str
    modalities: dict[str, ModalityFeatures]
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # direction → (source rows, target rows)
    join: JoinTable | None = None  # VQA datasets: question → image and answer links (docs/vqa.md)
    feed: str = "memory"  # "store": read per batch (ModalityFeatures.reader); "device": resident on `device`
    readahead: ReadAhead | None = None  # store feeding: batches a thread prepared (set by the loop)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where batches are returned

    def rows(self, modality: str, rows: np.ndarray) -> torch.Tensor:
        """(b, D) float32 features of `rows` (b,) of an in-memory modality, on this split's device."""
        feats = self.modalities[modality].features  # (N, D) stored dtype, in RAM or on the device
        index = torch.from_numpy(rows).to(feats.device)  # (b,)
        return to_device(feats[index], self.device).float()

    def num_pairs(self, direction: str) -> int:
        return len(self.pairs[direction][0])

    def dims(self) -> dict[str, int]:
        return {m: f.dim for m, f in self.modalities.items()}

    def batch(
        self, direction: str, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1
    ) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
        """This rank's slice of global batch `step` of `direction`, float32: x (b, D_s), y (b, D_t).

        The read-ahead's copy when it has one, else read now. Either way the float32 cast happens here,
        on the loop's thread, as one torch cast of the stored values: the same float32 values from
        memory and from the store (float16 -> float32 is exact).
        """
        got = None
        if self.readahead is not None:
            got = self.readahead.take(direction, batch_size, seed, step, rank, world)
        x, y = got if got is not None else self.stored_batch(direction, batch_size, seed, step, rank, world)
        # Moved in the stored dtype (half the bytes of float32), then cast where the model is.
        x, y = to_device(x, self.device), to_device(y, self.device)
        x = {m: v.float() for m, v in x.items()} if isinstance(x, dict) else x.float()
        return x, y.float()

    def stored_batch(
        self, direction: str, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1
    ) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
        """(x (b, D_s), y (b, D_t)) in the stored dtype, b = batch_size / world; a concatenated input
        ('image+question->answer') gives x as {modality: (b, D_m)}. Each rank reads only its slice."""
        rows_s, rows_t = self.pairs[direction]
        idx = batch_indices(len(rows_s), batch_size, seed, step)
        idx = np.array_split(idx, world)[rank]
        src, tgt = parse_direction(direction)
        if isinstance(src, str):
            x = self.modalities[src].take(rows_s[idx])
        else:  # rows_s is (P, S): column j holds the rows of store src[j]
            x = {m: self.modalities[m].take(rows_s[idx, j]) for j, m in enumerate(src)}  # m -> (b, D_m)
        y = self.modalities[tgt].take(rows_t[idx])
        if kind_of(self.device).pins:  # pinned here, on the read-ahead thread, so the copy can overlap
            x, y = pin(x), pin(y)
        return x, y

    def close(self) -> None:
        """Stop the read-ahead thread and close the stores' open files."""
        if self.readahead is not None:
            self.readahead.close()
            self.readahead = None
        for m in self.modalities.values():
            m.close()


def load_split(
    cfg: PipelineConfig,
    split: str,
    directions: list[str],
    feed: str = "memory",
    device: torch.device = CPU_DEVICE,
) -> PairedSplit:
    """Load every modality the directions need for `split`, and pair them per direction.

    `feed` is train.feed: "memory" loads the features into RAM, "store" only the row metadata the pairing
    needs (features are then read per batch), "device" loads them into `device`'s memory, "auto" picks one
    by size (`resolve_feed`). Batches come back on `device` whatever the feed.
    """
    feed = resolve_feed(cfg, split, directions, feed, device)
    mods = {m: load_modality(cfg, split, m, feed) for m in direction_modalities(directions)}
    if feed == "device":
        for f in mods.values():  # (N, D) stored dtype, resident on the GPU; batches are indexed there
            f.features = f.features.to(device)
    join = read_join_table(store_root(cfg.encode), cfg.encode.dataset, split)
    if join is not None and join.anchor in mods:
        _check_join(join, mods[join.anchor])
    pairs = {}
    for d in directions:
        src, tgt = parse_direction(d)
        if join is not None and join.anchor in (*source_modalities(src), tgt):
            rows_s, rows_t = join_rows(mods, source_modalities(src), tgt, join)
            pairs[d] = (rows_s[:, 0] if isinstance(src, str) else rows_s, rows_t)
        elif isinstance(src, str):
            pairs[d] = pair_rows(mods[src], mods[tgt])
        else:
            raise StoreDataError(
                f"direction {d!r} concatenates inputs, which are joined through a dataset's join table "
                f"(VQA datasets write one at encode time), but split {split!r} has none"
            )
    log.info(
        "split %s (feed %s): %s; pairs %s",
        split,
        feed,
        ", ".join(f"{m} {len(f.group_ids)} rows x {f.dim}" for m, f in mods.items()),
        ", ".join(f"{d} {len(p[0])}" for d, p in pairs.items()),
    )
    return PairedSplit(split=split, modalities=mods, pairs=pairs, join=join, feed=feed, device=device)


def _check_join(join: JoinTable, anchor: ModalityFeatures) -> None:
    if load_manifest(anchor.store).membership != join.membership:
        raise StoreDataError(
            f"the join table beside {anchor.store} was written for other {join.anchor} rows "
            "(another --limit or dataset version); re-run `m3jepa encode` for this split"
        )


def split_is_empty(cfg: PipelineConfig, split: str, directions: list[str]) -> bool:
    """True when every store of `split` the directions need exists and holds no rows: the dataset has no
    such split (its stores were encoded, empty). A store that is missing is not this case (encode it)."""
    for m in direction_modalities(directions):
        try:
            path = modality_store(cfg, split, m)
        except StoreDataError:
            return False
        if load_manifest(path).rows:
            return False
    return True


def carve_validation(
    train: PairedSplit, share: float, seed: int, name: str = "val"
) -> tuple[PairedSplit, PairedSplit, dict[str, Any]]:
    """Split `train` into (train', val) by whole groups: `share` of the train groups, drawn with `seed`.

    A pair's group is the group of its (first) source row (an image and all its captions; for VQA, the
    image of the question), so no group has pairs on both sides. Both splits keep the same modality
    features (the rows are not copied); only their pairs differ. Returns them and a summary for the log.
    """
    if train.join is not None:
        raise StoreDataError(
            f"split {name!r} has no rows and {train.split!r} joins its rows through a VQA join table, which "
            "cannot be carved; encode a validation split"
        )
    groups_of = {}
    for d, (rows_s, _) in train.pairs.items():
        src = source_modalities(parse_direction(d)[0])[0]
        first = rows_s if rows_s.ndim == 1 else rows_s[:, 0]
        groups_of[d] = train.modalities[src].group_ids[first]  # (P,) the group of each pair
    every = sorted({str(g) for gs in groups_of.values() for g in gs})
    n_val = int(np.ceil(share * len(every)))
    if not 0 < n_val < len(every):
        raise StoreDataError(
            f"split {name!r} has no rows, and {share:.0%} of the {len(every)} groups of {train.split!r} "
            "leaves no validation or no training group; set train.carve_val or encode a validation split"
        )
    rng = np.random.default_rng([seed, 0x56414C])  # "VAL": the carve's own stream
    held = set(np.asarray(every, dtype=object)[rng.permutation(len(every))[:n_val]])
    keep_pairs, val_pairs = {}, {}
    for d, (rows_s, rows_t) in train.pairs.items():
        in_val = np.fromiter((str(g) in held for g in groups_of[d]), dtype=bool, count=len(rows_t))
        val_pairs[d] = (rows_s[in_val], rows_t[in_val])
        keep_pairs[d] = (rows_s[~in_val], rows_t[~in_val])
    kept = PairedSplit(split=train.split, modalities=train.modalities, pairs=keep_pairs, join=None,
                       feed=train.feed, device=train.device)
    val = PairedSplit(split=name, modalities=train.modalities, pairs=val_pairs, join=None, feed=train.feed,
                      device=train.device)
    summary = {
        "from": train.split,
        "share": share,
        "seed": seed,
        "groups": n_val,
        "of_groups": len(every),
        "pairs": {d: len(p[0]) for d, p in val_pairs.items()},
    }
    return kept, val, summary
