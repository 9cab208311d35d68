"""`--dataset webdataset`: image–text pairs in img2dataset's WebDataset tar shards, read as a stream.

A shard `00000.tar` holds, per sample, `{key}.jpg` (or .jpeg/.png/.webp), `{key}.txt` and `{key}.json`
(img2dataset also writes `00000.parquet` and `00000_stats.json` beside it; they are not read). The rules
(docs/datasets.md, webdataset):
- image: the first of the sample's jpg, jpeg, png, webp members; caption: its .txt (UTF-8), or with
  `caption_field` that field of its .json; sample id and group id: the key.
- split: with `train_shards`/`val_shards`/`test_shards` the split whose shards hold the sample; else with
  `split_field` that field of its .json ("train", "val" or "test"); else `hash_split(key, seed)`.
- rows: in shard order, then member order; `limit` keeps the first N samples of each split.
- a bad sample (no image, no or empty caption, a traversal-looking or repeated key, an unreadable .json,
  no split) is a DatasetError naming shard and key, or with skip_bad dropped and listed in `skipped`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from m3jepa.data.records import DatasetError, Record
from m3jepa.data.splits import SKIP_HINT, SPLITS
from m3jepa.data.tars import (
    Member,
    expand_shards,
    is_url,
    list_members,
    read_members,
    shard_stat,
    split_name,
    unsafe_key,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference
FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test of the seeded hash split
MODALITIES = ["image", "text"]


def hash_split(key: str, seed: int) -> str:
    """The split of a sample by its key alone: u = the first 8 bytes of sha256("<seed>\\0<key>") read as a
    big-endian integer, over 2**64; train when u < 0.8, val when u < 0.9, else test. A key keeps its split
    whatever else the shards hold, so shards can be added without moving anyone."""
    u = int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big") / 2**64
    return "train" if u < FRACTIONS[0] else "val" if u < FRACTIONS[0] + FRACTIONS[1] else "test"


@dataclass(frozen=True)
class Sample:
    """One sample of a shard as read: its key, chosen image member (and bytes), caption, split, problem."""

    shard: str
    key: str
    image: str | None  # the image member's name
    data: bytes | None  # its bytes, when read
    caption: str | None
    split: str | None
    problem: str | None  # why the sample is bad, or None


class WebDataset:
    """img2dataset's shards as a dataset whose records are streamed (stream()); records() lists them."""

    name = "webdataset"

    def __init__(self, shards: dict[str, list[str]] | list[str], *, seed: int = 0, limit: int | None = None,
                 skip_bad: bool = False, caption_field: str | None = None, split_field: str | None = None):
        if limit is not None and limit <= 0:
            raise DatasetError(f"webdataset: limit={limit} must be a positive number of samples")
        self.shards = shards  # one list for all splits, or each split's own
        self.seed, self.limit, self.skip_bad = seed, limit, skip_bad
        self.caption_field, self.split_field = caption_field, split_field
        self._skipped: dict[tuple[str, str], str] = {}  # (shard, key) -> reason, in the order found
        self._streams: dict[str, _SplitIndex] = {}

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(key, "<shard>: <reason>") of every sample dropped so far (with skip_bad), in the order found."""
        return [(key, f"{shard}: {why}") for (shard, key), why in self._skipped.items()]

    def splits(self) -> list[str]:
        """train, val, test; with per-split shard patterns, the splits given."""
        return list(self.shards) if isinstance(self.shards, dict) else list(SPLITS)

    def modalities(self) -> list[str]:
        return list(MODALITIES)

    def stream(self, split: str, modality: str) -> WdsStream:
        """The records of one split and modality, read shard by shard (RecordStream)."""
        if split not in self.splits():
            raise DatasetError(f"webdataset has no split {split!r}; it has {', '.join(self.splits())}")
        if modality not in MODALITIES:
            raise DatasetError(f"webdataset has no {modality!r} records; it has {', '.join(MODALITIES)}")
        index = self._streams.setdefault(split, _SplitIndex(self, split))
        return WdsStream(index, modality)

    def records(self, split: str, modality: str) -> list[Record]:
        """Every record of a split and modality in a list, image bytes included: for small sets only."""
        return list(self.stream(split, modality).read())

    # ------------------------------------------------------------ samples

    def _tars(self, split: str) -> list[str]:
        return self.shards[split] if isinstance(self.shards, dict) else self.shards

    def samples(self, shard: str, split: str, data: bool) -> Iterator[Sample]:
        """The good samples of `split` in one shard, in member order; bad ones raise or are dropped."""
        needs_json = self.caption_field is not None or self.split_field is not None
        if data:
            members = read_members(shard)
        else:
            def small(name: str) -> bool:
                ext = split_name(name)[1]
                return ext == "txt" or (needs_json and ext == "json")

            members = list_members(shard, small)
        seen: set[str] = set()
        for key, files, twice in _grouped(members):
            sample = self._sample(shard, key, files, split, twice or key in seen)
            seen.add(key)
            if sample.split is not None and sample.split != split:
                continue  # another split's sample (a bad one is that split's to report)
            if sample.problem is not None:
                self._reject(sample)
                continue
            yield sample

    def _sample(self, shard: str, key: str, files: dict[str, Member], split: str, repeated: bool) -> Sample:
        twice = "its key is used twice in this shard (a repeated member, or a key split apart)"
        problem = unsafe_key(key) or (twice if repeated else None)
        image = next((files[e] for e in IMAGE_EXTS if e in files), None)
        meta, bad_json = _json(files.get("json"))
        caption, why = self._caption(files.get("txt"), meta, bad_json)
        sample_split, why_split = self._split_of(key, meta, bad_json, split)
        problem = (problem or ("no image member (.jpg, .jpeg, .png or .webp)" if image is None else None)
                   or why or why_split)
        return Sample(shard, key, image.name if image else None, image.data if image else None, caption,
                      sample_split, problem)

    def _caption(self, txt: Member | None, meta: dict | None,
                 bad_json: str | None) -> tuple[str | None, str | None]:
        if self.caption_field is not None:
            if bad_json:
                return None, bad_json
            value = (meta or {}).get(self.caption_field)
            if not isinstance(value, str):
                return None, f"its .json has no string field {self.caption_field!r} (the caption)"
            text = value
        else:
            if txt is None or txt.data is None:
                return None, "no caption (.txt member)"
            try:
                text = txt.data.decode("utf-8")
            except UnicodeDecodeError as e:
                return None, f"its .txt caption is not UTF-8 (byte {e.start + 1})"
        if not text.strip():
            return None, "its caption is empty"
        return text.strip(), None

    def _split_of(self, key: str, meta: dict | None, bad_json: str | None,
                  split: str) -> tuple[str | None, str | None]:
        if isinstance(self.shards, dict):
            return split, None  # the split's own shards
        if self.split_field is None:
            return hash_split(key, self.seed), None
        if bad_json:
            return None, bad_json
        value = (meta or {}).get(self.split_field)
        if value not in SPLITS:
            return None, (f"its .json field {self.split_field!r} is {value!r}, not one of "
                          f"{', '.join(SPLITS)}")
        return value, None

    def _reject(self, sample: Sample) -> None:
        if not self.skip_bad:
            raise DatasetError(f"webdataset: {sample.shard} {sample.key}: {sample.problem}; {SKIP_HINT}")
        if (sample.shard, sample.key) not in self._skipped:
            self._skipped[(sample.shard, sample.key)] = sample.problem or ""


def _grouped(members: Iterator[Member]) -> Iterator[tuple[str, dict[str, Member], bool]]:
    """Consecutive members of one key as (key, {extension: member}, repeated), by webdataset's key rule; a
    member without an extension is left out, as webdataset does; `repeated`: an extension came twice."""
    key: str | None = None
    files: dict[str, Member] = {}
    twice = False
    for m in members:
        k, ext = split_name(m.name)
        if k is None:
            continue
        if k != key:
            if key is not None:
                yield key, files, twice
            key, files, twice = k, {}, False
        twice = twice or ext in files
        files[ext] = m
    if key is not None:
        yield key, files, twice


def _json(member: Member | None) -> tuple[dict | None, str | None]:
    if member is None or member.data is None:
        return None, "no .json member" if member is None else None
    try:
        value = json.loads(member.data)
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"its .json is not valid JSON ({e})"
    if not isinstance(value, dict):
        return None, "its .json is not a JSON object"
    return value, None


class _SplitIndex:
    """One split's shards and, once read through, how many rows each holds (for seeking and for ranks)."""

    def __init__(self, dataset: WebDataset, split: str):
        self.dataset, self.split = dataset, split
        self.tars = dataset._tars(split)
        self.counts: list[int] | None = None  # rows per shard, known after one full pass

    def samples(self, data: bool,
                wanted: Sequence[tuple[int, int]] | None = None) -> Iterator[tuple[int, str, Sample]]:
        """(row, shard stat, sample) of the split in row order; with `wanted` (ascending row ranges, and
        counts known) shards holding none of them are not opened and reading stops after the last."""
        limit = self.dataset.limit
        if wanted is not None and self.counts is None:
            self.count()
        counts, row = [], 0
        end = wanted[-1][1] if wanted else None
        for i, tar in enumerate(self.tars):
            if limit is not None and row >= limit:
                counts.append(0)
                continue
            if wanted is not None:
                first, n = row, self.counts[i]  # type: ignore[index]
                if end is not None and first >= end:
                    return
                if not any(lo < first + n and first < hi for lo, hi in wanted):
                    row += n
                    continue
            stat = shard_stat(tar)
            if wanted is not None:  # which process read which tar shard (tests/test_webdataset.py checks)
                log.debug("webdataset %s: reading %s (rows %d..%d)", self.split, tar, row,
                          row + self.counts[i] - 1)  # type: ignore[index]
            before = row
            for sample in self.dataset.samples(tar, self.split, data):
                if limit is not None and row >= limit:
                    break
                yield row, stat, sample
                row += 1
            counts.append(row - before)
        if wanted is None:
            self.counts = counts

    def count(self) -> list[int]:
        """Rows per shard (a listing pass, reading no image bytes, the first time)."""
        if self.counts is None:
            for _ in self.samples(data=False):
                pass
        return self.counts  # type: ignore[return-value]


