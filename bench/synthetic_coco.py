"""COCO-shaped synthetic feature stores with a learnable, COCO-like structure (the GPU kit and the recipe).

Shape: 5 captions per image (a 6th for some, as COCO's train split: 566,747 captions for 113,287 images),
group ids linking each caption to its image, written through the real StoreWriter (zarr, float16).

Structure (what a predictor can learn, and what makes it hard), from one fixed "world" shared by every
split, so a model trained on train is scored on val and test:
- each image shows one of 80 categories, drawn with Zipf-like frequencies (COCO: "person" in about half
  the images), so most negatives of a batch share a positive's category (hard negatives);
- an image's latent z (rank 64) is its category's centre plus its own variation;
- image feature = z W_img + noise + a common offset (encoder features are anisotropic);
- caption c of an image = tanh((z + its own noise) W_1) W_2 + noise + a common offset: a nonlinear view
  of part of the image (captions describe some of it), each caption differently.

What it cannot tell: real DINOv2 / Llama-3 features have no such generative story; recall levels, the best
learning rate and temperature on real COCO can differ (docs/training.md, "The GPU recipe").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m3jepa.data.records import Record, membership_fingerprint
from m3jepa.store import Manifest, StoreWriter, rows_from_records, store_path

DATASET = "synthetic-coco"
ENCODERS = {"image": "syn-image", "text": "syn-text"}
CATEGORIES = 80
RANK = 64
# The difficulty: a ridge regression from captions to images (numpy, 20,000 train images, proxy dims
# 128/256) scores text->image R@1 25.8%, R@5 51.5%, R@10 63.7% on 5,000 test images x 25,000 captions;
# caption noise 1.5 instead of 1.0 gives 9.2% R@1, and 0.6 with spread 0.8, 98.6%.
SPREAD = 0.5  # an image's own variation around its category's centre
IMAGE_NOISE = 0.5
CAPTION_NOISE = 1.0  # what a caption leaves out of its image
CHUNK = 65536  # rows drawn and written at a time: bounded memory at COCO's size


@dataclass(frozen=True)
class Sizes:
    """One split: images, captions (5 to 6 per image) and the two feature widths."""

    images: int
    captions: int
    dims: tuple[int, int]  # (image, text)


# COCO's Karpathy splits; "proxy" dims are the reduced widths the recipe was tuned at (docs/training.md)
COCO = {"train": (113_287, 566_747), "val": (5_000, 25_000), "test": (5_000, 25_000)}


@dataclass(frozen=True)
class World:
    """What every split shares: category frequencies and centres, the image and caption maps."""

    probs: np.ndarray  # (K,)
    centres: np.ndarray  # (K, r)
    w_img: np.ndarray  # (r, Di)
    w1: np.ndarray  # (r, 2r)
    w2: np.ndarray  # (2r, Dt)
    off_img: np.ndarray  # (Di,)
    off_txt: np.ndarray  # (Dt,)


def world(dims: tuple[int, int], seed: int = 12345) -> World:
    rng = np.random.default_rng(seed)
    di, dt = dims
    ranks = np.arange(1, CATEGORIES + 1)
    probs = 1.0 / ranks**0.9
    return World(
        probs=probs / probs.sum(),
        centres=rng.standard_normal((CATEGORIES, RANK)),
        w_img=rng.standard_normal((RANK, di)) / np.sqrt(RANK),
        w1=rng.standard_normal((RANK, 2 * RANK)) / np.sqrt(RANK),
        w2=rng.standard_normal((2 * RANK, dt)) / np.sqrt(2 * RANK),
        off_img=0.5 * rng.standard_normal(di),
        off_txt=0.5 * rng.standard_normal(dt),
    )


def caption_groups(images: int, captions: int) -> np.ndarray:
    """(T,) the image of each caption: 5 per image, a 6th for the first T - 5·I images (COCO's layout)."""
    extra = captions - 5 * images
    if not 0 <= extra <= images:
        raise ValueError(f"{captions} captions for {images} images is not 5 or 6 per image")
    ids = np.arange(images)
    return np.concatenate([np.repeat(ids, 5), ids[:extra]])


def latents(w: World, images: int, rng: np.random.Generator) -> np.ndarray:
    """(I, r) each image's latent: its category's centre plus half of its own variation."""
    cats = rng.choice(CATEGORIES, size=images, p=w.probs)
    return w.centres[cats] + SPREAD * rng.standard_normal((images, RANK))


def image_features(w: World, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, Di) float16."""
    di = w.w_img.shape[1]
    return (z @ w.w_img + IMAGE_NOISE * rng.standard_normal((len(z), di)) + w.off_img).astype(np.float16)


def caption_features(w: World, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, Dt) float16 for captions whose images' latents are `z` (n, r)."""
    dt = w.w2.shape[1]
    seen = z + CAPTION_NOISE * rng.standard_normal(z.shape)  # what this caption says about its image
    h = np.tanh(seen @ w.w1)  # (n, 2r)
    return (h @ w.w2 + 0.2 * rng.standard_normal((len(z), dt)) + w.off_txt).astype(np.float16)


def _write(root: Path, split: str, modality: str, records: list[Record], dim: int, chunks) -> Path:
    path = store_path(root, DATASET, split, modality, ENCODERS[modality])
    manifest = Manifest(
        dataset=DATASET, split=split, modality=modality, membership=membership_fingerprint(records),
        rows=len(records), encoder=ENCODERS[modality], encoder_revision="synthetic", pooling="none",
        layers="none", dim=dim, dtype="float16", format="zarr", shard_size=CHUNK,
    )
    with StoreWriter(path, manifest) as writer:
        for (index, start, end), feats in zip(writer.planned_shards(), chunks, strict=True):
            assert feats.shape == (end - start, dim), (feats.shape, start, end)
            writer.write_shard(index, feats)
        writer.finalize(rows_from_records(records), [])
    return path


def write_split(root: Path, split: str, sizes: Sizes, seed: int = 0) -> None:
    """The image and text stores of one split under `root` (dataset "synthetic-coco")."""
    w = world(sizes.dims)
    rng = np.random.default_rng([seed, sum(map(ord, split))])
    z = latents(w, sizes.images, rng)  # (I, r)
    groups = [f"{split}-{i:06d}" for i in range(sizes.images)]
    cap_of = caption_groups(sizes.images, sizes.captions)  # (T,)
    n_th: dict[int, int] = {}
    img_records = [Record(i, g, g, "image", f"{g}.jpg") for i, g in enumerate(groups)]
    txt_records = []
    for j, i in enumerate(cap_of):
        c = n_th[i] = n_th.get(i, -1) + 1
        txt_records.append(Record(j, f"{groups[i]}#{c}", groups[i], "text", f"caption {c} of {groups[i]}"))
    di, dt = sizes.dims
    _write(root, split, "image", img_records, di,
           (image_features(w, z[lo : lo + CHUNK], rng) for lo in range(0, sizes.images, CHUNK)))
    _write(root, split, "text", txt_records, dt,
           (caption_features(w, z[cap_of[lo : lo + CHUNK]], rng) for lo in range(0, sizes.captions, CHUNK)))


def write_stores(
    root: Path, splits: dict[str, tuple[int, int]], dims: tuple[int, int], seed: int = 0
) -> Path:
    """train/val/test (or any) splits of {split: (images, captions)} under `root`; returns `root`."""
    for split, (images, captions) in splits.items():
        write_split(root, split, Sizes(images, captions, dims), seed)
    return root


def overrides(root: Path) -> list[str]:
    """--set overrides that point a pipeline (the shipped COCO one, say) at these stores."""
    return [f'encode.store_root="{root}"', f'encode.dataset="{DATASET}"',
            f'encode.image_encoder="{ENCODERS["image"]}"', f'encode.text_encoder="{ENCODERS["text"]}"']
