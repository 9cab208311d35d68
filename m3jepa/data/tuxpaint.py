"""Tux Paint stamps: PNG images, English captions and sound effects, split over caption clusters."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3jepa.data.media import safe_join
from m3jepa.data.records import BadItemError, DatasetError
from m3jepa.data.splits import Item, ItemCollector, ItemDataset, caption_cluster, split_groups
from m3jepa.data.svg import render_many

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/tuxpaint/stamps"
# SVG-only stamps are rendered to fit this square: the image encoders resize to 256 before their crop,
# and the PNG stamps are mostly smaller (median 150 px, 95th percentile 450 px).
SVG_SIZE = 256


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
    root: str | None = None,
    *,
    seed: int = 0,
    limit: int | None = None,
    skip_bad: bool = False,
    with_svg: bool = False,
) -> ItemDataset:
    """Build the tuxpaint dataset: one image, one caption and (when present) one sound per PNG stamp.

    `with_svg` (the `tuxpaint-all` dataset) adds the SVG-only stamps, rendered once to PNG (cached).
    """
    name = "tuxpaint-all" if with_svg else "tuxpaint"
    base = Path(root or DEFAULT_ROOT)
    if not base.is_dir():
        raise DatasetError(
            f"{name}: stamp folder {base} not found; install it with "
            "`apt-get install tuxpaint-stamps-default` or pass --root"
        )
    stamps = scan_stamps(base)
    pngs = [s for s in stamps if s.has_png]
    svg_only = [s for s in stamps if s.has_svg and not s.has_png]
    no_image = len(stamps) - len(pngs) - len(svg_only)
    log.info(
        "%s: %d PNG stamps; %s %d SVG-only stamps; skipped %d captions without image", name, len(pngs),
        "rendered" if with_svg else "skipped (tuxpaint-all renders them)", len(svg_only), no_image,
    )
    usable = pngs + svg_only if with_svg else pngs
    if not usable:
        kinds = "PNG or SVG" if with_svg else "PNG"
        raise DatasetError(f"{name}: no {kinds} stamp with a .txt caption under {base}")
    collector = ItemCollector(name, skip_bad)
    captions = _read_captions(base, usable, collector)
    to_render = [s for s in svg_only if s.stamp_id in captions] if with_svg else []
    rendered = _render_svgs(base, to_render, collector) if to_render else {}
    split_of = split_groups({sid: caption_cluster(c) for sid, c in captions.items()}, seed)
    for stamp in sorted(usable, key=lambda s: s.stamp_id):
        sid = stamp.stamp_id
        if sid not in captions:
            continue
        split = split_of[sid]
        if stamp.has_png:
            _add_media(collector, base, split, sid, "image", f"{sid}.png")
        elif sid in rendered:
            collector.add(_item(split, sid, "image", str(rendered[sid])))
        collector.add(_item(split, sid, "text", captions[sid]))
        if stamp.has_ogg:
            _add_media(collector, base, split, sid, "audio", f"{sid}.ogg")
    return ItemDataset(name, collector.items(), limit=limit, skipped=collector.skipped)


def load_tuxpaint_all(root: str | None = None, **kw: Any) -> ItemDataset:
    """The tuxpaint dataset with its SVG-only stamps too (165 more on Debian's package)."""
    return load_tuxpaint(root, with_svg=True, **kw)


def _render_svgs(base: Path, stamps: list[Stamp], collector: ItemCollector) -> dict[str, Path]:
    """stamp id → PNG rendered from its SVG (cached); a stamp whose SVG fails is rejected whole."""
    paths = []
    for stamp in stamps:
        try:
            paths.append((stamp.stamp_id, safe_join(base, f"{stamp.stamp_id}.svg", stamp.stamp_id)))
        except DatasetError as e:
            collector.reject(stamp.stamp_id, str(e), group_id=stamp.stamp_id)
    out = {}
    for sid, png in render_many(paths, SVG_SIZE).items():
        if isinstance(png, BadItemError):
            collector.reject(sid, png.reason, group_id=sid)
        else:
            out[sid] = png
    return out


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
