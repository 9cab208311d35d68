"""Fashion-MNIST from Debian's IDX files: 28x28 grayscale clothes in 10 classes, images cached as PNGs."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from m3jepa.data.imagefolder import ClassDataset, check_limit, label_items
from m3jepa.data.records import DatasetError
from m3jepa.data.splits import SPLITS, Item

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or pass --root"
# The official label order: CLASSES[k] is the name of IDX label k. The one-hot order is sorted(CLASSES).
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TRAIN_SIZE = 54_000  # the first 54,000 official training images; the last 6,000 are val
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


@dataclass(frozen=True)
class Part:
    """One split: which official file ("train" or "t10k") and which index range of it."""

    split: str
    source: str
    start: int
    stop: int | None  # None: to the end of the file


PARTS = (
    Part("train", "train", 0, TRAIN_SIZE),
    Part("val", "train", TRAIN_SIZE, None),
    Part("test", "t10k", 0, None),
)


def idx_path(root: Path, stem: str) -> Path:
    """`<root>/<stem>` or `<root>/<stem>.gz`; DatasetError with the install command when neither exists."""
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"fashion-mnist: {root / stem}[.gz] not found; {INSTALL_HINT}")


def _read_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DatasetError(f"fashion-mnist: {path} is unreadable: {e}") from e


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file as uint8: labels (N,) for magic 0x801, images (N, rows, cols) for 0x803."""
    data = _read_bytes(path)
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim or struct.unpack(">I", data[:4])[0] != magic:
        raise DatasetError(f"fashion-mnist: {path} is not an IDX file with magic {magic:#010x}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"fashion-mnist: {path} holds {body.size} bytes of data, header says {shape}")
    return body.reshape(shape)


def read_labels(root: Path, source: str) -> np.ndarray:
    """Official labels (N,) of the `train` or `t10k` file, each in 0..9."""
    labels = read_idx(idx_path(root, f"{source}-labels-idx1-ubyte"), LABELS_MAGIC)
    if labels.size and labels.max() >= len(CLASSES):
        raise DatasetError(f"fashion-mnist: {source} labels hold {int(labels.max())}, beyond the 10 classes")
    return labels


def cache_root() -> Path:
    """Where decoded PNGs go: `$XDG_CACHE_HOME/m3jepa/fashion-mnist` (default ~/.cache), never the repo."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "m3jepa" / "fashion-mnist"


def png_folder(root: Path, source: str) -> Path:
    """The cache folder of one IDX image file, keyed by a hash of its bytes (another copy, another folder)."""
    images = idx_path(root, f"{source}-images-idx3-ubyte")
    digest = hashlib.sha256(images.read_bytes()).hexdigest()[:16]
    return cache_root() / f"{source}-{digest}"


def write_pngs(root: Path, source: str, indices: Sequence[int]) -> dict[int, Path]:
    """index → PNG path of those official images, written once (atomically) and reused afterwards."""
    folder = png_folder(root, source)
    paths = {i: folder / f"{i:05d}.png" for i in indices}
    missing = [i for i, p in paths.items() if not p.is_file()]
    if missing:
        images = read_idx(idx_path(root, f"{source}-images-idx3-ubyte"), IMAGES_MAGIC)  # (N, 28, 28)
        folder.mkdir(parents=True, exist_ok=True)
        for i in missing:
            # temporary name then rename: concurrent loaders (torchrun ranks) never see a partial file
            tmp = paths[i].with_suffix(f".{os.getpid()}.tmp")
            Image.fromarray(images[i], mode="L").save(tmp, format="PNG")
            os.replace(tmp, paths[i])
        log.info("fashion-mnist: wrote %d PNGs of %s to %s", len(missing), source, folder)
    return paths


def part_indices(part: Part, n_images: int, limit: int | None) -> range:
    """The official indices of one split; `limit` keeps the first N by index (the classes are mixed)."""
    stop = n_images if part.stop is None else part.stop
    return range(part.start, stop if limit is None else min(stop, part.start + limit))


def load_fashion_mnist(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ClassDataset:
    """Train (official 0..53,999), val (54,000..59,999), test (the official 10,000) and one label per class.

    `seed` does not change the official split; `limit` keeps the first N images of each split.
    """
    base = Path(root or DEFAULT_ROOT)
    if not base.is_dir():
        raise DatasetError(f"fashion-mnist: folder {base} not found; {INSTALL_HINT}")
    check_limit("fashion-mnist", limit)
    items: list[Item] = []
    for source in dict.fromkeys(part.source for part in PARTS):
        labels = read_labels(base, source).tolist()  # Python ints: 70,000 numpy scalars are slow
        parts = {part: part_indices(part, len(labels), limit) for part in PARTS if part.source == source}
        # one write_pngs call per IDX file, so its images are decompressed at most once per load
        paths = write_pngs(base, source, [i for indices in parts.values() for i in indices])
        for part, indices in parts.items():
            items += [Item(part.split, CLASSES[labels[i]], f"{part.split}/{i:05d}", "image", str(paths[i]))
                      for i in indices]
    items += label_items(SPLITS, CLASSES)
    return ClassDataset("fashion-mnist", items, list(CLASSES))
