"""verify_store: recompute every shard checksum and check row counts, rows.jsonl and the manifest."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3jepa.data.records import membership_fingerprint
from m3jepa.store.backends import checksum, open_shard
from m3jepa.store.manifest import (
    RAGGED_KINDS,
    ROWS,
    Manifest,
    RowMeta,
    ShardInfo,
    StoreError,
    load_manifest,
    plan_shards,
    read_rows,
    shard_file,
    shard_stem,
)

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """Problems found in one store: store-wide ones, and per shard index."""

    path: Path
    problems: list[str] = field(default_factory=list)
    shard_problems: dict[int, list[str]] = field(default_factory=dict)
    shards_checked: int = 0
    rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.shard_problems

    def text(self) -> str:
        lines = [
            f"{self.path}: {'OK' if self.ok else 'CORRUPT'} ({self.shards_checked} shards, "
            f"{self.rows} rows checked)"
        ]
        lines += [f"  store: {p}" for p in self.problems]
        for index in sorted(self.shard_problems):
            lines += [f"  shard {shard_stem(index)}: {p}" for p in self.shard_problems[index]]
        if not self.ok:
            lines.append(
                "  fix: delete the store directory and rerun `m3jepa encode`, or delete the named "
                "shards and their .json sidecars, then rerun it to rewrite just those"
            )
        return "\n".join(lines)


def verify_store(path: str | Path) -> VerifyReport:
    """Check a store end to end; `report.ok` is False on any problem."""
    report = VerifyReport(Path(path))
    try:
        manifest = load_manifest(report.path)
    except StoreError as e:
        report.problems.append(str(e))
        return report
    if not manifest.complete:
        report.problems.append(
            "manifest is not complete: the writer has not finished; rerun `m3jepa encode` with the same "
            "settings"
        )
    _check_plan(manifest, report)
    for info in manifest.shards:
        problems = _check_shard(report.path, manifest, info)
        report.shards_checked += 1
        report.rows += info.rows
        if problems:
            report.shard_problems[info.index] = problems
    _check_rows(report.path, manifest, report)
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


def _check_shard(store: Path, m: Manifest, info: ShardInfo) -> list[str]:
    if info.file != shard_file(info.index, m.format):
        return [f"file {info.file!r} is not the expected {shard_file(info.index, m.format)!r}"]
    path = store / info.file
    if not path.exists():
        return [f"{info.file} is missing"]
    try:
        handle = open_shard(m.format, path)
    except Exception as e:  # a corrupt file can raise anything from the backend library
        return [f"{info.file} cannot be opened: {type(e).__name__}: {e}"]
    try:
        return _check_arrays(handle.arrays, m, info)
    except Exception as e:
        return [f"{info.file} cannot be read: {type(e).__name__}: {e}"]
    finally:
        handle.close()


def _check_arrays(arrays: dict, m: Manifest, info: ShardInfo) -> list[str]:
    problems = []
    names = {"features", "tokens", "offsets"} if m.kind in RAGGED_KINDS else {"features"}
    if set(arrays) != names:
        return [f"holds arrays {sorted(arrays)}, expected {sorted(names)}"]
    feats = arrays["features"]
    if tuple(feats.shape) != (info.rows, m.dim):
        problems.append(f"features shape {tuple(feats.shape)}, expected ({info.rows}, {m.dim})")
    if np.dtype(feats.dtype) != np.dtype(m.dtype):
        problems.append(f"features dtype {feats.dtype}, manifest says {m.dtype}")
    if m.kind in RAGGED_KINDS:
        if tuple(arrays["tokens"].shape[1:]) != (m.token_width,):
            problems.append(f"tokens shape {tuple(arrays['tokens'].shape)}, expected (T, {m.token_width})")
        offsets = np.asarray(arrays["offsets"][:])
        if offsets.shape != (info.rows + 1,) or offsets[0] != 0 or offsets[-1] != arrays["tokens"].shape[0]:
            problems.append(f"offsets {offsets.shape} do not span the {arrays['tokens'].shape[0]} token rows")
        if info.tokens != arrays["tokens"].shape[0]:
            problems.append(f"{arrays['tokens'].shape[0]} token rows, sidecar says {info.tokens}")
    digest, nbytes = checksum(arrays)
    if digest != info.sha256:
        problems.append(f"sha256 mismatch (manifest {info.sha256[:12]}…, data {digest[:12]}…)")
    if nbytes != info.nbytes:
        problems.append(f"{nbytes} bytes of arrays, manifest says {info.nbytes}")
    return problems


def _check_rows(store: Path, m: Manifest, report: VerifyReport) -> None:
    if not (store / ROWS).is_file():
        if m.complete:
            report.problems.append(f"{ROWS} is missing")
        return
    try:
        rows = read_rows(store)
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        report.problems.append(f"{ROWS} is not valid JSON lines ({type(e).__name__}: {e})")
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
