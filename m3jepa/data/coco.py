"""MS-COCO captions from a local copy: the Karpathy split (preferred) or the official annotations."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from m3jepa.data.media import safe_join
from m3jepa.data.records import DatasetError
from m3jepa.data.splits import Item, ItemCollector, ItemDataset

log = logging.getLogger(__name__)

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
LAYOUT_HELP = (
    "expected either <root>/dataset_coco.json (Karpathy split) with images under <root>/train2014 and "
    "<root>/val2014, or <root>/annotations/captions_{train,val}{2017,2014}.json with images under "
    "<root>/{train,val}{2017,2014}/"
)


def read_json(path: Path, dataset: str) -> Any:
    """Parse a JSON file; a broken one is a DatasetError naming it."""
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{dataset}: cannot read {path}: {e}") from None


def add_image(collector: ItemCollector, root: Path, item: Item, rel: str) -> None:
    """Add an image item whose file is `rel` under `root`; escaping or missing files are bad items."""
    try:
        path = safe_join(root, rel, f"image {item.sample_id}")
    except DatasetError as e:
        collector.reject(item.sample_id, str(e), group_id=item.group_id)
        return
    if not path.is_file():
        collector.reject(item.sample_id, f"image file {path} is missing", group_id=item.group_id)
        return
    collector.add(Item(item.split, item.group_id, item.sample_id, "image", str(path)))


def add_caption(collector: ItemCollector, split: str, group_id: str, sample_id: str, raw: Any) -> None:
    """Add a caption item; a non-string or blank caption is a bad item (only that caption is dropped)."""
    if not isinstance(raw, str) or not raw.strip():
        collector.reject(sample_id, f"caption of image {group_id} is empty or missing")
        return
    collector.add(Item(split, group_id, sample_id, "text", raw.strip()))


def karpathy_items(
    meta: dict[str, Any],
    collector: ItemCollector,
    image_rel: Callable[[dict[str, Any]], str],
    group_key: Callable[[dict[str, Any]], str],
    root: Path,
    dataset: str,
) -> None:
    """Collect images and their `sentences[].raw` from a Karpathy split file (dataset_*.json)."""
    images = meta.get("images") if isinstance(meta, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{dataset}: the Karpathy file has no 'images' list")
    for n, entry in enumerate(images):
        try:
            group_id = group_key(entry)
            split = KARPATHY_SPLITS[entry["split"]]
            rel = image_rel(entry)
            sentences = [(str(x["sentid"]), x.get("raw")) for x in entry["sentences"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise DatasetError(
                f"{dataset}: Karpathy entry #{n} lacks a field or has a bad split: {e!r}"
            ) from None
        add_image(collector, root, Item(split, group_id, group_id, "image", ""), rel)
        for sentid, raw in sentences:
            add_caption(collector, split, group_id, sentid, raw)


def _karpathy(root: Path, collector: ItemCollector) -> list[str]:
    meta = read_json(root / "dataset_coco.json", "coco")
    karpathy_items(
        meta,
        collector,
        image_rel=lambda e: f"{e['filepath']}/{e['filename']}",
        group_key=lambda e: str(e["cocoid"]),
        root=root,
        dataset="coco",
    )
    return ["train", "val", "test"]


def official_year(root: Path) -> str | None:
    """The official annotation year present under root/annotations: 2017 preferred, else 2014."""
    for year in ("2017", "2014"):
        if all((root / "annotations" / f"captions_{s}{year}.json").is_file() for s in ("train", "val")):
            return year
    return None


def _official(root: Path, year: str, collector: ItemCollector) -> list[str]:
    for split in ("train", "val"):
        path = root / "annotations" / f"captions_{split}{year}.json"
        meta = read_json(path, "coco")
        try:
            images = {int(im["id"]): im["file_name"] for im in meta["images"]}
            annotations = meta["annotations"]
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"coco: {path} is not a COCO captions file: {e!r}") from None
        for image_id, file_name in images.items():
            gid = str(image_id)
            add_image(collector, root, Item(split, gid, gid, "image", ""), f"{split}{year}/{file_name}")
        for ann in annotations:
            if not isinstance(ann, dict) or "id" not in ann or ann.get("image_id") not in images:
                collector.reject(
                    f"caption {ann.get('id') if isinstance(ann, dict) else ann}",
                    f"annotation in {path.name} names no known image",
                )
                continue
            add_caption(collector, split, str(ann["image_id"]), str(ann["id"]), ann.get("caption"))
    return ["train", "val"]


def load_coco(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ItemDataset:
    """Build COCO captions (the seed is unused: both layouts ship their own split)."""
    if root is None:
        raise DatasetError(f"coco has no default location; pass --root (a local COCO copy): {LAYOUT_HELP}")
    base = Path(root)
    collector = ItemCollector("coco", skip_bad)
    if (base / "dataset_coco.json").is_file():
        layout, splits = "karpathy", _karpathy(base, collector)
    elif (year := official_year(base)) is not None:
        layout, splits = f"official {year}", _official(base, year, collector)
    else:
        raise DatasetError(f"coco: no annotations found under {base}; {LAYOUT_HELP}")
    items = collector.items()
    log.info("coco: %s layout, %d items, %d skipped", layout, len(items), len(collector.skipped))
    return ItemDataset("coco", items, split_names=splits, limit=limit, skipped=collector.skipped)
