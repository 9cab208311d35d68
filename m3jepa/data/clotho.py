"""Clotho (v2) audio captioning: one clip, five captions, official development/validation/evaluation split."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from m3jepa.data.media import safe_join
from m3jepa.data.records import DatasetError
from m3jepa.data.splits import Item, ItemCollector, ItemDataset

log = logging.getLogger(__name__)

# our split name → Clotho's name (CSV suffix and audio folder)
CLOTHO_SPLITS = {"train": "development", "val": "validation", "test": "evaluation"}
CAPTION_COLUMNS = tuple(f"caption_{i}" for i in range(1, 6))


def read_caption_csv(
    path: Path, dataset: str, id_column: str, caption_columns: tuple[str, ...]
) -> list[dict[str, str]]:
    """Rows of a caption CSV as dicts; DatasetError naming the file if a needed column is missing."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: some copies carry a BOM
            reader = csv.DictReader(f)
            missing = [c for c in (id_column, *caption_columns) if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{dataset}: {path} lacks column(s) {', '.join(missing)}; "
                                   f"it has {', '.join(reader.fieldnames or [])}")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{dataset}: cannot read {path}: {e}") from e


def load_clotho(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ItemDataset:
    """Clotho under `root`: clotho_captions_<split>.csv beside <split>/ audio folders (see docs/audio.md)."""
    if root is None:
        raise DatasetError("clotho has no default location; pass --root (see docs/audio.md for the layout)")
    base = Path(root)
    collector = ItemCollector("clotho", skip_bad)
    found = 0
    for split, name in CLOTHO_SPLITS.items():
        csv_path = base / f"clotho_captions_{name}.csv"
        if not csv_path.is_file():
            log.info("clotho: %s not found; split %s is empty", csv_path, split)
            continue
        found += 1
        rows = read_caption_csv(csv_path, "clotho", "file_name", CAPTION_COLUMNS)
        _add_split(collector, base, split, name, rows)
    if not found:
        raise DatasetError(f"clotho: no clotho_captions_{{development,validation,evaluation}}.csv in {base}")
    return ItemDataset("clotho", collector.items(), limit=limit, skipped=collector.skipped)


def _add_split(collector: ItemCollector, base: Path, split: str, folder: str, rows: list[dict]) -> None:
    seen: set[str] = set()
    for row in rows:
        file_name = (row.get("file_name") or "").strip()
        if not file_name:
            collector.reject(f"{folder}/<row without file_name>", "empty file_name")
            continue
        if file_name in seen:
            raise DatasetError(f"clotho: {file_name!r} appears twice in clotho_captions_{folder}.csv")
        seen.add(file_name)
        try:
            path = safe_join(base, f"{folder}/{file_name}", file_name)
        except DatasetError as e:
            collector.reject(file_name, str(e), group_id=file_name)
            continue
        if not path.is_file():
            collector.reject(file_name, f"audio file {path} is missing", group_id=file_name)
            continue
        collector.add(Item(split, file_name, file_name, "audio", str(path)))
        for i, column in enumerate(CAPTION_COLUMNS):
            caption = (row.get(column) or "").strip()
            if caption:
                collector.add(Item(split, file_name, f"{file_name}#{i}", "text", caption))
            else:
                collector.reject(f"{file_name}#{i}", f"empty {column}")
