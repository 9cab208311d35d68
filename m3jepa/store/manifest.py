"""The store contract: layout, manifest and shard records, row metadata, and shard planning."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3jepa.data.records import encoder_modality
from m3jepa.location import Location, StoreURL, location, write_text

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# A store at a URL (object storage, no atomic rename) keeps its start record here while it is written, and
# gets its manifest.json only at the end: the manifest is the commit marker (docs/feature-store.md).
WRITING = "writing.json"
ROWS = "rows.jsonl"
SHARDS = "shards"
FORMATS = {"zarr": ".zarr", "hdf5": ".h5"}  # format → shard file suffix
DTYPES = ("float16", "float32")
KINDS = ("pooled", "tokens", "prefix")  # prefix: hidden states entering the first tunable layer
RAGGED_KINDS = ("tokens", "prefix")  # kinds that store ragged (sum T_i, width) rows plus offsets

# The fields a resumed writer must agree on with the store it finds: any difference means the
# cached rows would mix two encodings, so it is refused rather than merged.
IDENTITY_FIELDS = (
    "dataset",
    "split",
    "modality",
    "membership",
    "rows",
    "encoder",
    "encoder_revision",
    "pooling",
    "layers",
    "dtype",
    "dim",
    "kind",
    "format",
    "shard_size",
    "layer_index",
    "tunable_layers",
    "state_dim",
    "state_grid",
)


class StoreError(ValueError):
    """A store that cannot be written or read as asked; the message says how to proceed."""


class StoreMismatchError(StoreError):
    """An existing store was written with settings that differ from the requested ones."""


class IncompleteStoreError(StoreError):
    """A store whose writer has not finished (or whose shards are missing)."""


@dataclass
class ShardInfo:
    """One committed shard: rows [row_start, row_end) in `file`, with a backend-independent checksum."""

    index: int
    row_start: int
    row_end: int
    file: str  # relative to the store directory, e.g. "shards/00000.zarr"
    sha256: str  # over the little-endian C-order bytes of features, tokens, offsets (in that order)
    nbytes: int  # raw array bytes hashed (not the size on disk)
    tokens: int | None = None  # total token rows, for kind = tokens
    # Every file of the shard as written, by path relative to the store: [size in bytes, MD5 hex of the
    # bytes]. A listing of a bucket reports both (S3's ETag of a single-part upload is that MD5), so a
    # store at a URL is checked against them without downloading it. None: a store written before.
    files: dict[str, list] | None = None

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardInfo:
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


@dataclass
class Manifest:
    """What a store holds and how it was made; `complete` is set only once every shard is committed."""

    dataset: str
    split: str
    modality: str
    membership: str  # records.membership_fingerprint of the split's rows
    rows: int
    encoder: str
    encoder_revision: str
    pooling: str
    layers: str
    dim: int
    dtype: str = "float16"
    kind: str = "pooled"
    format: str = "zarr"
    shard_size: int = 2048
    # kind = prefix only (None otherwise): the first tunable layer, how many layers are tunable, the
    # width of the stored states and, for convnets, the (H, W) grid their H*W token rows unflatten to
    layer_index: int | None = None
    tunable_layers: int | None = None
    state_dim: int | None = None
    state_grid: list[int] | None = None
    shards: list[ShardInfo] = field(default_factory=list)
    # sha256 of rows.jsonl's bytes, set at finalize and checked whenever the rows are read. None: a store
    # written before the field existed (still readable; a warning says how to refresh it).
    rows_sha256: str | None = None
    # sha256 over every row's content fingerprint (records.row_fingerprint), in row order, and how media
    # rows were fingerprinted ("stat": size and mtime, or "sha256"): a changed row makes the store stale.
    # None: not recorded (an older store, or one written without a dataset), so staleness is not checked.
    content: str | None = None
    content_hash: str | None = None
    # The resolved dataset folder, for datasets whose identity is their folder (FOLDER_DATASETS), else None.
    data_root: str | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {row_id, sample_id, reason}
    # Items the dataset dropped while loading (--skip-bad): they have no row, so no row id.
    dropped: list[dict[str, Any]] = field(default_factory=list)  # {sample_id, reason}
    complete: bool = False
    m3jepa_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StoreError(f"manifest dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.kind not in KINDS:
            raise StoreError(f"manifest kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.format not in FORMATS:
            raise StoreError(f"manifest format={self.format!r} is not one of {', '.join(FORMATS)}")
        if self.dim <= 0 or self.shard_size <= 0 or self.rows < 0:
            raise StoreError(
                f"manifest needs dim > 0, shard_size > 0, rows >= 0 (got {self.dim}, "
                f"{self.shard_size}, {self.rows})"
            )
        self._check_prefix_fields()
        if not self.m3jepa_version:
            from m3jepa import __version__

            self.m3jepa_version = __version__

    def _check_prefix_fields(self) -> None:
        fields = (self.layer_index, self.tunable_layers, self.state_dim)
        if self.kind != "prefix":
            if any(f is not None for f in (*fields, self.state_grid)):
                raise StoreError(f"manifest kind={self.kind!r} cannot carry prefix fields (layer_index, ...)")
            return
        if any(not isinstance(f, int) for f in fields) or self.layer_index < 0 or min(fields[1:]) <= 0:
            raise StoreError(
                f"manifest kind 'prefix' needs layer_index >= 0, tunable_layers > 0 and state_dim > 0 "
                f"(got {self.layer_index}, {self.tunable_layers}, {self.state_dim})"
            )
        if self.state_grid is not None:
            self.state_grid = [int(v) for v in self.state_grid]  # JSON lists and tuples compare equal
            if len(self.state_grid) != 2 or min(self.state_grid) <= 0:
                raise StoreError(f"manifest state_grid={self.state_grid!r} must be [H, W] with H, W > 0")

    @property
    def token_width(self) -> int:
        """The width of the ragged token rows: state_dim for prefix stores, dim for tokens stores."""
        return self.state_dim if self.kind == "prefix" else self.dim  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["shards"] = [s.to_json() for s in self.shards]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{where}: schema_version {version!r} is not supported (this m3jepa reads version "
                f"{SCHEMA_VERSION}); re-encode the store with this m3jepa, or use the m3jepa that wrote it"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["shards"] = [ShardInfo.from_json(s) for s in data.get("shards", [])]
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise StoreError(f"{where}: not a valid store manifest ({e})") from e

    def identity(self) -> dict[str, Any]:
        """The fields that decide whether two manifests describe the same encoding of the same rows."""
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}

    def dumps(self) -> str:
        # Sorted keys and no clock or absolute path: equal stores have equal bytes.
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class RowMeta:
    """One line of rows.jsonl: a row's ids, its caption (text rows only), and whether it was encoded."""

    row_id: int
    sample_id: str
    group_id: str
    text: str | None = None
    valid: bool = True
    content: str | None = None  # the row's content fingerprint (records.row_fingerprint); None: not recorded

    def dumps(self) -> str:
        # An explicit dict: dataclasses.asdict deep-copies and dominates finalize on large splits.
        d = {
            "group_id": self.group_id,
            "row_id": self.row_id,
            "sample_id": self.sample_id,
            "text": self.text,
            "valid": self.valid,
        }
        if self.content is not None:  # rows of stores written without fingerprints keep their old form
            d["content"] = self.content
        return json.dumps(d, sort_keys=True, ensure_ascii=False)


