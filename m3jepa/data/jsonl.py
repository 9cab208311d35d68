"""Bring-your-own data: a folder holding `pairs.jsonl`, one image (or sound) and its captions a line."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3jepa.data.media import SVG_HINT, SVG_SUFFIXES, safe_join
from m3jepa.data.records import DatasetError
from m3jepa.data.splits import SPLITS, Item, ItemCollector, ItemDataset, split_groups

log = logging.getLogger(__name__)

FILE_NAME = "pairs.jsonl"
EXAMPLE = (
    '{"id": "cat1", "image": "img/cat1.png", "caption": ["A cat.", "A sleeping cat."], "split": "train"}'
)


@dataclass(frozen=True)
class Pair:
    """One validated line: id, media modality and relative path, captions, optional split, line number."""

    pair_id: str
    modality: str  # image | audio
    rel: str
    captions: tuple[str, ...]
    split: str | None
    line: int


def parse_line(text: str, where: str, line: int) -> Pair:
    """Validate one JSON line; anything malformed is a DatasetError naming `where` (file:line)."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise DatasetError(f"{where}: not valid JSON ({e}); each line must look like {EXAMPLE}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    pair_id = obj.get("id")
    if not isinstance(pair_id, str) or not pair_id:
        raise DatasetError(f"{where}: 'id' must be a non-empty string, got {pair_id!r}")
    media = [m for m in ("image", "audio") if m in obj]
    if len(media) != 1 or not isinstance(obj[media[0]], str):
        raise DatasetError(f"{where}: give exactly one of 'image' or 'audio' as a relative path string")
    captions = _captions(obj.get("caption"), where)
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise DatasetError(f"{where}: 'split' must be one of {', '.join(SPLITS)} (or absent), got {split!r}")
    return Pair(pair_id, media[0], obj[media[0]], captions, split, line)


def _captions(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return tuple(value)
    raise DatasetError(f"{where}: 'caption' must be a string or a list of strings, got {value!r}")


def read_pairs(path: Path) -> list[Pair]:
    """Every non-blank line of a pairs.jsonl file, validated; ids must be unique."""
    pairs, seen = [], {}
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is named by its number, not a traceback
        for n, raw in enumerate(f, start=1):
            text = _decoded(raw, path, n)
            if not text.strip():
                continue
            pair = parse_line(text, f"{path}:{n}", n)
            if pair.pair_id in seen:
                raise DatasetError(
                    f"{path}:{n}: id {pair.pair_id!r} already used on line {seen[pair.pair_id]}"
                )
            seen[pair.pair_id] = n
            pairs.append(pair)
    return pairs


def _decoded(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")  # a BOM on line 1 is harmless
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
            f"save {FILE_NAME} as UTF-8"
        ) from None


def load_jsonl(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ItemDataset:
    """Build a dataset from <root>/pairs.jsonl; lines without 'split' get a seeded 80/10/10 split by id."""
    if root is None:
        raise DatasetError(f"jsonl needs --root: a folder holding {FILE_NAME}, one line like {EXAMPLE}")
    base = Path(root)
    if base.is_file():  # accept the file itself as the root
        base = base.parent
    path = base / FILE_NAME
    if not path.is_file():
        raise DatasetError(f"jsonl: {path} not found; write one line per item like {EXAMPLE}")
    pairs = read_pairs(path)
    if not pairs:
        raise DatasetError(f"jsonl: {path} holds no items")
    seeded = split_groups({p.pair_id: p.pair_id for p in pairs if p.split is None}, seed)
    collector = ItemCollector("jsonl", skip_bad)
    for p in pairs:
        _collect(collector, base, p, p.split or seeded[p.pair_id], f"{path.name}:{p.line}")
    items = collector.items()
    log.info("jsonl: %d pairs, %d items, %d skipped", len(pairs), len(items), len(collector.skipped))
    return ItemDataset("jsonl", items, limit=limit, skipped=collector.skipped)


def _collect(collector: ItemCollector, base: Path, p: Pair, split: str, where: str) -> None:
    try:
        media = safe_join(base, p.rel, f"{where} id {p.pair_id!r}")
    except DatasetError as e:
        collector.reject(p.pair_id, str(e), group_id=p.pair_id)
        return
    if not media.is_file():
        collector.reject(p.pair_id, f"{where}: {p.modality} file {media} is missing", group_id=p.pair_id)
        return
    if p.modality == "image" and media.suffix.lower() in SVG_SUFFIXES:  # before any encoder loads
        collector.reject(p.pair_id, f"{where}: {media} is an SVG drawing; {SVG_HINT}", group_id=p.pair_id)
        return
    collector.add(Item(split, p.pair_id, p.pair_id, p.modality, str(media)))
    for k, caption in enumerate(p.captions):
        sample_id = f"{p.pair_id}#{k}"
        if caption.strip():
            collector.add(Item(split, p.pair_id, sample_id, "text", caption.strip()))
        else:
            collector.reject(sample_id, f"{where}: caption {k} is empty")
