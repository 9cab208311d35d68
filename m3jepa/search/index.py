"""The index folder (manifest.json, index.faiss, rows.jsonl): written atomically, opened with checks.

Every file is covered: manifest.json by its own `manifest_sha256` (the sha256 of its other fields, so every
field that changes what a search means, the modality, the model, the stores, the media roots, is checked),
and each other file by the sha256 and size the manifest records.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from m3jepa.files import refused_writes
from m3jepa.search.build import Built, set_search_params
from m3jepa.search.errors import SearchError
from m3jepa.search.identity import ModelRef, file_sha256

FORMAT = "m3jepa-search-index"
FORMAT_VERSION = 2  # 2: manifest_sha256, and each media row's size and sha256 (search/media.py)
SELF_HASH = "manifest_sha256"
MANIFEST = "manifest.json"
INDEX = "index.faiss"
ROWS = "rows.jsonl"
METRIC = "inner_product"  # on L2-normalised vectors: cosine similarity
REQUIRED = ("format", "format_version", "kind", "factory", "params", "search_params", "dim", "rows",
            "metric", "modality", "recall@10", "recall", "files")
ROW_KEYS = ("row_id", "sample_id", "group_id", "caption", "media", "media_bytes", "media_sha256")


@dataclass(frozen=True)
class Hit:
    """One search result: rank 1 is the best; score is the inner product (cosine) with the query."""

    rank: int
    score: float
    row_id: int  # the row of the embedded store (and of the stage-1 store it came from)
    sample_id: str
    group_id: str
    caption: str | None
    media: str | None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("rank", "score", "row_id", "sample_id", "group_id",
                                               "caption", "media")}


def write_index(out: Path, built: Built, rows: list[dict[str, Any]], info: dict[str, Any],
                extra: dict[str, bytes] | None = None) -> Path:
    """Write `built` with its `rows` metadata (one per index position) and manifest `info` to `out`,
    through a temporary folder renamed into place (a reader never sees half an index). `extra` files
    (a folder gallery's vectors and sources, search/folder.py) go in too, their sha256 in the manifest."""
    if built.index.ntotal != len(rows):
        raise SearchError(f"{out}: {built.index.ntotal} vectors but {len(rows)} row records")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    text = "".join(json.dumps({k: r.get(k) for k in ROW_KEYS}, sort_keys=True, ensure_ascii=False) + "\n"
                   for r in rows)
    need = built.plan.est_bytes + len(text.encode("utf-8")) + sum(len(d) for d in (extra or {}).values())
    kept = f"the index at {out} as it was" if out.exists() else ""
    # a full disk: one line, the partial folder removed, the previous index untouched (m3jepa/files.py)
    with refused_writes(out.parent, need=need, remove=[tmp], removed=f"the partial {tmp.name}", kept=kept):
        _write_files(tmp, built, text, info, extra)
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)  # aside, then the new one in: a kill between leaves one of them whole
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return out


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The sha256 of a manifest's fields but SELF_HASH: its JSON with keys sorted and no whitespace."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode("utf-8")).hexdigest()


