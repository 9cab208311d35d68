"""Emoji in three drawing styles (Google, Twitter, OpenMoji) with emojibase's English names and keywords."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3jepa.data.records import BadItemError, DatasetError
from m3jepa.data.splits import Item, ItemCollector, ItemDataset, split_groups
from m3jepa.data.svg import render_many

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/local/share/m3jepa-data/emoji"
STYLES = ("google", "twitter", "openmoji")
IMAGE_SIZE = 64  # the only PNG size emoji-datasource ships; OpenMoji's SVGs are rendered at it too
EMOJIBASE = "emojibase-data/en/data.json"
COMPONENT_GROUP = 2  # emojibase's "component": skin-tone swatches and hair parts, not emoji of their own
STYLE_FRACTIONS = (0.9, 0.1)  # style protocol: the training styles' concepts cut into train / val
INSTALL_HINT = "run `bash scripts/setup.sh` (it unpacks the npm packages there) or pass --root"


@dataclass(frozen=True)
class Concept:
    """One emoji of emojibase: its hexcode (the id), CLDR name and CLDR keywords."""

    hexcode: str
    label: str
    keywords: tuple[str, ...]


def code_key(code: str) -> str:
    """The join key of a code point sequence: upper case, variation selector FE0F dropped.

    The three packages spell the same emoji with and without FE0F (263A, 263A-FE0F); only FE0F differs.
    """
    return "-".join(p for p in code.upper().replace("_", "-").split("-") if p and p != "FE0F")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"emoji: {path} not found; {INSTALL_HINT}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"emoji: {path} is not UTF-8 JSON ({e}); reinstall it with setup.sh") from None


def read_concepts(path: Path) -> list[Concept]:
    """The emoji of emojibase's data.json: entries with a group other than component, in file order.

    Skin-tone variants are nested under their base emoji there, so they are not concepts; regional
    indicator letters carry no group and are not emoji on their own.
    """
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"emoji: {path} holds no list of emoji; reinstall emojibase-data with setup.sh")
    concepts = []
    for entry in data:
        if not isinstance(entry, dict) or entry.get("group") in (None, COMPONENT_GROUP):
            continue
        hexcode, label = entry.get("hexcode"), entry.get("label")
        if not isinstance(hexcode, str) or not isinstance(label, str) or not label.strip():
            raise DatasetError(f"emoji: {path}: entry {entry!r:.80} lacks a hexcode or label")
        tags = tuple(str(t).strip() for t in entry.get("tags") or [])
        concepts.append(Concept(hexcode, label.strip(), tuple(t for t in tags if t)))
    return concepts


def build_captions(concepts: list[Concept]) -> dict[str, list[str]]:
    """hexcode → its captions: the CLDR name, then its keyword set joined by ", " when that set is its own.

    A keyword set shared by several concepts (five emoji are just "animal") names none of them, and one
    equal to the name adds nothing: both are left out, so those concepts have the name alone.
    """
    def keyword_caption(c: Concept) -> str:
        return ", ".join(c.keywords)

    shared = Counter(keyword_caption(c).casefold() for c in concepts)
    out = {}
    for c in concepts:
        caps = [c.label]
        kw = keyword_caption(c)
        if kw and shared[kw.casefold()] == 1 and kw.casefold() != c.label.casefold():
            caps.append(kw)
        out[c.hexcode] = caps
    return out


def datasource_images(root: Path, style: str) -> dict[str, Path]:
    """code key → 64 px PNG of emoji-datasource-<style>, for the emoji its emoji.json lists with an image.

    Skin-tone variations are not read: the concepts are the base emoji.
    """
    folder = root / f"emoji-datasource-{style}"
    entries = _read_json(folder / "emoji.json")
    images = {}
    for entry in entries:
        name = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not entry.get(f"has_img_{style}"):
            continue
        path = folder / "img" / style / str(IMAGE_SIZE) / name
        if path.is_file():
            images[code_key(str(entry.get("unified", "")))] = path
    return images


def openmoji_svgs(root: Path) -> dict[str, Path]:
    """code key → OpenMoji's colour SVG (file names are hexcodes, e.g. 1F600.svg)."""
    folder = root / "openmoji" / "color" / "svg"
    if not folder.is_dir():
        raise DatasetError(f"emoji: {folder} not found; {INSTALL_HINT}")
    return {code_key(p.stem): p for p in sorted(folder.glob("*.svg"))}