def rows_from_records(
    records: list[Any],
    skipped_row_ids: set[int] | frozenset[int] = frozenset(),
    content: list[str] | None = None,
) -> list[RowMeta]:
    """RowMeta for each `Record` (text rows keep their caption); rows in `skipped_row_ids` are invalid.

    `content` gives each row's content fingerprint (records.row_fingerprint), in row order.
    """
    if content is not None and len(content) != len(records):
        raise ValueError(f"{len(content)} content fingerprints for {len(records)} records")
    return [
        RowMeta(
            row_id=r.row_id,
            sample_id=r.sample_id,
            group_id=r.group_id,
            # question and answer rows are text too (encoded by a text encoder; docs/vqa.md)
            text=r.payload if encoder_modality(r.modality) == "text" else None,
            valid=r.row_id not in skipped_row_ids,
            content=None if content is None else content[i],
        )
        for i, r in enumerate(records)
    ]


def mismatches(asked: Manifest, found: Manifest) -> list[tuple[str, Any, Any]]:
    """(field, asked, found) for every identity field on which the two manifests differ."""
    a, f = asked.identity(), found.identity()
    return [(k, a[k], f[k]) for k in IDENTITY_FIELDS if a[k] != f[k]]


# ---------------------------------------------------------------- layout


_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def encoder_slug(encoder: str) -> str:
    """A filesystem-safe directory name for an encoder; a short hash keeps altered names unambiguous.

    "minilm-l6" stays "minilm-l6"; "hf:/models/My_Bert" becomes "hf-models-my_bert-<8 hex>", so two
    names that differ only in characters the slug drops (or in case) still get different directories.
    """
    slug = _UNSAFE.sub("-", encoder.lower()).strip("-")
    if not slug:
        slug = "encoder"
    if slug != encoder:
        slug += "-" + hashlib.sha256(encoder.encode("utf-8")).hexdigest()[:8]
    return slug


def _component(kind: str, value: str) -> str:
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\x00" in value:
        raise StoreError(f"{kind} {value!r} cannot be a directory name in a store path")
    return value


# Datasets whose identity is their folder (the loader needs --root): two folders are two datasets, so the
# store path's dataset component carries a short hash of the resolved folder.
FOLDER_DATASETS = ("jsonl", "imagefolder", "imagenet", "webdataset")


def resolved_root(data_root: str | Path) -> Path:
    """The absolute dataset folder (a file given as the root, like pairs.jsonl, stands for its folder).

    An fsspec URL (s3://bucket/cc3m, file:///data/x) names itself: it is kept as written, not resolved
    against the working directory.
    """
    if "://" in str(data_root):
        return Path(str(data_root))
    root = Path(data_root).expanduser().resolve()
    return root.parent if root.is_file() and root.suffix != ".tar" else root  # one .tar shard is itself