def _write_files(tmp: Path, built: Built, text: str, info: dict[str, Any],
                 extra: dict[str, bytes] | None) -> None:
    tmp.mkdir(parents=True)
    faiss.write_index(built.index, str(tmp / INDEX))
    (tmp / ROWS).write_text(text, encoding="utf-8")
    for name, data in (extra or {}).items():
        (tmp / name).write_bytes(data)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": built.plan.kind,
        "factory": built.plan.factory, "params": built.plan.params, "search_params": built.search_params,
        "dim": int(built.index.d), "rows": int(built.index.ntotal), "metric": METRIC,
        "recall@10": built.recall["value"], "recall": built.recall, "build_seconds": round(built.seconds, 2),
        "estimated_bytes": built.plan.est_bytes, "choice": built.plan.reason,
        "files": {INDEX: {"sha256": file_sha256(tmp / INDEX), "bytes": (tmp / INDEX).stat().st_size},
                  ROWS: {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                         "bytes": len(text.encode("utf-8"))},
                  **{name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                     for name, data in (extra or {}).items()}},
        **info,
    }
    manifest[SELF_HASH] = manifest_digest(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_manifest(path: Path) -> dict[str, Any]:
    """IDX/manifest.json, checked for the format and the keys the index needs."""
    where = path / MANIFEST
    if not path.is_dir():
        raise SearchError(f"{path} is not an index folder; build one with `m3jepa index`")
    try:
        m = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SearchError(f"{path} is not an index (no {MANIFEST}); build one with `m3jepa index`") from None
    except (OSError, ValueError) as e:
        raise SearchError(f"{where} is corrupt ({type(e).__name__}); rebuild with `m3jepa index --force`") \
            from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SearchError(f"{where} is not an m3jepa search index manifest (format {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise SearchError(f"{where}: format version {m.get('format_version')!r}; this m3jepa reads "
                          f"{FORMAT_VERSION}; rebuild with `m3jepa index --force`")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise SearchError(f"{where} lacks {', '.join(missing)}; rebuild with `m3jepa index --force`")
    if m.get(SELF_HASH) != manifest_digest(m):
        raise SearchError(f"{where} was changed after the index was built (it no longer matches its "
                          f"{SELF_HASH}: a field such as its modality, model or stores would change what a "
                          "search means); rebuild with `m3jepa index --force`")
    return m


class SearchIndex:
    """An opened index: faiss over the gallery's valid rows, with their metadata; safe for concurrent
    `search` calls (faiss CPU searches only read the index; the search setting is fixed at open)."""

    def __init__(self, path: Path, manifest: dict[str, Any], index: Any, rows: list[dict[str, Any]]):
        self.path = path
        self._manifest = manifest
        self._index = index
        self._rows = rows

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> SearchIndex:
        """Open IDX, checking its manifest, the files' sizes (and sha256 with `verify`), and that the
        index, rows.jsonl and manifest agree on the row count and width."""
        path = Path(path)
        m = read_manifest(path)
        rows_bytes = _checked_bytes(path, ROWS, m, verify=True)  # small: always hashed
        _checked_bytes(path, INDEX, m, verify=verify, read=False)
        rows = _parse_rows(rows_bytes, path / ROWS)
        try:
            index = faiss.read_index(str(path / INDEX))
        except RuntimeError as e:
            raise SearchError(f"{path / INDEX} cannot be read by faiss ({str(e).splitlines()[0]}); "
                              "rebuild with `m3jepa index --force`") from None
        if not (index.ntotal == m["rows"] == len(rows)):
            raise SearchError(f"{path}: the index holds {index.ntotal} vectors, rows.jsonl {len(rows)} "
                              f"lines, the manifest says {m['rows']}; rebuild with `m3jepa index --force`")
        if index.d != m["dim"]:
            raise SearchError(f"{path}: the index has width {index.d}, the manifest says {m['dim']}")
        try:
            set_search_params(index, m["search_params"])
        except (ValueError, RuntimeError, AttributeError) as e:
            raise SearchError(f"{path / MANIFEST}: search_params {m['search_params']} do not fit a "
                              f"{m['kind']} index ({e})") from None
        return cls(path, m, index, rows)

    @property
    def modality(self) -> str | None:
        """The gallery modality (None for an index built from bare vectors, e.g. the benchmark's)."""
        return self._manifest.get("modality")

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def rows(self) -> int:
        return int(self._manifest["rows"])

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))  # a copy: callers cannot change the index's view

    @property
    def media_roots(self) -> list[str]:
        """The folders its rows' media files were recorded in (search/media.py); empty without media."""
        roots = self._manifest.get("media_roots") or []
        return [str(r) for r in roots] if isinstance(roots, list) else []

    @property
    def model(self) -> ModelRef | None:
        """The model the index serves (None when built without one)."""
        data = self._manifest.get("model")
        return None if data is None else ModelRef.from_json(data, self.path / MANIFEST)

    def row(self, i: int) -> dict[str, Any]:
        """The metadata of index position i: row_id, sample_id, group_id, caption, media."""
        if not 0 <= i < len(self._rows):
            raise IndexError(f"row {i} is not in [0, {len(self._rows)})")
        return dict(self._rows[i])

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The top-k hits of each query; queries (Q, dim) float32, L2-normalised (cosine = inner product)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise SearchError(f"queries must be (Q, {self.dim}) for {self.path}; got {tuple(q.shape)}")
        if not np.isfinite(q).all():
            raise SearchError("queries hold NaN or infinite values")
        if k < 1:
            raise SearchError(f"k must be at least 1, got {k}")
        scores, positions = self._index.search(q, min(k, self.rows))  # (Q, k) each
        return [[self._hit(r + 1, float(s), int(p)) for r, (s, p) in enumerate(zip(srow, prow, strict=True))
                 if p >= 0] for srow, prow in zip(scores, positions, strict=True)]

    def _hit(self, rank: int, score: float, position: int) -> Hit:
        r = self._rows[position]
        return Hit(rank, score, r["row_id"], r["sample_id"], r["group_id"], r["caption"], r["media"])

    def __repr__(self) -> str:
        kind = self._manifest["kind"]
        return f"SearchIndex({self.path}, {kind}, {self.rows} x {self.dim}, {self.modality})"


def _checked_bytes(path: Path, name: str, m: dict[str, Any], verify: bool, read: bool = True) -> bytes:
    want = m["files"].get(name) if isinstance(m["files"], dict) else None
    file = path / name
    if not isinstance(want, dict) or not {"sha256", "bytes"} <= want.keys():
        raise SearchError(f"{path / MANIFEST} records no size and sha256 for {name}; rebuild the index")
    if not file.is_file():
        raise SearchError(f"{file} is missing; rebuild with `m3jepa index --force`")
    if file.stat().st_size != want["bytes"]:
        raise SearchError(f"{file} has {file.stat().st_size} bytes, the manifest says {want['bytes']}; "
                          "rebuild with `m3jepa index --force`")
    data = file.read_bytes() if read else b""
    if verify:
        digest = hashlib.sha256(data).hexdigest() if read else file_sha256(file)
        if digest != want["sha256"]:
            raise SearchError(f"{file} does not match its sha256 in the manifest; rebuild with "
                              "`m3jepa index --force`")
    return data


def _parse_rows(data: bytes, where: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(data.splitlines(), start=1):
        try:
            d = json.loads(line)
            rows.append({k: d[k] for k in ROW_KEYS})
        except (ValueError, KeyError, TypeError) as e:
            raise SearchError(f"{where} line {n} is not a row ({type(e).__name__}: {e})") from None
    return rows
