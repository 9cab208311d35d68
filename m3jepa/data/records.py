"""The record contract every dataset yields: ids that travel end to end, and a payload."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

MODALITIES = ("image", "text", "audio", "label", "image2", "question", "answer")
# Store names that are not encoder modalities: a question or answer store is text, the second image of
# an NLVR2 pair is an image, so any encoder of that modality may fill it (docs/vqa.md).
ENCODER_MODALITY = {"question": "text", "answer": "text", "image2": "image"}


def encoder_modality(store_modality: str) -> str:
    """The encoder modality that fills a store: "question" → "text"; the name itself otherwise."""
    return ENCODER_MODALITY.get(store_modality, store_modality)


class DatasetError(ValueError):
    """A dataset that cannot be read as asked; the message names the item and the fix."""


class BadItemError(ValueError):
    """One input item (an image, a caption, a clip) that cannot be read or encoded; names the item."""

    def __init__(self, item: str, reason: str):
        super().__init__(f"{item}: {reason}")
        self.item = item
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One row of one modality of one split.

    `row_id` is the row's position in its split's record list (and so in its feature store);
    `group_id` links rows across modalities: an image and its five captions share a group id.
    """

    row_id: int
    sample_id: str  # unique within (dataset, split, modality), e.g. "animals/mammals/badger#0"
    group_id: str  # the image (or clip) this row belongs to
    modality: str  # one of MODALITIES
    payload: str  # a file path for image/audio, the text itself for text, the class name for label


class Dataset(Protocol):
    """A named dataset with deterministic, seeded splits."""

    name: str

    def splits(self) -> list[str]:
        """The split names this dataset has, e.g. ['train', 'val', 'test']."""
        ...

    def modalities(self) -> list[str]:
        """The modalities its records come in, e.g. ['image', 'text']."""
        ...

    def records(self, split: str, modality: str) -> list[Record]:
        """The records of one split and modality, in a deterministic order, row_id = position."""
        ...


def membership_fingerprint(records: Sequence[Record]) -> str:
    """sha256 over the ordered sample ids: two stores of one split agree iff this agrees."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.sample_id.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


CONTENT_HASHES = ("stat", "sha256")  # encode.content_hash: how a media row's file is fingerprinted
TEXT_MODALITIES = ("text", "label")  # encoder modalities whose payload is the content itself


def row_fingerprint(record: Record, content_hash: str = "stat") -> str:
    """What a row's features were computed from, as a short string that changes when its input does.

    Text and label rows: "text:<16 hex of sha256(payload)>". A row whose payload is a file (an image or
    a sound): "stat:<size>:<mtime_ns>", or with `content_hash` "sha256" "sha256:<hex of its bytes>".
    Any other payload: "payload:<16 hex>". A path that no longer exists gives "missing".
    """
    payload = record.payload
    if encoder_modality(record.modality) in TEXT_MODALITIES:
        return "text:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    try:
        st = os.stat(payload)
    except (OSError, ValueError):  # a vanished file, or a payload that is no path: hash the payload
        if os.sep in payload:
            return "missing"
        return "payload:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    if content_hash == "sha256":
        h = hashlib.sha256()
        with open(payload, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return "sha256:" + h.hexdigest()
    return f"stat:{st.st_size}:{st.st_mtime_ns}"


def content_digest(fingerprints: Sequence[str]) -> str:
    """sha256 over the rows' fingerprints in row order: the manifest's `content`."""
    h = hashlib.sha256()
    for fp in fingerprints:
        h.update(fp.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
