"""Stage-1 planning: the stores a config asks for, each with its expected manifest, from one pass over its
record stream (no weights read, no list of records held), and whether each is cached, stale or to encode."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from m3jepa.config import EncodeConfig
from m3jepa.data.records import (
    BadItemError,
    DatasetError,
    LineDigest,
    ListStream,
    Record,
    RecordStream,
    encoder_modality,
    record_stream,
    row_fingerprint,
)
from m3jepa.encoders.base import EncoderError, EncoderSpec
from m3jepa.location import Location
from m3jepa.store.manifest import FOLDER_DATASETS, Manifest, RowMeta, resolved_root, store_variant

log = logging.getLogger(__name__)

SKIP_HINT = "pass --skip-bad to write it as an invalid zero row and list it in the manifest's skipped"


@dataclass
class StoreJob:
    """One store to make: a split and modality, its record stream, its encoder spec and expected manifest.

    `stream` may be given as a list of records (wrapped in a ListStream).
    """

    split: str
    modality: str
    stream: RecordStream | Sequence[Record]
    spec: EncoderSpec
    path: Location  # a local folder or a StoreURL
    manifest: Manifest
    dropped: list[tuple[str, str]] = field(default_factory=list)  # dataset-level drops (--skip-bad)
    refused: dict[int, str] = field(default_factory=dict)  # row -> reason: rows refused before reading
    content_hash: str = "stat"  # how media rows are fingerprinted (records.row_fingerprint)
    # each row's content fingerprint, kept only for list datasets (which hold their records anyway), so a
    # sha256 run reads their files once; a stream recomputes them when the rows are written
    content: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stream, RecordStream):
            self.stream = ListStream(list(self.stream))

    def rows(self, skipped: set[int] | frozenset[int] = frozenset()) -> Iterator[RowMeta]:
        """The store's rows.jsonl rows, streamed in row order; rows in `skipped` are invalid."""
        media = encoder_modality(self.modality) != "text"
        data = media and self.content_hash == "sha256" and self.content is None
        for i, r in enumerate(self.stream.read(data=data)):  # type: ignore[union-attr]
            r = escaped(r) if r.row_id in self.refused else r
            fp = self.content[i] if self.content is not None else row_fingerprint(r, self.content_hash)
            yield RowMeta(r.row_id, r.sample_id, r.group_id, None if media else r.payload,
                          r.row_id not in skipped, fp)


@dataclass
class Scan:
    """What one pass over a store's records gives: row count, membership and content digests, refusals."""

    rows: int
    membership: str
    content: str
    refused: dict[int, str]
    fingerprints: list[str] | None  # kept for list streams only


def scan(cfg: EncodeConfig, split: str, modality: str, stream: RecordStream) -> Scan:
    """Read the stream once (bytes only when sha256 fingerprints need them), checking the order rule and
    every text row (text_problem); holds only the refused rows (and, for a list, its fingerprints)."""
    media = encoder_modality(modality) != "text"
    keep = [] if isinstance(stream, ListStream) else None
    members, content, refused, n = LineDigest(), LineDigest(), {}, 0
    for r in stream.read(data=media and cfg.content_hash == "sha256"):
        if r.row_id != n:
            raise DatasetError(f"{cfg.dataset} {split}/{modality}: {r.sample_id} has row id "
                               f"{r.row_id} at position {n}; a dataset numbers its rows 0, 1, 2, ... in turn")
        n += 1
        if not media and (why := text_problem(r.payload)) is not None:
            refused[r.row_id] = why
            if not cfg.skip_bad and len(refused) == 1:
                first = r.sample_id
            r = escaped(r)
        members.add(r.sample_id)
        fp = row_fingerprint(r, cfg.content_hash)
        content.add(fp)
        if keep is not None:
            keep.append(fp)
    if refused and not cfg.skip_bad:
        row = min(refused)
        raise BadItemError(f"{cfg.dataset} {split}/{modality} {first}",
                           f"{refused[row]}; fix the text in the dataset, or {SKIP_HINT} "
                           f"({len(refused)} such row(s) in {split}/{modality})")
    return Scan(n, members.hexdigest(), content.hexdigest(), refused, keep)


