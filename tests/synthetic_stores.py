"""Synthetic feature stores with a known answer, written through the real StoreWriter (test helper)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from m3jepa.data.records import Record, membership_fingerprint
from m3jepa.store import Manifest, StoreWriter, rows_from_records, store_path

DATASET = "synthetic"
ENCODERS = {"image": "syn-image", "text": "syn-text", "label": "syn-label"}
DIMS = {"image": 48, "text": 32}


def write_store(
    root: Path,
    split: str,
    modality: str,
    records: list[Record],
    feats: np.ndarray,
    shard_size: int = 64,
    fmt: str = "zarr",
) -> Path:
    """Write one complete store of `feats` (N, D) for `records`."""
    path = store_path(root, DATASET, split, modality, ENCODERS[modality])
    manifest = Manifest(
        dataset=DATASET,
        split=split,
        modality=modality,
        membership=membership_fingerprint(records),
        rows=len(records),
        encoder=ENCODERS[modality],
        encoder_revision="r1",
        pooling="none",
        layers="none",
        dim=feats.shape[1],
        dtype="float32",
        format=fmt,
        shard_size=shard_size,
    )
    with StoreWriter(path, manifest) as w:
        for index, start, end in w.planned_shards():
            w.write_shard(index, feats[start:end])
        w.finalize(rows_from_records(records), [])
    return path


def make_split(
    root: Path, split: str, n_groups: int, captions: int = 2, seed: int = 0, noise: float = 0.3,
    fmt: str = "zarr",
) -> None:
    """Images with random latents; each caption a fixed linear map of its image plus noise."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])  # str hash() is salted per process
    mapping = np.random.default_rng(12345).standard_normal((DIMS["image"], DIMS["text"])) / 6
    images = rng.standard_normal((n_groups, DIMS["image"])).astype(np.float32)
    groups = [f"{split}-g{i:04d}" for i in range(n_groups)]
    img_records = [Record(i, g, g, "image", f"{g}.png") for i, g in enumerate(groups)]
    txt_records, txt = [], []
    for i, g in enumerate(groups):
        for c in range(captions):
            txt_records.append(Record(len(txt_records), f"{g}#{c}", g, "text", f"caption {c} of {g}"))
            txt.append(images[i] @ mapping + noise * rng.standard_normal(DIMS["text"]))
    write_store(root, split, "image", img_records, images, fmt=fmt)
    write_store(root, split, "text", txt_records, np.asarray(txt, dtype=np.float32), fmt=fmt)


def make_label_split(root: Path, split: str, per_class: int = 20, classes: int = 5) -> None:
    """Images whose latent is their class's centre plus noise; one one-hot label row per class."""
    rng = np.random.default_rng([7, zlib.crc32(split.encode())])
    centres = np.random.default_rng(99).standard_normal((classes, DIMS["image"])).astype(np.float32)
    names = [f"class{c}" for c in range(classes)]
    img_records, feats = [], []
    for c, name in enumerate(names):
        for i in range(per_class):
            img_records.append(Record(len(img_records), f"{split}/{name}/{i}", name, "image", "x.png"))
            feats.append(centres[c] + 0.8 * rng.standard_normal(DIMS["image"]))
    write_store(root, split, "image", img_records, np.asarray(feats, dtype=np.float32))
    labels = [Record(c, name, name, "label", name) for c, name in enumerate(names)]
    write_store(root, split, "label", labels, np.eye(classes, dtype=np.float32))


def make_stores(root: Path, n_train: int = 256, n_val: int = 48, n_test: int = 48) -> Path:
    """train/val/test stores for image and text under `root`."""
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        make_split(root, split, n)
    return root


def overrides(root: Path, run: Path, **extra: object) -> list[str]:
    """--set overrides pointing a pipeline at the synthetic stores, with a small fast predictor."""
    sets = {
        "encode.dataset": DATASET,
        "encode.store_root": str(root),
        "run_dir": str(run),
        "encode.image_encoder": ENCODERS["image"],
        "encode.text_encoder": ENCODERS["text"],
        "model.dim": 64,
        "model.hidden": 128,
        "model.num_experts": 4,
        "model.top_k": 2,
        "model.cl_dim": 32,
        "train.batch_size": 32,
        "train.max_steps": 60,
        "train.eval_every": 20,
        "train.checkpoint_every": 10,
        "train.log_every": 5,
        "train.lr": 3e-3,
        "train.num_threads": 1,
    }
    sets.update(extra)
    return [f"{k}={_toml(v)}" for k, v in sets.items()]


def _toml(v: object) -> str:
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