def style_images(root: Path, concepts: list[Concept], collector: ItemCollector) -> dict[str, dict[str, Path]]:
    """style → {hexcode → image} for the concepts every style draws; OpenMoji's SVGs rendered (cached)."""
    sources = {s: datasource_images(root, s) for s in STYLES if s != "openmoji"}
    svgs = openmoji_svgs(root)
    drawn = [c for c in concepts if all(code_key(c.hexcode) in m for m in (*sources.values(), svgs))]
    log.info("emoji: %d of %d emojibase emoji are drawn in all of %s", len(drawn), len(concepts), STYLES)
    out = {s: {c.hexcode: m[code_key(c.hexcode)] for c in drawn} for s, m in sources.items()}
    rendered = render_many([(_group(c.hexcode, "openmoji"), svgs[code_key(c.hexcode)]) for c in drawn],
                           IMAGE_SIZE)
    out["openmoji"] = {}
    for c in drawn:
        png = rendered[_group(c.hexcode, "openmoji")]
        if isinstance(png, BadItemError):
            collector.reject(png.item, png.reason, group_id=png.item)
        else:
            out["openmoji"][c.hexcode] = png
    return out


def _group(hexcode: str, style: str) -> str:
    # concept first, so a concept's three images sort together (and --limit keeps whole concepts)
    return f"{hexcode}/{style}"


def assign_splits(hexcodes: list[str], seed: int, held_out: str | None) -> dict[tuple[str, str], str]:
    """(hexcode, style) → split.

    held_out None (concept protocol): a seeded 80/10/10 cut of the concepts; a concept's three images
    share its split. held_out a style: that style's images are the test split, and the other styles'
    concepts are cut 90/10 (seeded) into train and val, a concept's two images on one side.
    """
    if held_out is None:
        by_concept = split_groups({h: h for h in hexcodes}, seed)
        return {(h, s): by_concept[h] for h in hexcodes for s in STYLES}
    by_concept = split_groups({h: h for h in hexcodes}, seed, STYLE_FRACTIONS, ("train", "val"))
    return {(h, s): "test" if s == held_out else by_concept[h] for h in hexcodes for s in STYLES}


def load_emoji(
    root: str | None = None,
    *,
    seed: int = 0,
    limit: int | None = None,
    skip_bad: bool = False,
    held_out: str | None = None,
) -> ItemDataset:
    """Build the emoji dataset: one group per (concept, style) image, holding its image and its captions.

    `held_out` None splits by concept (test concepts unseen in training); a style name tests on that
    style alone and trains on the other two.
    """
    if held_out is not None and held_out not in STYLES:
        raise DatasetError(f"emoji: unknown style {held_out!r} to hold out; styles: {', '.join(STYLES)}")
    base = Path(root or DEFAULT_ROOT)
    if not base.is_dir():
        raise DatasetError(f"emoji: data folder {base} not found; {INSTALL_HINT}")
    name = "emoji" if held_out is None else f"emoji-style-{held_out}"
    collector = ItemCollector(name, skip_bad)
    concepts = read_concepts(base / EMOJIBASE)
    images = style_images(base, concepts, collector)
    captions = build_captions(concepts)
    drawn = [c.hexcode for c in concepts if c.hexcode in images["google"]]
    split_of = assign_splits(drawn, seed, held_out)
    for h in drawn:
        for style in STYLES:
            if h not in images[style]:
                continue  # refused above (skip_bad): its group is dropped
            group, split = _group(h, style), split_of[(h, style)]
            collector.add(Item(split, group, group, "image", str(images[style][h])))
            for i, caption in enumerate(captions[h]):
                collector.add(Item(split, group, f"{group}#{i}", "text", caption))
    return ItemDataset(name, collector.items(), limit=limit, skipped=collector.skipped)


def load_emoji_style_google(root: str | None = None, **kw: Any) -> ItemDataset:
    """The style protocol testing on Google's drawings (training on Twitter's and OpenMoji's)."""
    return load_emoji(root, held_out="google", **kw)


def load_emoji_style_twitter(root: str | None = None, **kw: Any) -> ItemDataset:
    """The style protocol testing on Twitter's drawings (training on Google's and OpenMoji's)."""
    return load_emoji(root, held_out="twitter", **kw)


def load_emoji_style_openmoji(root: str | None = None, **kw: Any) -> ItemDataset:
    """The style protocol testing on OpenMoji's drawings (training on Google's and Twitter's)."""
    return load_emoji(root, held_out="openmoji", **kw)
