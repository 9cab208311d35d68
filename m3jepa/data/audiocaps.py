"""AudioCaps: YouTube clips (10 s, downloaded by the user) with captions grouped per clip."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from m3jepa.data.clotho import read_caption_csv
from m3jepa.data.media import safe_join
from m3jepa.data.records import DatasetError
from m3jepa.data.splits import SPLITS, Item, ItemCollector, ItemDataset

log = logging.getLogger(__name__)

COLUMNS = ("youtube_id", "start_time", "caption")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


def clip_id(youtube_id: str, start_time: str) -> str:
    """`<youtube_id>_<start_time>`: the group id and the audio file's stem (start_time as an integer)."""
    try:
        start = int(float(start_time))
    except ValueError:
        raise DatasetError(f"audiocaps: start_time {start_time!r} of {youtube_id} is not a number") from None
    return f"{youtube_id}_{start}"


def load_audiocaps(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ItemDataset:
    """AudioCaps under `root`: {train,val,test}.csv and audio/<split>/<youtube_id>_<start>.wav."""
    if root is None:
        raise DatasetError("audiocaps has no default location; pass --root (layout: docs/audio.md)")
    base = Path(root)
    collector = ItemCollector("audiocaps", skip_bad)
    found = 0
    for split in SPLITS:
        csv_path = base / f"{split}.csv"
        if not csv_path.is_file():
            log.info("audiocaps: %s not found; split %s is empty", csv_path, split)
            continue
        found += 1
        rows = read_caption_csv(csv_path, "audiocaps", "audiocap_id", COLUMNS)
        _add_split(collector, base, split, rows)
    if not found:
        raise DatasetError(f"audiocaps: no train.csv, val.csv or test.csv in {base}")
    return ItemDataset("audiocaps", collector.items(), limit=limit, skipped=collector.skipped)


def _add_split(collector: ItemCollector, base: Path, split: str, rows: list[dict]) -> None:
    captions: dict[str, list[tuple[str, str]]] = defaultdict(list)  # clip → [(audiocap_id, caption)]
    for row in rows:
        cap_id = (row.get("audiocap_id") or "").strip()
        clip = clip_id((row.get("youtube_id") or "").strip(), (row.get("start_time") or "").strip())
        caption = (row.get("caption") or "").strip()
        if not cap_id:
            raise DatasetError(f"audiocaps: {split}.csv has a row without audiocap_id (clip {clip})")
        if caption:
            captions[clip].append((cap_id, caption))
        else:
            collector.reject(cap_id, "empty caption")
    for clip, caps in captions.items():
        path = _find_audio(base, split, clip)
        if path is None:
            collector.reject(clip, f"no audio file audio/{split}/{clip}{{{','.join(AUDIO_EXTENSIONS)}}}",
                             group_id=clip)
            continue
        collector.add(Item(split, clip, clip, "audio", str(path)))
        for cap_id, caption in caps:
            collector.add(Item(split, clip, cap_id, "text", caption))


def _find_audio(base: Path, split: str, clip: str) -> Path | None:
    for ext in AUDIO_EXTENSIONS:
        path = safe_join(base, f"audio/{split}/{clip}{ext}", clip)
        if path.is_file():
            return path
    return None
