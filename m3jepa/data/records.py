"""The record contract every dataset yields: ids that travel end to end, and a payload."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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
    # A member of a container (an image inside a tar shard): `payload` names it ("<shard>:<member>"),
    # `data` holds its bytes (None when the stream was read without them, e.g. to plan) and `stat` is
    # the container's size-and-mtime fingerprint, "stat:<size>:<mtime>", which stands for the row's own.
    data: bytes | None = field(default=None, repr=False, compare=False)
    stat: str | None = None

    def media(self) -> str | Blob:
        """What a preprocessor decodes: the payload, or a Blob of the bytes when the record carries them."""
        return self.payload if self.data is None else Blob(self.payload, self.data)


@dataclass(frozen=True)
class Blob:
    """An item's bytes read from a container (a tar member), named for messages by `name`."""

    name: str  # e.g. "shards/00000.tar:000000012.jpg"
    data: bytes = field(repr=False)

    def __str__(self) -> str:
        return self.name


class Dataset(Protocol):
    """A named dataset with deterministic, seeded splits.

    A dataset too large to list in memory also has `stream(split, modality) -> RecordStream` (below);
    stage 1 reads every dataset through `record_stream`, which wraps `records()` for those without one.
    """

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


@runtime_checkable
class RecordStream(Protocol):
    """One split and modality's records, read in row order without holding them all (docs/datasets.md).

    The order rule: row ids count 0, 1, 2, ... in the order `read` yields them, and that order is a
    function of the dataset's content and options (seed, limit) alone, never of who reads it (rank,
    world size, workers), so every process numbers every row alike.
    """

    def read(self, ranges: Sequence[tuple[int, int]] | None = None, *, data: bool = True) -> Iterator[Record]:
        """The records of the ascending, disjoint row ranges [lo, hi) (None: every row), in row order.

        data=False may leave `Record.data` None (ids, text and `stat` only): what planning needs.
        """
        ...

    def parts(self) -> list[tuple[int, int]] | None:
        """The row ranges of the stream's physical parts (tar shards), in order, or None when it has none.

        Processes that share the work take whole parts (m3jepa.encode.plan.shard_owners).
        """
        ...


class ListStream:
    """The stream of a list-based dataset: its `records()` list, sliced."""

    def __init__(self, records: Sequence[Record]):
        self.records = records

    def read(self, ranges: Sequence[tuple[int, int]] | None = None, *, data: bool = True) -> Iterator[Record]:
        """The records of `ranges` (None: all), from the list."""
        for lo, hi in ranges if ranges is not None else [(0, len(self.records))]:
            yield from self.records[lo:hi]

    def parts(self) -> None:
        """A list has no physical parts: shards go to ranks round-robin."""
        return None


def record_stream(dataset: Dataset, split: str, modality: str) -> RecordStream:
    """`dataset.stream(split, modality)` when the dataset streams, else its record list as a stream."""
    stream = getattr(dataset, "stream", None)
    return stream(split, modality) if stream is not None else ListStream(dataset.records(split, modality))


def membership_fingerprint(records: Iterable[Record]) -> str:
    """sha256 over the ordered sample ids: two stores of one split agree iff this agrees."""
    h = LineDigest()
    for r in records:
        h.add(r.sample_id)
    return h.hexdigest()


class LineDigest:
    """sha256 over strings each followed by a newline, fed one at a time (a stream's membership, content)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, text: str) -> None:
        self._h.update(text.encode("utf-8"))
        self._h.update(b"\n")

    def hexdigest(self) -> str:
        return self._h.hexdigest()


CONTENT_HASHES = ("stat", "sha256")  # encode.content_hash: how a media row's file is fingerprinted
TEXT_MODALITIES = ("text", "label")  # encoder modalities whose payload is the content itself


def row_fingerprint(record: Record, content_hash: str = "stat") -> str:
    """What a row's features were computed from, as a short string that changes when its input does.

    Text and label rows: "text:<16 hex of sha256(payload)>". A row whose payload is a file (an image or
    a sound): "stat:<size>:<mtime_ns>", or with `content_hash` "sha256" "sha256:<hex of its bytes>".
    A member of a container (`Record.stat` set, e.g. an image in a tar shard): the container's stat, or
    with "sha256" the sha256 of the member's own bytes (the record must carry them).
    Any other payload: "payload:<16 hex>". A path that no longer exists gives "missing".
    """
    payload = record.payload
    if encoder_modality(record.modality) in TEXT_MODALITIES:
        return "text:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    if record.stat is not None:
        if content_hash != "sha256":
            return record.stat
        if record.data is None:
            raise ValueError(f"{record.sample_id}: read the stream with data=True to hash its bytes")
        return "sha256:" + hashlib.sha256(record.data).hexdigest()
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


def content_digest(fingerprints: Iterable[str]) -> str:
    """sha256 over the rows' fingerprints in row order: the manifest's `content`."""
    h = LineDigest()
    for fp in fingerprints:
        h.add(fp)
    return h.hexdigest()
