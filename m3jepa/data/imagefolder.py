"""Image classification folders: `imagefolder` (<root>/<class>/*.png|jpg) and `imagenet` (train/ and val/)."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from m3jepa.data.media import safe_join
from m3jepa.data.records import DatasetError
from m3jepa.data.splits import SKIP_HINT, SPLITS, Item, ItemDataset, assign_clusters, natural_key

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SYNSET_MAPPING = "LOC_synset_mapping.txt"
IMAGENET_SPLITS = ("train", "val")


class ClassDataset(ItemDataset):
    """An ItemDataset whose groups are classes: image rows grouped by class, one label row per class.

    `classes()` is the full sorted class list (the `onehot` encoder's dimension, unaffected by
    `limit`); `display_names` maps a class name to a human-readable one (the name itself by default).
    """

    def __init__(self, name: str, items: Iterable[Item], classes: Sequence[str], *,
                 split_names: Sequence[str] = SPLITS, skipped: list[tuple[str, str]] | None = None,
                 display_names: Mapping[str, str] | None = None):
        super().__init__(name, items, split_names=split_names, skipped=skipped)
        self._classes = sorted(classes)
        self.display_names = {c: (display_names or {}).get(c, c) for c in self._classes}

    def classes(self) -> list[str]:
        """Every class name, sorted: the label modality's rows and the one-hot order."""
        return list(self._classes)


def label_items(split_names: Sequence[str], classes: Sequence[str]) -> list[Item]:
    """One label item per class and split: group id = sample id = payload = the class name."""
    return [Item(split, c, c, "label", c) for split in split_names for c in classes]


def check_limit(name: str, limit: int | None) -> None:
    """`limit` counts images here (groups are classes); refuse a non-positive one."""
    if limit is not None and limit <= 0:
        raise DatasetError(f"{name}: limit={limit} must be a positive number of images per split")


def round_robin(items: Sequence[Item], limit: int | None) -> list[Item]:
    """The first `limit` images of a split taken class by class in turn (classes and images in natural order).

    Class folders list images class by class, so "the first N" would be one class only; taking them in
    turn keeps every class represented (balanced to within one image).
    """
    if limit is None:
        return list(items)
    by_class: dict[str, list[Item]] = defaultdict(list)
    for it in sorted(items, key=lambda it: natural_key(it.sample_id)):
        by_class[it.group_id].append(it)
    queues = [by_class[c] for c in sorted(by_class, key=natural_key)]
    out: list[Item] = []
    depth = 0
    while len(out) < limit and any(depth < len(q) for q in queues):
        out += [q[depth] for q in queues if depth < len(q)][: limit - len(out)]
        depth += 1
    return out


def scan_class_folder(folder: Path) -> dict[str, list[str]]:
    """class name → image paths relative to `folder` (`<class>/<file>`, natural order); non-images ignored."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    out: dict[str, list[str]] = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = []
        for dirpath, _dirs, names in os.walk(class_dir):  # nested folders belong to their top class
            rel_dir = Path(dirpath).relative_to(folder)
            files += [(rel_dir / n).as_posix() for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
        if files:
            out[class_dir.name] = sorted(files, key=natural_key)
        else:
            log.info("%s: class folder %s holds no image; ignored", folder, class_dir.name)
    return out


def image_items(folder: Path, split_of: Mapping[str, str], class_files: Mapping[str, list[str]],
                prefix: str, skip_bad: bool, skipped: list[tuple[str, str]]) -> list[Item]:
    """Image items: group id = class, sample id = `prefix` + relative path, payload = absolute path."""
    items = []
    for cls, files in class_files.items():
        for rel in files:
            sample_id = f"{prefix}{rel}"
            try:
                path = safe_join(folder, rel, sample_id)  # refuses symlinked files that leave the root
            except DatasetError as e:
                if not skip_bad:
                    raise DatasetError(f"{e}; {SKIP_HINT}") from None
                skipped.append((sample_id, str(e)))
                continue
            items.append(Item(split_of[rel], cls, sample_id, "image", str(path)))
    return items


def seeded_class_split(class_files: Mapping[str, list[str]], seed: int) -> dict[str, str]:
    """Each image → train/val/test, 80/10/10 within every class, ordered by sha256(seed, path)."""
    split_of: dict[str, str] = {}
    for files in class_files.values():
        split_of.update(assign_clusters({rel: 1 for rel in files}, seed))
    return split_of


def load_imagefolder(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ClassDataset:
    """`<root>/<class>/*.{jpg,jpeg,png}` with a seeded 80/10/10 split inside each class."""
    if root is None:
        raise DatasetError("imagefolder: --root is required (folders of images, <root>/<class>/*.png)")
    check_limit("imagefolder", limit)
    base = Path(root)
    class_files = scan_class_folder(base)
    if not class_files:
        raise DatasetError(f"imagefolder: no class folder with .jpg/.jpeg/.png images under {base}")
    skipped: list[tuple[str, str]] = []
    images = image_items(base, seeded_class_split(class_files, seed), class_files, "", skip_bad, skipped)
    items = _limited(images, SPLITS, limit) + label_items(SPLITS, list(class_files))
    log.info("imagefolder: %d images in %d classes under %s", len(images), len(class_files), base)
    return ClassDataset("imagefolder", items, list(class_files), skipped=skipped)


def load_imagenet(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ClassDataset:
    """`<root>/train/<wnid>/*.JPEG` and `<root>/val/<wnid>/*.JPEG`; classes = wnids (seed is unused)."""
    if root is None:
        raise DatasetError("imagenet: --root is required (a folder holding train/<wnid>/ and val/<wnid>/)")
    check_limit("imagenet", limit)
    base = Path(root)
    skipped: list[tuple[str, str]] = []
    images: list[Item] = []
    classes: set[str] = set()
    for split in IMAGENET_SPLITS:
        folder = base / split
        _refuse_flat_val(folder)
        class_files = scan_class_folder(folder)
        if not class_files:
            raise DatasetError(f"imagenet: no <wnid>/*.JPEG class folder under {folder}")
        classes.update(class_files)
        split_of = {rel: split for files in class_files.values() for rel in files}
        images += image_items(folder, split_of, class_files, f"{split}/", skip_bad, skipped)
    names = read_synset_mapping(base / SYNSET_MAPPING)
    items = _limited(images, IMAGENET_SPLITS, limit) + label_items(IMAGENET_SPLITS, sorted(classes))
    log.info("imagenet: %d images in %d classes under %s", len(images), len(classes), base)
    return ClassDataset("imagenet", items, sorted(classes), split_names=IMAGENET_SPLITS, skipped=skipped,
                        display_names=names)


def read_synset_mapping(path: Path) -> dict[str, str]:
    """`n01440764 tench, Tinca tinca` lines → {wnid: "tench"} (first name); {} when the file is absent."""
    if not path.is_file():
        return {}
    names = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, rest = line.strip().partition(" ")
        if not rest:
            raise DatasetError(f"{path}:{number}: expected '<wnid> <name>[, <name>...]', got {line!r}")
        names[wnid] = rest.split(",")[0].strip()
    return names


def _refuse_flat_val(folder: Path) -> None:
    # The official download ships val/ flat (labels in LOC_val_solution.csv); we need class folders.
    if folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file()):
        raise DatasetError(
            f"imagenet: {folder} holds images directly; sort them into {folder}/<wnid>/ folders first "
            "(the wnid of each image is in LOC_val_solution.csv)"
        )


def _limited(images: list[Item], split_names: Sequence[str], limit: int | None) -> list[Item]:
    out = []
    for split in split_names:
        out += round_robin([it for it in images if it.split == split], limit)
    return out
