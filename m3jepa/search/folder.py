"""Galleries of your own files: a folder of images (or a file of captions, one a line) embedded by a
trained model and indexed, then kept up to date incrementally.

A rerun embeds only what changed: each indexed row records what its vector was computed from (the file's
path and its content fingerprint, as feature stores record theirs: size and mtime, or sha256), and the
vectors are kept in the index folder, so new files are embedded, removed ones dropped, changed ones
embedded again, and the rest reused. This is clip-retrieval's `inference` over a folder followed by
`index`, in one command (docs/search.md, "Your own images").
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from m3jepa.data.records import CONTENT_HASHES, Record, row_fingerprint
from m3jepa.progress import progress
from m3jepa.search.build import build, perturbed_queries
from m3jepa.search.errors import SearchError
from m3jepa.search.identity import ModelRef, model_ref, targets
from m3jepa.search.index import MANIFEST, ROWS, read_manifest, write_index
from m3jepa.search.media import media_roots, record_media
from m3jepa.search.plan import choose, parse_bytes

log = logging.getLogger(__name__)

SOURCES = "sources.jsonl"  # one line per indexed row: {"key", "fingerprint"}, what its vector came from
EMBEDDINGS = "embeddings.npy"  # (N, d) float32: the rows' vectors in index order, reused by the next update
BATCH = 32  # files per model call; progress moves once per batch
KINDS = {"images": "image", "texts": "text"}  # --images DIR / --texts FILE -> the gallery modality


def image_suffixes() -> frozenset[str]:
    """The file suffixes Pillow can decode (".png", ".jpg", ".webp", ...): "any decodable image"."""
    return frozenset(Image.registered_extensions())


@dataclass(frozen=True)
class Item:
    """One gallery row to be: its key (the path under the folder, or the caption's text identity), what the
    model embeds (a file path or the caption) and its content fingerprint."""

    key: str
    payload: str
    fingerprint: str
    sample_id: str


@dataclass
class Update:
    """What one `index --images/--texts` did: rows embedded, reused, dropped, and files skipped."""

    embedded: int = 0
    reused: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    other_files: int = 0  # files under the folder that are no image Pillow decodes (by suffix)

    def to_json(self) -> dict[str, Any]:
        return {"embedded": self.embedded, "reused": self.reused, "removed": self.removed,
                "skipped": len(self.skipped), "other_files": self.other_files}

    def line(self, rows: int, what: str) -> str:
        return (f"{rows} {what}: {self.embedded} embedded, {self.reused} reused, {self.removed} removed, "
                f"{len(self.skipped)} skipped")


# ---------------------------------------------------------------- what the gallery holds


def scan_images(root: Path, content_hash: str = "stat") -> tuple[list[Item], int]:
    """(every image file under `root`, recursively, in path order; how many other files there are).
    Hidden files and folders (a leading ".") are left out; symbolic links to folders are not followed, and
    a link to a file outside `root` is left out (counted with the other files): a gallery serves only
    what lies in its folder."""
    if not root.is_dir():
        raise SearchError(f"--images {root} is not a folder")
    suffixes = image_suffixes()
    inside = media_roots([root])[0]
    found, others = [], 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() not in suffixes or not path.resolve().is_relative_to(inside):
                others += 1
                continue
            key = path.relative_to(root).as_posix()
            found.append(Item(key, str(path.resolve()), _fingerprint(key, path, content_hash), key))
    return sorted(found, key=lambda i: i.key), others


def read_texts(path: Path) -> list[Item]:
    """One item per non-empty line of a UTF-8 text file; a caption's key is its text (with its
    occurrence), so moving lines around reuses their vectors."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SearchError(f"--texts {path} cannot be read as UTF-8 text ({e})") from None
    seen: dict[str, int] = {}
    out = []
    for n, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        fp = row_fingerprint(Record(0, text, text, "text", text))
        seen[fp] = seen.get(fp, 0) + 1
        out.append(Item(f"{fp}#{seen[fp]}", text, fp, f"{path.name}:{n}"))
    return out


def _fingerprint(key: str, path: Path, content_hash: str) -> str:
    return row_fingerprint(Record(0, key, key, "image", str(path)), content_hash)


# ---------------------------------------------------------------- the previous update


def _source_info(kind: str, source: Path, content_hash: str) -> dict[str, Any]:
    return {"kind": kind, "path": str(source.resolve()), "content_hash": content_hash}


