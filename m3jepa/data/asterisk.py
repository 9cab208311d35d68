"""Asterisk core sound prompts (English, Allison): speech clips with their transcripts."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

from m3jepa.data.media import safe_join
from m3jepa.data.records import DatasetError
from m3jepa.data.splits import Item, ItemCollector, ItemDataset, caption_cluster, natural_key, split_groups

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/asterisk/sounds/en_US_f_Allison"
DEBIAN_TRANSCRIPTS = "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
TRANSCRIPT_NAMES = ("core-sounds-en.txt", "core-sounds-en.txt.gz")
INSTALL_HINT = "apt-get install asterisk-core-sounds-en asterisk-core-sounds-en-wav"
# `silence/N` are N seconds of (dithered) silence: no speech to pair with text, and load_audio refuses them
EXCLUDED_FOLDERS = ("silence",)


def transcript_file(root: Path) -> Path:
    """`<root>/core-sounds-en.txt[.gz]` if present, else the Debian doc copy; DatasetError if neither."""
    for name in TRANSCRIPT_NAMES:
        if (root / name).is_file():
            return root / name
    if Path(DEBIAN_TRANSCRIPTS).is_file():
        return Path(DEBIAN_TRANSCRIPTS)
    raise DatasetError(
        f"asterisk: no transcript file ({' or '.join(TRANSCRIPT_NAMES)}) in {root} nor {DEBIAN_TRANSCRIPTS}; "
        f"install it with `{INSTALL_HINT}`"
    )


def read_transcripts(path: Path) -> dict[str, str]:
    """`name: transcript` lines → {name: transcript}; `;` comments and blank lines skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    out: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        name, sep, text = line.partition(": ")
        if not sep or not name.strip():
            raise DatasetError(f"asterisk: {path}:{number}: expected `name: transcript`, got {line[:60]!r}")
        if name in out:
            raise DatasetError(f"asterisk: {path}:{number}: prompt {name!r} is listed twice")
        out[name.strip()] = text.strip()
    return out


def scan_wavs(root: Path) -> set[str]:
    """Prompt names (`digits/1`, `agent-pass`) of every `.wav` under root, without extension."""
    found = set()
    for dirpath, _dirs, names in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        found.update((rel_dir / n[: -len(".wav")]).as_posix() for n in names if n.endswith(".wav"))
    return found


def load_asterisk(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ItemDataset:
    """One clip and one transcript per prompt; seeded 80/10/10 split, identical transcripts on one side."""
    base = Path(root or DEFAULT_ROOT)
    if not base.is_dir():
        raise DatasetError(f"asterisk: prompt folder {base} not found; install it with `{INSTALL_HINT}` "
                           "or pass --root")
    transcripts = read_transcripts(transcript_file(base))
    wavs = {w for w in scan_wavs(base) if w.split("/")[0] not in EXCLUDED_FOLDERS}
    names = sorted((n for n in transcripts if n in wavs), key=natural_key)
    log.info(
        "asterisk: %d prompts with audio and transcript; ignored %d transcripts without a .wav, "
        "%d .wav files without a transcript, and the %s folder(s)",
        len(names), sum(1 for n in transcripts if n not in wavs and n.split("/")[0] not in EXCLUDED_FOLDERS),
        len(wavs - set(transcripts)), ", ".join(EXCLUDED_FOLDERS),
    )
    if not names:
        raise DatasetError(f"asterisk: no .wav prompt with a transcript under {base}")
    collector = ItemCollector("asterisk", skip_bad)
    kept = {}
    for name in names:
        if not transcripts[name]:
            collector.reject(name, "empty transcript", group_id=name)
        else:
            kept[name] = transcripts[name]
    split_of = split_groups({n: caption_cluster(t) for n, t in kept.items()}, seed)
    for name, text in kept.items():
        try:
            path = safe_join(base, f"{name}.wav", name)
        except DatasetError as e:
            collector.reject(name, str(e), group_id=name)
            continue
        collector.add(Item(split_of[name], name, name, "audio", str(path)))
        collector.add(Item(split_of[name], name, name, "text", text))
    return ItemDataset("asterisk", collector.items(), limit=limit, skipped=collector.skipped)