def dataset_dir(dataset: str, data_root: str | Path | None = None) -> str:
    """The dataset component of a store path: `dataset`, or `<dataset>-<8 hex of the folder>` for a
    folder dataset (FOLDER_DATASETS), so stores of two folders never share a directory."""
    _component("dataset", dataset)
    if dataset not in FOLDER_DATASETS:
        return dataset
    if data_root is None:
        raise StoreError(
            f"dataset {dataset!r} is named by its folder: give its root (--root, encode.root) to find its "
            "stores"
        )
    digest = hashlib.sha256(str(resolved_root(data_root)).encode("utf-8")).hexdigest()[:8]
    return f"{dataset}-{digest}"


def store_path(
    store_root: str | Path | StoreURL,
    dataset: str,
    split: str,
    modality: str,
    encoder: str,
    variant: str = "",
    data_root: str | Path | None = None,
) -> Location:
    """`<store_root>/<dataset-dir>/<split>/<modality>/<encoder-slug>[.<variant>]/`: one store per encoding.

    `variant` keeps other encodings of the same rows apart, e.g. "prefix3" for a prefix store. The
    dataset directory is `dataset_dir(dataset, data_root)`: a folder dataset needs `data_root`. A root that
    is a URL (s3://bucket/prefix) gives a StoreURL, a local one a Path.
    """
    name = encoder_slug(encoder) + (f".{_component('variant', variant)}" if variant else "")
    return (
        location(store_root)
        / dataset_dir(dataset, data_root)
        / _component("split", split)
        / _component("modality", modality)
        / name
    )


def prefix_variant(tunable_layers: int) -> str:
    """The store_path variant of a prefix store: its states enter the last `tunable_layers` layers."""
    return f"prefix{tunable_layers}"


def store_variant(kind: str, tunable_layers: int) -> str:
    """The store_path variant an encoding of this kind writes: prefix stores apart, others none."""
    return prefix_variant(tunable_layers) if kind == "prefix" else ""


def shard_stem(index: int) -> str:
    return f"{index:05d}"


def shard_file(index: int, fmt: str) -> str:
    """The shard's path relative to the store directory, e.g. 'shards/00003.h5'."""
    return f"{SHARDS}/{shard_stem(index)}{FORMATS[fmt]}"


def sidecar_file(index: int) -> str:
    return f"{SHARDS}/{shard_stem(index)}.json"


# ---------------------------------------------------------------- planning


def plan_shards(rows: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(index, row_start, row_end) of each shard: contiguous ranges of `shard_size` covering [0, rows)."""
    if shard_size <= 0 or rows < 0:
        raise ValueError(f"plan_shards needs rows >= 0 and shard_size > 0, got {rows}, {shard_size}")
    return [(i, start, min(start + shard_size, rows)) for i, start in enumerate(range(0, rows, shard_size))]


def assign_shards(plan: list[tuple[int, int, int]], rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """The planned shards rank `rank` of `world_size` writes: index % world_size == rank."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return [s for s in plan if s[0] % world_size == rank]


# ---------------------------------------------------------------- files


def load_manifest(store: str | Location, name: str = MANIFEST) -> Manifest:
    """The store's manifest (or, with `name` = WRITING, a store's start record at a URL); StoreError when
    it is missing or unreadable."""
    path = location(store) / name
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise StoreError(f"{store} is not a feature store (no {MANIFEST}); write one with `m3jepa encode`") \
            from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not valid JSON ({e}); delete the store directory and re-encode") from e
    return Manifest.from_json(data, where=str(path))


def save_manifest(store: str | Location, manifest: Manifest, name: str = MANIFEST) -> None:
    write_text(location(store) / name, manifest.dumps())


def read_rows(store: str | Location) -> list[RowMeta]:
    """The rows.jsonl lines of a store, in row order (StoreError naming the line when one is malformed)."""
    path = location(store) / ROWS
    return parse_rows(path.read_bytes(), path)


def rows_digest(data: bytes) -> str:
    """The manifest's rows_sha256 of rows.jsonl's bytes."""
    return hashlib.sha256(data).hexdigest()


def parse_rows(data: bytes, where: Location) -> list[RowMeta]:
    """RowMeta of each line of rows.jsonl bytes; a malformed line is a StoreError naming it."""
    out = []
    for n, line in enumerate(data.splitlines(), start=1):
        try:
            d = json.loads(line)
            out.append(
                RowMeta(
                    d["row_id"],
                    d["sample_id"],
                    d["group_id"],
                    d.get("text"),
                    bool(d["valid"]),
                    d.get("content"),
                )
            )
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(
                f"{where} line {n} is not a row ({type(e).__name__}: {e}); run `m3jepa stores verify "
                f"{where.parent}`"
            ) from None
    return out