def _previous(out: Path, ref: ModelRef, source: dict[str, Any],
              force: bool) -> dict[str, tuple[str, np.ndarray, dict[str, Any]]]:
    """key -> (fingerprint, vector, index row) of the rows `out` already indexes from this source with this
    model; empty for a new index (or with `force`). Anything else at `out` is refused without `force`."""
    if force or not out.exists():
        return {}
    manifest = read_manifest(out)  # a damaged manifest is refused, naming --force
    gallery = manifest.get("gallery")
    if not isinstance(gallery, dict) or {k: gallery.get(k) for k in source} != source:
        raise SearchError(f"{out} holds another index (not of {source['path']} as --{source['kind']} with "
                          f"--content-hash {source['content_hash']}); pass --force to replace it or choose "
                          "another --out")
    if manifest.get("model") != ref.to_json():
        other = (manifest.get("model") or {}).get("path")
        raise SearchError(f"{out} was built with another model ({other}); pass --force to embed everything "
                          "again with this one, or choose another --out")
    try:
        keys = [json.loads(line) for line in _verified(out, SOURCES, manifest).decode("utf-8").splitlines()]
        vectors = np.load(io.BytesIO(_verified(out, EMBEDDINGS, manifest)), allow_pickle=False)
        rows = [json.loads(line) for line in _verified(out, ROWS, manifest).decode("utf-8").splitlines()]
        if vectors.ndim != 2 or len(vectors) != len(keys) or vectors.dtype != np.float32 or \
                len(rows) != len(keys):
            raise ValueError(f"{EMBEDDINGS} is {vectors.dtype} {vectors.shape} for {len(keys)} rows")
        return {k["key"]: (k["fingerprint"], vectors[i], rows[i]) for i, k in enumerate(keys)}
    except (ValueError, KeyError, TypeError, OSError) as e:  # never trusted: embed everything again
        log.warning("%s: the previous vectors cannot be reused (%s); embedding every file again", out, e)
        return {}