def text_problem(text: str) -> str | None:
    """Why `text` cannot be tokenized, or None: a lone surrogate (U+D800..U+DFFF) is no character."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        # ascii() so the message itself can be printed: a lone surrogate cannot be written to a terminal
        return (f"text holds a lone surrogate {ascii(text[e.start])} at character {e.start}, which is not a "
                f"character (an undecodable byte read with errors='surrogateescape', or a JSON \\u escape)")


def escaped(r: Record) -> Record:
    """A refused text row as it is written to rows.jsonl: its lone surrogates spelt out (e.g. `\\udc80`).

    Without --skip-bad such a row stops the run at planning; with it the row keeps its row id (row ids and
    membership unchanged) and is refused by the reader: a zero row, valid = false, listed in skipped.
    """
    return replace(r, payload=r.payload.encode("utf-8", "backslashreplace").decode("utf-8"))


def plan_jobs(cfg: EncodeConfig, dataset: Any) -> list[StoreJob]:
    """The stores a config asks for, grouped by modality so each encoder is loaded once; no weights read."""
    from m3jepa.store import store_path

    splits = dataset.splits() if cfg.splits == ["all"] else list(cfg.splits)
    # a folder dataset is named by its folder (store_path), and the manifest says which folder it was
    data_root = str(resolved_root(cfg.root)) if cfg.dataset in FOLDER_DATASETS and cfg.root else None
    jobs = []
    for modality in modalities(cfg, dataset):
        spec = encoder_spec(cfg, modality, dataset)
        prefix = _prefix_fields(cfg, spec)
        for split in splits:
            stream = record_stream(dataset, split, modality)
            found = scan(cfg, split, modality, stream)
            manifest = Manifest(
                dataset=cfg.dataset, split=split, modality=modality,
                membership=found.membership, rows=found.rows, encoder=spec.name,
                encoder_revision=spec.revision, pooling=spec.pooling, layers=spec.layers, dim=spec.dim,
                dtype=cfg.dtype, kind=cfg.kind, format=cfg.format, shard_size=cfg.shard_size, **prefix,
                content=found.content, content_hash=cfg.content_hash, data_root=data_root,
            )
            variant = store_variant(cfg.kind, cfg.tunable_layers)
            path = store_path(cfg.store_root, cfg.dataset, split, modality, spec.name, variant, cfg.root)
            jobs.append(StoreJob(split, modality, stream, spec, path, manifest, refused=found.refused,
                                 content_hash=cfg.content_hash, content=found.fingerprints))
    dropped = list(getattr(dataset, "skipped", []))  # after the scans: a stream finds its drops reading
    for job in jobs:
        job.dropped = list(dropped)
    return jobs


def _prefix_fields(cfg: EncodeConfig, spec: EncoderSpec) -> dict[str, Any]:
    # kind = prefix: where the encoder is cut, from its config alone (no weights are read at planning)
    if cfg.kind != "prefix":
        return {}
    from m3jepa.encoders.layers import stack_geometry

    g = stack_geometry(spec, cfg.tunable_layers)
    return {"layer_index": g.layer_index, "tunable_layers": g.tunable_layers, "state_dim": g.state_dim,
            "state_grid": list(g.state_grid) if g.state_grid else None}


def modalities(cfg: EncodeConfig, dataset: Any) -> list[str]:
    """The modalities to encode: those asked for (checked), or with "all" every one an encoder exists for."""
    if cfg.modalities != ["all"]:
        from m3jepa.data import closest

        has = dataset.modalities()
        for m in cfg.modalities:
            if m not in has:
                raise DatasetError(f"{cfg.dataset} has no modality {m!r}{closest(m, has)}; "
                                   f"pass --modality with some of {', '.join(has)} (comma-separated), or all")
        return list(cfg.modalities)
    # "all" means every modality the dataset has and an encoder exists for (tuxpaint's sounds need
    # --audio-encoder; there is no default audio encoder offline).
    out = [m for m in dataset.modalities() if _encoder_name(cfg, m) is not None]
    left = [m for m in dataset.modalities() if m not in out]
    if left:
        log.info("--modality all: skipping %s (no encoder; pass --%s-encoder)", ", ".join(left), left[0])
    return out


def _encoder_name(cfg: EncodeConfig, modality: str) -> str | None:
    from m3jepa.data import DEFAULT_ENCODERS

    # a question/answer store takes encode.text_encoder when set (there is no question_encoder key)
    chosen = getattr(cfg, f"{modality}_encoder", None)
    chosen = chosen or getattr(cfg, f"{encoder_modality(modality)}_encoder", None)
    return chosen or DEFAULT_ENCODERS.get(cfg.dataset, {}).get(modality)


def encoder_spec(cfg: EncodeConfig, modality: str, dataset: Any) -> EncoderSpec:
    """The registry spec of the encoder that fills `modality`'s stores (no weights read)."""
    from m3jepa.encoders import get_encoder_spec

    name = _encoder_name(cfg, modality)
    if name is None:
        raise DatasetError(f"{cfg.dataset} has no default {modality} encoder; pass --{modality}-encoder")
    spec = get_encoder_spec(name)
    if spec.modality == "label":  # a label encoder's dimension is the dataset's class count
        from m3jepa.encoders.onehot import bind_to_dataset

        spec = bind_to_dataset(spec, dataset)
    if spec.modality != encoder_modality(modality):  # a question store takes a text encoder (docs/vqa.md)
        raise EncoderError(
            f"encoder {name!r} encodes {spec.modality}, not {encoder_modality(modality)}; pass a "
            f"{encoder_modality(modality)} encoder with --{encoder_modality(modality)}-encoder"
        )
    return spec


def cache_state(job: StoreJob, cfg: EncodeConfig) -> bool | str:
    """True: complete and current (cached); False: to encode (absent, unfinished or --force); a str: the
    line saying why a complete store is stale (its rows' captions or media files changed)."""
    from m3jepa.store import is_complete
    from m3jepa.store.manifest import load_manifest
    from m3jepa.store.staleness import stale_reason

    if not is_complete(job.path, job.manifest):
        return False
    found = load_manifest(job.path)
    if found.content is None:
        log.warning("%s was written without content fingerprints, so edited captions or replaced media "
                    "files are not detected; rerun with --force to re-encode it and record them", job.path)
        return True
    return stale_reason(job.path, found, job.manifest.content, job.rows, cfg.content_hash) or True
