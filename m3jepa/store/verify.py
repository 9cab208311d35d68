"""verify_store: recompute every shard checksum and check row counts, rows.jsonl and the manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from m3jepa.data.records import membership_fingerprint
from m3jepa.location import Location, StoreURL, listing, location
from m3jepa.store.backends import checksum, open_shard
from m3jepa.store.integrity import Listing, shard_problems
from m3jepa.store.manifest import (
    RAGGED_KINDS,
    ROWS,
    Manifest,
    RowMeta,
    ShardInfo,
    StoreError,
    load_manifest,
    parse_rows,
    plan_shards,
    rows_digest,
    shard_file,
    shard_stem,
)

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """Problems found in one store: store-wide ones, and per shard index."""

    path: Location
    problems: list[str] = field(default_factory=list)
    shard_problems: dict[int, list[str]] = field(default_factory=dict)
    shards_checked: int = 0
    rows: int = 0
    stale: str | None = None  # set by a check against the dataset (`m3jepa stores verify --dataset/--root`)
    notes: list[str] = field(default_factory=list)  # not problems: what could not be checked, and why

    @property
    def ok(self) -> bool:
        return not self.problems and not self.shard_problems and self.stale is None

    @property
    def status(self) -> str:
        if self.problems or self.shard_problems:
            return "CORRUPT"
        return "STALE" if self.stale else "OK"

    def text(self) -> str:
        lines = [f"{self.path}: {self.status} ({self.shards_checked} shards, {self.rows} rows checked)"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  store: {p}" for p in self.problems]
        for index in sorted(self.shard_problems):
            lines += [f"  shard {shard_stem(index)}: {p}" for p in self.shard_problems[index]]
        if self.stale:
            lines.append(f"  stale: {self.stale}")
            lines.append("  fix: re-encode it: rerun the `m3jepa encode` command that wrote it with --force")
        if self.problems or self.shard_problems:
            lines.append(
                "  fix: delete the store directory and rerun `m3jepa encode`, or delete the named "
                "shards and their .json sidecars, then rerun it to rewrite just those"
            )
        return "\n".join(lines)


def verify_store(path: str | Location, download: bool | None = None) -> VerifyReport:
    """Check a store end to end; `report.ok` is False on any problem.

    A local store is always read whole and every shard's sha256 recomputed. At a URL `download` decides:
    False (the default there) checks every shard file against the bucket's listing (present, recorded
    size, recorded MD5 where the listing's ETag is one) and rows.jsonl's sha256, without downloading the
    shards; True also downloads and hashes every byte, as locally."""
    report = VerifyReport(location(path))
    remote = isinstance(report.path, StoreURL)
    download = (not remote) if download is None else download
    try:
        manifest = load_manifest(report.path)
    except StoreError as e:
        report.problems.append(str(e))
        return report
    listed = listing(report.path) if remote else None
    if not manifest.complete:
        report.problems.append(
            "manifest is not complete: the writer has not finished; rerun `m3jepa encode` with the same "
            "settings"
        )
    _check_plan(manifest, report)
    for info in manifest.shards:
        problems = _check_shard(report.path, manifest, info, listed, download)
        report.shards_checked += 1
        report.rows += info.rows
        if problems:
            report.shard_problems[info.index] = problems
    _check_rows(report.path, manifest, report)
    if remote:
        report.notes.append(_remote_note(manifest, listed or {}, download))
    log.info("verified %s: %s", report.path, "ok" if report.ok else "corrupt")
    return report


def _check_plan(m: Manifest, report: VerifyReport) -> None:
    plan = plan_shards(m.rows, m.shard_size)
    have = [(s.index, s.row_start, s.row_end) for s in m.shards]
    if m.complete and have != plan:
        report.problems.append(
            f"manifest lists shards {have[:3]}... but {m.rows} rows in shards of "
            f"{m.shard_size} need {len(plan)} shards {plan[:3]}..."
        )


def _remote_note(m: Manifest, listed: Listing, download: bool) -> str:
    """What a check at a URL covered, precisely."""
    files = [(rel, md5) for s in m.shards for rel, (_, md5) in (s.files or {}).items()]
    by_md5 = sum(listed.get(rel) is not None and listed[rel].md5 is not None for rel, _ in files)
    if files:
        what = (f"{len(files)} shard files checked against the bucket's listing: present at their recorded "
                f"sizes, {by_md5} of them also by MD5 (their ETag)")
        if by_md5 < len(files):
            what += ("; the listing reports no MD5 for the others (a multipart or SSE-KMS upload's ETag is "
                     "none, and some backends list none): size only")
    else:
        what = ("the shards record no file MD5s (written before m3jepa recorded them): their chunk files "
                "were checked by size from the listing")
    if download:
        return f"{what}; every shard downloaded and its sha256 recomputed"
    return f"{what}; the shards' bytes were not downloaded (pass --download to hash every byte)"


def _check_shard(store: Location, m: Manifest, info: ShardInfo, listed: Listing | None = None,
                 download: bool = True) -> list[str]:
    if info.file != shard_file(info.index, m.format):
        return [f"file {info.file!r} is not the expected {shard_file(info.index, m.format)!r}"]
    problems = shard_problems(store, m, info, listed)  # presence, arrays, shapes, dtypes, chunk files
    if problems or not download:
        return problems
    handle = open_shard(m.format, store / info.file)
    try:
        return _check_arrays(handle.arrays, m, info)
    except Exception as e:  # a damaged chunk can raise anything from the backend library
        return [f"{info.file} cannot be read: {type(e).__name__}: {e}"]
    finally:
        handle.close()


def _check_arrays(arrays: dict, m: Manifest, info: ShardInfo) -> list[str]:
    problems = []
    if m.kind in RAGGED_KINDS:
        offsets = np.asarray(arrays["offsets"][:])
        if offsets[0] != 0 or offsets[-1] != arrays["tokens"].shape[0] or np.any(np.diff(offsets) < 0):
            problems.append(f"offsets do not rise from 0 to the {arrays['tokens'].shape[0]} token rows")
    digest, nbytes = checksum(arrays)
    if digest != info.sha256:
        problems.append(f"sha256 mismatch (manifest {info.sha256[:12]}…, data {digest[:12]}…)")
    if nbytes != info.nbytes:
        problems.append(f"{nbytes} bytes of arrays, manifest says {info.nbytes}")
    return problems


def _check_rows(store: Location, m: Manifest, report: VerifyReport) -> None:
    if not (store / ROWS).is_file():
        if m.complete:
            report.problems.append(f"{ROWS} is missing")
        return
    data = (store / ROWS).read_bytes()
    if m.rows_sha256 is None:
        report.notes.append(f"{ROWS} is not hashed in the manifest (an older store); re-encode with --force")
    elif rows_digest(data) != m.rows_sha256:
        report.problems.append(f"{ROWS} does not match the manifest's rows_sha256 (it changed on disk)")
    try:
        rows = parse_rows(data, store / ROWS)
    except StoreError as e:
        report.problems.append(str(e))
        return
    if len(rows) != m.rows:
        report.problems.append(f"{ROWS} has {len(rows)} lines, the manifest says {m.rows} rows")
        return
    bad_ids = [i for i, r in enumerate(rows) if r.row_id != i]
    if bad_ids:
        report.problems.append(f"{ROWS} is out of row order from line {bad_ids[0] + 1}")
    if membership_fingerprint(rows) != m.membership:  # type: ignore[arg-type]  (reads .sample_id)
        report.problems.append(f"{ROWS} sample ids do not match the manifest's membership fingerprint")
    _check_skipped(rows, m, report)


def _check_skipped(rows: list[RowMeta], m: Manifest, report: VerifyReport) -> None:
    invalid = {r.row_id for r in rows if not r.valid}
    skipped = {int(s["row_id"]) for s in m.skipped}
    if invalid != skipped:
        report.problems.append(
            f"{len(invalid)} rows are marked invalid but the manifest lists "
            f"{len(skipped)} skipped rows, or different ones"
        )