def _verified(out: Path, name: str, manifest: dict[str, Any]) -> bytes:
    want = (manifest.get("files") or {}).get(name) or {}
    data = (out / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != want.get("sha256"):
        raise ValueError(f"{name} does not match its sha256 in {MANIFEST}")
    return data


# ---------------------------------------------------------------- embedding


def _embed(model: Any, modality: str, items: list[Item], what: str) -> tuple[dict[str, np.ndarray],
                                                                                list[tuple[str, str]]]:
    """key -> (d,) vector of each item the model could read, and (key, why) of those it could not."""
    vectors: dict[str, np.ndarray] = {}
    skipped: list[tuple[str, str]] = []
    with progress(len(items), desc=f"embedding {what}", unit=what) as bar:
        for lo in range(0, len(items), BATCH):
            batch = items[lo:lo + BATCH]
            for item, vec in _embed_batch(model, modality, batch, skipped):
                vectors[item.key] = vec
            bar.update(len(batch))
    return vectors, skipped


def _embed_batch(model: Any, modality: str, batch: list[Item],
                 skipped: list[tuple[str, str]]) -> list[tuple[Item, np.ndarray]]:
    """(item, (d,) vector) of each item of `batch` the model could read; a failed batch is tried item by
    item, so one bad file costs only itself (one warning line, counted in `skipped`)."""
    try:
        out = model.embed_target([i.payload for i in batch], modality=modality)  # (b, d)
        return list(zip(batch, out, strict=True))
    except ValueError as e:  # ApiError: a file that does not decode, named in the message
        if len(batch) == 1:
            why = str(e).splitlines()[0]
            log.warning("skipped %s: %s", batch[0].sample_id, why)
            skipped.append((batch[0].sample_id, why))
            return []
    return [pair for item in batch for pair in _embed_batch(model, modality, [item], skipped)]


# ---------------------------------------------------------------- the whole update


def index_folder(model: Any, kind: str, source: Path, out: Path, *, content_hash: str = "stat",
                 index_kind: str = "auto", memory_budget: str = "4GB", force: bool = False,
                 seed: int = 0) -> tuple[Path, Update]:
    """Index the images under folder `source` (kind "images") or the captions of file `source` ("texts")
    with `model` into `out`, reusing the vectors of rows `out` already holds unchanged."""
    if kind not in KINDS:
        raise SearchError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if content_hash not in CONTENT_HASHES:
        raise SearchError(f"--content-hash {content_hash} is not one of {', '.join(CONTENT_HASHES)}")
    modality = KINDS[kind]
    if modality not in targets(model.directions):
        raise SearchError(f"the model trains no direction into {modality} (its directions are "
                          f"{', '.join(model.directions)}), so it cannot search {kind}")
    update = Update()
    if kind == "images":
        items, update.other_files = scan_images(source, content_hash)
    else:
        items = read_texts(source)
    ref = model_ref(model)
    info = _source_info(kind, source, content_hash)
    before = _previous(out, ref, info, force)
    keep = {i.key: before[i.key][1] for i in items if i.key in before and before[i.key][0] == i.fingerprint}
    todo = [i for i in items if i.key not in keep]
    update.reused, update.removed = len(keep), len(set(before) - {i.key for i in items})
    fresh, update.skipped = _embed(model, modality, todo, kind)
    update.embedded = len(fresh)
    rows = [i for i in items if i.key in keep or i.key in fresh]
    if not rows:
        raise SearchError(f"no {'image Pillow can decode' if kind == 'images' else 'caption'} in {source}"
                          f"{f' ({len(update.skipped)} skipped)' if update.skipped else ''}")
    vectors = np.stack([keep[i.key] if i.key in keep else fresh[i.key] for i in rows]).astype(np.float32)
    media = _media(rows, before, keep, source) if kind == "images" else {}
    _write(out, ref, modality, rows, vectors, info, update, index_kind, memory_budget, seed, media)
    return out, update


def _media(items: list[Item], before: dict[str, tuple[str, np.ndarray, dict[str, Any]]],
           keep: dict[str, np.ndarray], source: Path) -> dict[str, dict[str, Any]]:
    """key -> {"media", "media_bytes", "media_sha256"} of each image row (search/media.py): a reused row
    keeps what the previous update recorded (its file is unchanged by its fingerprint), a new or changed
    one is read and hashed now."""
    roots = media_roots([source])
    out = {}
    for item in items:
        old = before.get(item.key)
        if item.key in keep and old is not None and old[2].get("media_sha256"):
            out[item.key] = {k: old[2][k] for k in ("media", "media_bytes", "media_sha256")}
            continue
        found, why = record_media(item.payload, roots)
        if found is None:
            log.warning("%s is indexed without its file (not served): %s", item.sample_id, why)
        out[item.key] = found or {"media": None}
    return out


def _write(out: Path, ref: ModelRef, modality: str, items: list[Item], vectors: np.ndarray,
           info: dict[str, Any], update: Update, index_kind: str, memory_budget: str, seed: int,
           media: dict[str, dict[str, Any]]) -> None:
    budget = parse_bytes(memory_budget)
    plan = choose(len(items), vectors.shape[1], index_kind, budget)
    queries = perturbed_queries(vectors, seed=seed)
    built = build(vectors, plan, queries, f"{len(queries)} perturbed gallery rows (random rows + Gaussian "
                  "noise, re-normalised): a folder has no query store", seed)
    images = modality == "image"
    rows = [{"row_id": n, "sample_id": i.sample_id, "group_id": i.sample_id,
             "caption": None if images else i.payload, **media.get(i.key, {"media": None})}
            for n, i in enumerate(items)]
    sources = "".join(json.dumps({"key": i.key, "fingerprint": i.fingerprint}, ensure_ascii=False) + "\n"
                      for i in items)
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    manifest = {
        "modality": modality, "model": ref.to_json(), "gallery": {**info, "last_update": update.to_json()},
        "media": {"source": f"the files under {info['path']}"} if images else
        {"source": None, "why": "text rows have no media file"},
        "captions": {"source": "the rows' own text"} if not images else
        {"source": None, "why": "a folder of images has no captions; the page shows each file's path"},
        "request": {"kind": index_kind, "memory_budget": parse_bytes(memory_budget)},
        "media_roots": media_roots([info["path"]]) if images else [],
    }
    write_index(out, built, rows, manifest, extra={SOURCES: sources.encode("utf-8"),
                                                   EMBEDDINGS: buffer.getvalue()})
    log.info("indexed %d %s rows of %s into %s", len(items), modality, info["path"], out)
