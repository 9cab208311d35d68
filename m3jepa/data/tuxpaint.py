"""Tux Paint stamps: PNG images, English captions and sound effects, split over caption clusters."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from m3jepa.data.media import safe_join
from m3jepa.data.records import DatasetError
from m3jepa.data.splits import Item, ItemCollector, ItemDataset, caption_cluster, split_groups

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/tuxpaint/stamps"


@dataclass(frozen=True)
class Stamp:
    """One stamp on disk: its id (path without extension, relative to the root) and its files."""

    stamp_id: str
    has_png: bool
    has_svg: bool
    has_ogg: bool


def scan_stamps(root: Path) -> list[Stamp]:
    """Every stamp described by a `.txt` file under `root`, sorted by id (not by listing order)."""
    files: set[str] = set()
    for dirpath, _dirs, names in os.walk(root):  # symlinked folders are not followed
        rel_dir = Path(dirpath).relative_to(root)
        files.update((rel_dir / n).as_posix() for n in names)
    stamps = []
    for rel in sorted(f for f in files if f.endswith(".txt")):
        stem = rel[: -len(".txt")]
        # Only `name.ogg` is the stamp's sound; `name_desc*.ogg` and `name_xx.ogg` are spoken words.
        stamps.append(Stamp(stem, f"{stem}.png" in files, f"{stem}.svg" in files, f"{stem}.ogg" in files))
    return stamps


def read_caption(path: Path) -> str:
    """The English caption: the first line of the stamp's .txt (later lines are translations)."""
    text = path.read_bytes().decode("utf-8-sig")
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


def load_tuxpaint(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ItemDataset:
    """Build the tuxpaint dataset: one image, one caption and (when present) one sound per PNG stamp."""
    base = Path(root or DEFAULT_ROOT)
    if not base.is_dir():
        raise DatasetError(
            f"tuxpaint: stamp folder {base} not found; install it with "
            "`apt-get install tuxpaint-stamps-default` or pass --root"
        )
    stamps = scan_stamps(base)
    usable = [s for s in stamps if s.has_png]
    svg_only = sum(1 for s in stamps if s.has_svg and not s.has_png)
    no_image = len(stamps) - len(usable) - svg_only
    log.info(
        "tuxpaint: %d PNG stamps; skipped %d SVG-only stamps (no SVG renderer) and %d captions without image",
        len(usable),
        svg_only,
        no_image,
    )
    if not usable:
        raise DatasetError(f"tuxpaint: no PNG stamp with a .txt caption under {base}")
    collector = ItemCollector("tuxpaint", skip_bad)
    captions = _read_captions(base, usable, collector)
    split_of = split_groups({sid: caption_cluster(c) for sid, c in captions.items()}, seed)
    for stamp in usable:
        sid = stamp.stamp_id
        if sid not in captions:
            continue
        split = split_of[sid]
        _add_media(collector, base, split, sid, "image", f"{sid}.png")
        collector.add(_item(split, sid, "text", captions[sid]))
        if stamp.has_ogg:
            _add_media(collector, base, split, sid, "audio", f"{sid}.ogg")
    return ItemDataset("tuxpaint", collector.items(), limit=limit, skipped=collector.skipped)


def _read_captions(base: Path, stamps: list[Stamp], collector: ItemCollector) -> dict[str, str]:
    captions = {}
    for stamp in stamps:
        sid = stamp.stamp_id
        try:
            caption = read_caption(safe_join(base, f"{sid}.txt", sid))
        except (UnicodeDecodeError, DatasetError) as e:
            collector.reject(sid, f"caption file unreadable: {e}", group_id=sid)
            continue
        if not caption:
            collector.reject(sid, "empty caption (first line of the .txt)", group_id=sid)
            continue
        captions[sid] = caption
    return captions


def _add_media(collector: ItemCollector, base: Path, split: str, sid: str, modality: str, rel: str) -> None:
    try:
        path = safe_join(base, rel, sid)
    except DatasetError as e:
        collector.reject(sid, str(e), group_id=sid if modality == "image" else None)
        return
    collector.add(_item(split, sid, modality, str(path)))


def _item(split: str, sid: str, modality: str, payload: str) -> Item:
    return Item(split, sid, sid, modality, payload)
