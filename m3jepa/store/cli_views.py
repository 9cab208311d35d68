"""Text views for `m3jepa stores list` and `m3jepa stores inspect`."""

from __future__ import annotations

import contextlib
import os

from m3jepa.location import Location, StoreURL, listing, location
from m3jepa.store.manifest import MANIFEST, WRITING, load_manifest, shard_stem, sidecar_file
from m3jepa.store.reader import list_stores

COLUMNS = (
    "dataset",
    "split",
    "modality",
    "encoder",
    "kind",
    "rows",
    "dim",
    "dtype",
    "format",
    "complete",
    "size",
    "root",
)


UNFINISHED = "NO (rerun `m3jepa encode` with the same settings to finish)"


def disk_size(path: Location) -> int:
    """Bytes on disk under `path` (files only, symlinks not followed); at a URL, from one listing."""
    if isinstance(path, StoreURL):
        return sum(e.size for e in listing(path).values())
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a writer may be renaming files right now
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def list_view(root: str | Location) -> str:
    """A table of every store under `root`, one line each."""
    root = location(root)
    stores = list_stores(root)
    if not stores:
        return f"no stores under {root} (write some with `m3jepa encode --store-root {root}`)"
    rows = [COLUMNS]
    for path, m in stores:
        rows.append(
            (
                m.dataset,
                m.split,
                m.modality,
                m.encoder,
                m.kind,
                str(m.rows),
                str(m.dim),
                m.dtype,
                m.format,
                "yes" if m.complete else "NO",
                human_bytes(disk_size(path)),
                m.data_root or "",  # folder datasets: which folder (their directory has its hash)
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def inspect_view(path: str | Location) -> str:
    """A readable summary of one store's manifest (at a URL, of its start record while it is written)."""
    path = location(path)
    writing = isinstance(path, StoreURL) and not (path / MANIFEST).is_file() and (path / WRITING).is_file()
    m = load_manifest(path, WRITING if writing else MANIFEST)
    planned = -(-m.rows // m.shard_size)
    have = set(listing(path)) if isinstance(path, StoreURL) else None
    committed = sum((sidecar_file(i) in have) if have is not None else (path / sidecar_file(i)).exists()
                    for i in range(planned))
    lines = [
        f"store      {path}",
        f"data       {m.dataset} / {m.split} / {m.modality}: {m.rows} rows (membership {m.membership[:12]}…)",
        *([f"root       {m.data_root}"] if m.data_root else []),
        f"encoder    {m.encoder} @ {m.encoder_revision}",
        f"latent     {m.kind}, dim {m.dim}, {m.dtype}, pooling {m.pooling}, layers {m.layers}",
        f"format     {m.format}, {planned} shards of up to {m.shard_size} rows, {committed} committed",
        f"complete   {'yes' if m.complete else UNFINISHED}",
        f"size       {human_bytes(disk_size(path))} on disk",
        f"written by m3jepa {m.m3jepa_version}, schema {m.schema_version}",
    ]
    if m.kind in ("tokens", "prefix") and m.shards:
        tokens = sum(s.tokens or 0 for s in m.shards)
        lines.append(f"tokens     {tokens} token rows ({tokens / max(m.rows, 1):.1f} per row)")
    if m.kind == "prefix":
        grid = f", grid {m.state_grid[0]}x{m.state_grid[1]}" if m.state_grid else ""
        lines.append(
            f"prefix     states entering layer {m.layer_index} ({m.tunable_layers} tunable layers), "
            f"state dim {m.state_dim}{grid}"
        )
    lines.append(f"skipped    {len(m.skipped)} rows")
    if m.dropped:
        lines.append(f"dropped    {len(m.dropped)} items left out while loading the dataset")
    for s in m.skipped[:10]:
        lines.append(f"  row {s['row_id']} {s['sample_id']}: {s['reason']}")
    if len(m.skipped) > 10:
        lines.append(f"  … and {len(m.skipped) - 10} more")
    for s in m.shards[:3]:
        lines.append(
            f"shard {shard_stem(s.index)}  rows [{s.row_start}, {s.row_end})  sha256 {s.sha256[:16]}…"
        )
    if len(m.shards) > 3:
        lines.append(f"  … {len(m.shards) - 3} more shards")
    return "\n".join(lines)