class WdsStream:
    """A RecordStream over one split and modality of a WebDataset."""

    def __init__(self, index: _SplitIndex, modality: str):
        self.index, self.modality = index, modality

    def read(self, ranges: Sequence[tuple[int, int]] | None = None, *, data: bool = True) -> Iterator[Record]:
        """Records of the row ranges (None: all) in row order; images with their bytes when `data`."""
        image = self.modality == "image"
        ranges = list(ranges) if ranges is not None else None
        k = 0
        for row, stat, s in self.index.samples(data=data and image, wanted=ranges):
            if ranges is not None:
                while k < len(ranges) and row >= ranges[k][1]:
                    k += 1
                if k == len(ranges):
                    return
                if row < ranges[k][0]:
                    continue
            if image:
                yield Record(row, s.key, s.key, "image", f"{s.shard}:{s.image}", data=s.data, stat=stat)
            else:
                yield Record(row, s.key, s.key, "text", s.caption or "")

    def parts(self) -> list[tuple[int, int]]:
        """The row range of each shard of the split, in order (one listing pass the first time)."""
        out, row = [], 0
        for n in self.index.count():
            out.append((row, row + n))
            row += n
        return out


def load_webdataset(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False,
    caption_field: str | None = None, split_field: str | None = None, train_shards: str | None = None,
    val_shards: str | None = None, test_shards: str | None = None,
) -> WebDataset:
    """img2dataset's shards under `root` (a folder, a brace pattern, a .tar, or an fsspec URL of one);
    with per-split patterns, each split's shards (relative to `root`, which then names the folder)."""
    if root is None:
        raise DatasetError("webdataset needs --root: a folder of img2dataset's .tar shards, a brace pattern "
                           "like shards/{00000..00099}.tar, or an fsspec URL such as s3://bucket/cc3m")
    per_split = {s: p for s, p in zip(SPLITS, (train_shards, val_shards, test_shards), strict=True) if p}
    if per_split and split_field:
        raise DatasetError("webdataset: give either per-split shards (encode.train_shards, ...) or "
                           "encode.split_field, not both: each decides the split")
    if per_split:
        shards: dict[str, list[str]] | list[str] = {s: expand_shards(p, root) for s, p in per_split.items()}
    else:
        shards = expand_shards(root)
    where = root if is_url(root) else "local"
    log.info("webdataset: %s shards (%s)", sum(map(len, shards.values())) if isinstance(shards, dict)
             else len(shards), where)
    return WebDataset(shards, seed=seed, limit=limit, skip_bad=skip_bad, caption_field=caption_field,
                      split_field=split_field)
