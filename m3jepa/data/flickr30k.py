"""Flickr30k from a local copy with the Karpathy split file (1,000 test images, 5 captions each)."""

from __future__ import annotations

import logging
from pathlib import Path

from m3jepa.data.coco import karpathy_items, read_json
from m3jepa.data.records import DatasetError
from m3jepa.data.splits import ItemCollector, ItemDataset

log = logging.getLogger(__name__)

IMAGE_DIRS = ("flickr30k-images", "images")
LAYOUT_HELP = (
    "expected <root>/dataset_flickr30k.json (Karpathy split) and images under <root>/flickr30k-images/"
)


def image_dir(root: Path) -> str:
    """The image folder's name under root: flickr30k-images/ (preferred) or images/."""
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return name
    raise DatasetError(
        f"flickr30k: no image folder under {root} (tried {', '.join(IMAGE_DIRS)}); {LAYOUT_HELP}"
    )


def load_flickr30k(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ItemDataset:
    """Build Flickr30k: group id = the image file's stem, caption id = the Karpathy sentid (seed unused)."""
    if root is None:
        raise DatasetError(f"flickr30k has no default location; pass --root: {LAYOUT_HELP}")
    base = Path(root)
    meta_path = base / "dataset_flickr30k.json"
    if not meta_path.is_file():
        raise DatasetError(f"flickr30k: {meta_path} not found; {LAYOUT_HELP}")
    folder = image_dir(base)
    collector = ItemCollector("flickr30k", skip_bad)
    karpathy_items(
        read_json(meta_path, "flickr30k"),
        collector,
        image_rel=lambda e: f"{folder}/{e['filename']}",
        group_key=lambda e: Path(e["filename"]).stem,
        root=base,
        dataset="flickr30k",
    )
    items = collector.items()
    log.info("flickr30k: %d items from %s/, %d skipped", len(items), folder, len(collector.skipped))
    return ItemDataset("flickr30k", items, limit=limit, skipped=collector.skipped)
