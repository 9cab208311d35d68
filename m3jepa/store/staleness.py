"""Staleness: were a complete store's rows encoded from the captions and media files the dataset has now?"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import zip_longest
from pathlib import Path

from m3jepa.store.manifest import Manifest, RowMeta, read_rows

SHOWN_IDS = 3  # sample ids named in a staleness message


def stale_reason(
    path: Path, found: Manifest, content: str, expected: Callable[[], Iterable[RowMeta]], content_hash: str
) -> str | None:
    """None when the store's content fingerprint equals `content` (the digest of the dataset's rows now),
    else one line saying what changed: how many rows, captions vs media, the first few ids. `expected()`
    gives the dataset's rows with their `content` fingerprints, in row order; it is read once, and only
    when the digests differ. A store that recorded no fingerprint (`found.content` None) is not judged.
    """
    if found.content is None or found.content == content:
        return None
    have = read_rows(path)
    unknown = f"{path} is stale: its content fingerprint differs from the dataset's (which rows: unknown)"
    if any(h.content is None for h in have):
        return unknown
    first: list[str] = []
    rows = captions = media = 0
    for h, e in zip_longest(have, expected()):
        if h is None or e is None:  # another row count: which rows changed cannot be said
            return unknown
        rows += 1
        if h.content == e.content:
            continue
        if (e.content or "").startswith("text:"):
            captions += 1
        else:
            media += 1
        if len(first) <= SHOWN_IDS:
            first.append(e.sample_id)
    kinds = ", ".join(
        text for n, text in ((captions, f"{captions} captions"), (media, f"{media} media files")) if n
    )
    method = ""
    if media and found.content_hash != content_hash:
        method = f"; media were fingerprinted by {found.content_hash}, this run asks for {content_hash}"
    shown = ", ".join(first[:SHOWN_IDS]) + (", ..." if len(first) > SHOWN_IDS else "")
    return (
        f"{path} is stale: {captions + media} of {rows} rows changed since it was written "
        f"({kinds}{method}; first: {shown})"
    )
