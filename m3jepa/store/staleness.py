"""Staleness: were a complete store's rows encoded from the captions and media files the dataset has now?"""

from __future__ import annotations

from pathlib import Path

from m3jepa.data.records import content_digest
from m3jepa.store.manifest import Manifest, RowMeta, read_rows

SHOWN_IDS = 3  # sample ids named in a staleness message


def stale_reason(path: Path, found: Manifest, expected: list[RowMeta], content_hash: str) -> str | None:
    """None when the store's content fingerprint equals that of `expected` (rows with their `content`
    fingerprints, the same sample ids), else one line saying what changed: how many rows, captions vs
    media, the first few ids. A store that recorded no fingerprint (`found.content` None) is not judged.
    """
    if found.content is None:
        return None
    if found.content == content_digest([r.content or "" for r in expected]):
        return None
    have = read_rows(path)
    if len(have) != len(expected) or any(h.content is None for h in have):
        return f"{path} is stale: its content fingerprint differs from the dataset's (which rows: unknown)"
    changed = [e for h, e in zip(have, expected, strict=True) if h.content != e.content]
    captions = sum((e.content or "").startswith("text:") for e in changed)
    media = len(changed) - captions
    kinds = ", ".join(
        text for n, text in ((captions, f"{captions} captions"), (media, f"{media} media files")) if n
    )
    method = ""
    if media and found.content_hash != content_hash:
        method = f"; media were fingerprinted by {found.content_hash}, this run asks for {content_hash}"
    first = ", ".join(e.sample_id for e in changed[:SHOWN_IDS]) + (
        ", ..." if len(changed) > SHOWN_IDS else ""
    )
    return (
        f"{path} is stale: {len(changed)} of {len(expected)} rows changed since it was written "
        f"({kinds}{method}; first: {first})"
    )
