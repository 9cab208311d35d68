"""The stores a run read, recorded in `<run>/stores.json`, and checked again at resume and evaluate time."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from m3jepa.config import PipelineConfig
from m3jepa.core.checkpoint import CheckpointError
from m3jepa.core.directions import direction_modalities
from m3jepa.core.errors import StoreDataError
from m3jepa.core.layout import STORES, RunDir
from m3jepa.core.memory import check_model_fits
from m3jepa.core.paired import PairedSplit, modality_store
from m3jepa.files import atomic_write_text
from m3jepa.location import location
from m3jepa.store.manifest import load_manifest

log = logging.getLogger(__name__)



def start_run(
    cfg: PipelineConfig,
    run_dir: Path,
    train_data: PairedSplit,
    is_main: bool,
    device: torch.device | None = None,
) -> None:
    """The checks of a run's start, once its train split is loaded and before the run folder is made: the
    stores still hold the dataset's captions and media (core/freshness.py), the batch fits the split, the
    predictor fits `device`'s memory (when given), and the stores are the ones the run recorded (rank 0
    records them on the run's first start)."""
    from m3jepa.core.freshness import check_fresh

    read = [split for split, reads in _splits(cfg).items() if reads]
    check_fresh(cfg, read, direction_modalities(cfg.train.directions), "train-predictor")
    check_batch_fits(cfg, train_data)
    if device is not None:
        check_model_fits(cfg.model, train_data.dims(), device, training=True)
    if is_main:
        record_stores(cfg, run_dir)


def check_batch_fits(cfg: PipelineConfig, data: PairedSplit) -> None:
    """Refuse a batch larger than a direction's pairs: every step would be a short batch and
    samples_seen would count rows that were never seen."""
    b = cfg.train.batch_size
    for d in cfg.train.directions:
        n = data.num_pairs(d)
        if n < b:
            raise StoreDataError(
                f"train.batch_size={b} is larger than the {n} {d} pairs of split {data.split!r}; "
                f"set train.batch_size <= {n}, or encode more rows"
            )


def _splits(cfg: PipelineConfig) -> dict[str, bool]:
    """Split → whether the run reads it (train and validation) or only names it (the evaluation split)."""
    t = cfg.train
    out = {t.train_split: True, t.val_split: True}
    out.setdefault(cfg.eval.split, False)
    return out


def _entry(cfg: PipelineConfig, split: str, modality: str) -> dict[str, Any] | None:
    """{store: absolute path, identity: the manifest's identity fields (membership fingerprint, rows,
    encoder, revision, ...)}; None when the store does not exist."""
    try:
        path = modality_store(cfg, split, modality)
    except StoreDataError:
        return None
    identity = load_manifest(path).identity()
    return {"store": str(path.resolve()), "identity": json.loads(json.dumps(identity))}


def _split_record(cfg: PipelineConfig, split: str, read: bool) -> dict[str, Any]:
    mods = direction_modalities(cfg.train.directions)
    return {"read": read, "stores": {m: e for m in mods if (e := _entry(cfg, split, m)) is not None}}


def record_stores(cfg: PipelineConfig, run_dir: Path) -> None:
    """Write `stores.json` on a run's first start; on a resume, check the read splits against it first.

    A split whose stores did not exist when it was recorded is recorded when they first do.
    """
    path = RunDir(run_dir).stores
    old = read_record(run_dir)
    # a URL is recorded as given (it carries no credentials: they come from the environment)
    record = old or {"store_root": str(location(cfg.encode.store_root).resolve()), "splits": {}}
    for split, read in _splits(cfg).items():
        now = _split_record(cfg, split, read)
        before = record["splits"].get(split)
        if before and read:
            _compare(run_dir, split, before, now, "--resume")
        if not before or not before["stores"]:
            record["splits"][split] = now
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's `stores.json`, or None for a run trained before m3jepa recorded its stores."""
    path = RunDir(run_dir).stores
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("store_root"), str) or not isinstance(record.get("splits"), dict):
            raise ValueError("it needs store_root and splits")
    except (ValueError, AttributeError, OSError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); restore it, or train the run again") from e
    return record


def _compare(run_dir: Path, split: str, before: dict, now: dict, where: str) -> None:
    for modality, want in before["stores"].items():
        got = now["stores"].get(modality)
        if got is None:
            raise StoreDataError(f"{where}: the {split} {modality} store {want['store']} that run {run_dir} "
                                 "recorded is gone; re-encode it as it was, or train a new run")
        diff = [
            f"{k} {_short(want['identity'].get(k))} != {_short(got['identity'].get(k))}"
            for k in sorted(set(want["identity"]) | set(got["identity"]))
            if want["identity"].get(k) != got["identity"].get(k)
        ]
        if diff:
            raise StoreDataError(
                f"{where}: the {split} {modality} store {got['store']} is not the one run {run_dir} recorded "
                f"in {STORES} ({'; '.join(diff)}): it was re-encoded since; re-encode it as it was "
                "(same dataset, --limit, encoder), or train a new run on it"
            )


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 16 else text  # sha256 fingerprints, shortened for one line


def eval_config(
    run_dir: Path, cfg: PipelineConfig, split: str | None, protocol: str | None, root: str | None = None
) -> PipelineConfig:
    """The checkpoint's config for `evaluate`: the options checked as eval.split/eval.protocol are,
    encode.store_root the absolute root the run recorded (a relative root is relative to where it trained),
    and encode.root `root` when given (`evaluate --root`: a folder dataset's folder names its stores).
    """
    ev = dataclasses.replace(cfg.eval, split=split or cfg.eval.split, protocol=protocol or cfg.eval.protocol)
    record = read_record(run_dir)
    store_root = cfg.encode.store_root
    if record is None:
        log.warning("run %s has no %s (trained before m3jepa recorded its stores): its stores are not "
                    "checked, and encode.store_root=%r is read from the current directory",
                    run_dir, STORES, store_root)
    else:
        store_root = record["store_root"]
    data_root = cfg.encode.root if root is None else root
    return dataclasses.replace(cfg, eval=ev, encode=dataclasses.replace(cfg.encode, store_root=store_root,
                                                                        root=data_root))


def check_eval_stores(run_dir: Path, cfg: PipelineConfig, split: str) -> None:
    """Refuse to score stores other than the ones the run recorded for `split` (a re-encoded store)."""
    record = read_record(run_dir)
    if record is None:
        return  # eval_config warned
    before = record["splits"].get(split)
    if not before or not before["stores"]:
        log.warning("run %s recorded no %s stores (they did not exist when it trained): they are not checked",
                    run_dir, split)
        return
    _compare(run_dir, split, before, _split_record(cfg, split, False), "evaluate")
