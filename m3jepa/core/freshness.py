"""Stages 2 and 3 on an edited dataset: are the stores a run reads still the dataset's captions and media?

`m3jepa encode` (and so `m3jepa run`) refuses a stale store; `train-predictor` and `evaluate` read stores
only, so they check here: each store's recorded content fingerprint (one per row: store/staleness.py)
against the dataset's current rows, where the dataset can be read on this machine. A stale store is
refused with the command that re-encodes it; a dataset that cannot be read (the stores were copied
without it) is one warning that names `m3jepa encode`; a store written without fingerprints, or from
other rows than this config's seed and limit give, cannot be judged and is passed with an info line.

The cost is the dataset's listing plus one fingerprint per row: a `stat` per media file and a sha256 per
caption (docs/benchmarks.md measures it on Tux Paint).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from m3jepa.config import PipelineConfig
from m3jepa.core.errors import StoreDataError
from m3jepa.core.paired import modality_store
from m3jepa.data.records import content_digest, encoder_modality, membership_fingerprint, row_fingerprint
from m3jepa.store.manifest import Manifest, load_manifest, rows_from_records
from m3jepa.store.staleness import stale_reason

log = logging.getLogger(__name__)


def check_fresh(cfg: PipelineConfig, splits: list[str], modalities: list[str], command: str) -> None:
    """Refuse (StoreDataError) a store of `splits` x `modalities` whose rows' captions or media changed in
    the dataset since it was encoded; warn once when the dataset cannot be read here. `command` names the
    stage in messages ("train-predictor", "evaluate")."""
    datasets: dict[tuple[Any, ...], Any] = {}
    unreachable: list[str] = []
    for split in dict.fromkeys(splits):
        for modality in modalities:
            try:
                path = modality_store(cfg, split, modality)
            except StoreDataError:
                continue  # no such store: the stage's own loading says so
            m = load_manifest(path)
            if m.content is None and m.encoder_revision.startswith("import:"):
                log.info("%s was imported (m3jepa stores import): rerunning that import checks its source "
                         "files", path)
                continue
            if m.content is None:
                log.info("%s records no content fingerprints: edited captions or media are not seen", path)
                continue
            records = _records(cfg, m, datasets, unreachable)
            if records is None:
                continue
            if membership_fingerprint(records) != m.membership:
                log.info("%s: the dataset with encode.seed=%s, encode.limit=%s holds other rows than the "
                         "store (encoded with other ones?): its captions and media are not checked", path,
                         cfg.encode.seed, cfg.encode.limit)
                continue
            method = m.content_hash or "stat"
            fingerprints = [row_fingerprint(r, method) for r in records]
            reason = stale_reason(path, m, content_digest(fingerprints), functools.partial(
                rows_from_records, records, content=fingerprints), method)  # the rows: only when stale
            if reason:
                raise StoreDataError(f"{command}: {reason}; re-encode it (`{_encode_command(cfg, m)}`), then "
                                     "train on the new stores")
    if unreachable:
        log.warning("%s: %s; the stores' captions and media are not checked against the dataset: if it "
                    "was edited, re-encode with `m3jepa encode --force` where the dataset is", command,
                    unreachable[0])


def _records(cfg: PipelineConfig, m: Manifest, datasets: dict[tuple[Any, ...], Any],
             unreachable: list[str]) -> list[Any] | None:
    """The dataset's current records of the store's split and modality (None when it cannot be read)."""
    from m3jepa.data import get_dataset

    root = cfg.encode.root or m.data_root
    key = (m.dataset, root, cfg.encode.seed, cfg.encode.limit)
    try:
        if key not in datasets:  # one listing of the dataset for all its stores
            datasets[key] = get_dataset(m.dataset, root, seed=cfg.encode.seed, limit=cfg.encode.limit,
                                        skip_bad=True)
        return datasets[key].records(m.split, m.modality)
    except (ValueError, OSError, KeyError) as e:  # DatasetError is a ValueError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        unreachable.append(f"dataset {m.dataset!r} cannot be read here ({first})")
        return None


def _encode_command(cfg: PipelineConfig, m: Manifest) -> str:
    root = cfg.encode.root or m.data_root
    parts = ["m3jepa encode", f"--dataset {m.dataset}"]
    if root:
        parts.append(f"--root {root}")
    parts += [f"--split {m.split}", f"--modality {m.modality}", f"--store-root {Path(cfg.encode.store_root)}"]
    kind = encoder_modality(m.modality)
    if kind in ("image", "text", "audio"):
        parts.append(f"--{kind}-encoder {m.encoder}")
    if cfg.encode.limit is not None:
        parts.append(f"--limit {cfg.encode.limit}")
    if cfg.encode.seed:
        parts.append(f"--seed {cfg.encode.seed}")
    return " ".join(parts + ["--force"])
