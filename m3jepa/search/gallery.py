"""`m3jepa index`: an embedded store's valid rows, their media paths and real held-out queries, indexed."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from m3jepa.search.build import N_QUERIES, PERTURB_NOISE, build, perturbed_queries
from m3jepa.search.embed import read_sidecar
from m3jepa.search.errors import SearchError
from m3jepa.search.identity import ModelRef, model_ref, sources_into, store_checksum
from m3jepa.search.index import read_manifest, write_index
from m3jepa.search.media import media_roots, record_media
from m3jepa.search.plan import choose, parse_bytes
from m3jepa.store import FeatureStore, open_store

log = logging.getLogger(__name__)

MEDIA_MODALITIES = ("image", "audio")  # rows whose dataset payload is a file path
NORM_TOLERANCE = 1e-3  # embedded rows are L2-normalised float32; a row further off was not written by embed


def default_out(embedded: Path) -> Path:
    return embedded.with_name(embedded.name + ".index")


def index_store(embedded: Path, out: Path, model: Any, *, kind: str = "auto", memory_budget: str = "4GB",
                force: bool = False, seed: int = 0) -> tuple[Path, bool]:
    """Index the embedded store at `embedded` (written by `embed_store` with `model`) into `out`;
    returns (out, cached). An index of the same store, model and request is reused."""
    return index_stores([embedded], out, model, kind=kind, memory_budget=memory_budget, force=force,
                        seed=seed)


def index_stores(embedded: list[Path], out: Path, model: Any, *, kind: str = "auto",
                 memory_budget: str = "4GB", force: bool = False, seed: int = 0) -> tuple[Path, bool]:
    """Index one or several embedded stores of one modality (a dataset's splits together: `--split all`)
    into `out`. With several, a row's `row_id` counts through them in the order given (each store's rows
    offset by the rows before it), and the manifest lists them under `stores`."""
    if not embedded:
        raise SearchError("no embedded store to index")
    ref = model_ref(model)
    stores, infos = [], []
    for path in embedded:
        store, sidecar = open_store(path), read_sidecar(path)
        if ModelRef.from_json(sidecar["model"], path) != ref:
            raise SearchError(f"{path} was embedded with {sidecar['model'].get('path')} (other weights) than "
                              f"the model given ({ref.path}); embed it again with this model")
        stores.append(store)
        infos.append({"path": str(path.resolve()), "checksum": store_checksum(store.manifest),
                      "split": store.manifest.split, "source": sidecar["source"]})
    modalities = sorted({s.manifest.modality for s in stores})
    if len(modalities) != 1:
        raise SearchError(f"the stores hold different modalities ({', '.join(modalities)}); index one "
                          "modality at a time")
    request = {"kind": kind, "memory_budget": parse_bytes(memory_budget)}
    store_key = {"store": infos[0]} if len(infos) == 1 else {"stores": infos}
    if _cached(out, store_key, ref, request, force):
        return out, True
    vectors, rows, notes, offset, roots = [], [], [], 0, set()
    for store in stores:
        v, row_ids = _valid_rows(store)  # (N, d) float32, (N,) int64
        vectors.append(v)
        records, note, store_roots = _row_records(model, store, row_ids, offset)
        rows += records
        notes.append(note)
        roots |= set(store_roots)
        offset += len(store.rows.valid)
    gallery = np.concatenate(vectors) if len(vectors) > 1 else vectors[0]  # (N, d)
    queries, query_source = _held_out_queries(model, stores[0], gallery, seed)
    plan = choose(len(rows), gallery.shape[1], kind, request["memory_budget"])
    log.info("building %s over %d rows (%s)", plan.factory, len(rows), plan.reason)
    built = build(gallery, plan, queries, query_source, seed)
    info = {"modality": stores[0].manifest.modality, "model": ref.to_json(), **store_key,
            "media": notes[0][0] if len(notes) == 1 else [n[0] for n in notes],
            "captions": notes[0][1] if len(notes) == 1 else [n[1] for n in notes], "request": request,
            "media_roots": sorted(roots)}
    return write_index(out, built, rows, info), False


def _row_records(model: Any, store: FeatureStore, row_ids: np.ndarray, offset: int
                 ) -> tuple[list[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]], list[str]]:
    """(the index rows of a store's valid rows: ids, the caption (its own, or its group's) and the media
    file (its real path, size and sha256: search/media.py); where the media paths and captions came from;
    the media roots)."""
    media, media_note = media_paths(model.cfg, store)
    captions, caption_note = group_captions(model, store)
    roots = _dataset_roots(model.cfg, store, media) if media is not None else []
    table = store.rows
    rows, outside = [], []
    for r in row_ids:
        row = {"row_id": offset + int(r), "sample_id": table.sample_ids[r], "group_id": table.group_ids[r],
               "caption": table.texts[r] if table.texts[r] is not None else captions.get(table.group_ids[r]),
               "media": None}
        if media is not None and media[r] is not None:
            found, why = record_media(media[r], roots)
            row.update(found or {})
            if why:
                outside.append(why)
        rows.append(row)
    if outside:
        log.warning("%d media files of %s are indexed without their file (not served): %s%s", len(outside),
                    store.path, outside[0], "; ..." if len(outside) > 1 else "")
        media_note = {**media_note, "not_recorded": len(outside)}
    return rows, (media_note, caption_note), roots


def _dataset_roots(cfg: Any, store: FeatureStore, media: list[str | None]) -> list[str]:
    """The folders a dataset gallery's media may be served from: the dataset's folder where the config or
    the store names it, else the deepest folder holding every media file."""
    root = cfg.encode.root or store.manifest.data_root
    if root:
        return media_roots([root])
    paths = [os.path.realpath(m) for m in media if m is not None]
    if not paths:
        return []
    common = os.path.commonpath(paths)
    return media_roots([common if os.path.isdir(common) else os.path.dirname(common)])


def _cached(out: Path, store_key: dict, ref: ModelRef, request: dict, force: bool) -> bool:
    if not out.exists() or force:
        return False
    try:
        found = read_manifest(out)  # checked: an edited manifest is never taken for a cached index
    except SearchError:
        found = None
    if isinstance(found, dict) and all(found.get(k) == v for k, v in store_key.items()) \
            and found.get("model") == ref.to_json() and found.get("request") == request:
        log.info("%s already indexes this store with this model (cached)", out)
        return True
    raise SearchError(f"{out} exists and holds another index (or another request); pass --force to "
                      "rebuild it or choose another --out")


def _valid_rows(store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """The valid rows' vectors (N, d) float32, read with every shard's checksum checked, and their ids."""
    store.check_files()
    vectors = store.read_checked()  # (rows, d), the stored float32
    row_ids = np.flatnonzero(store.rows.valid)  # (N,)
    vectors = np.ascontiguousarray(vectors[row_ids], dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)  # (N,)
    bad = np.flatnonzero(np.abs(norms - 1) > NORM_TOLERANCE)
    if bad.size:
        raise SearchError(f"{store.path}: row {int(row_ids[bad[0]])} has norm {norms[bad[0]]:.4f}, not 1; "
                          "it is not an embedded store (write one with `m3jepa embed`)")
    return vectors, row_ids


def _held_out_queries(model: Any, store: FeatureStore, vectors: np.ndarray,
                      seed: int) -> tuple[np.ndarray, str]:
    """Up to N_QUERIES real queries (Q, d): another modality's rows of the same split through
    `embed_query` into the gallery modality; else perturbed gallery rows. With a description."""
    from m3jepa.core.paired import modality_store

    target, split = store.manifest.modality, store.manifest.split
    for source in sources_into(model.directions, target):
        try:
            src = open_store(modality_store(model.cfg, split, source))
        except ValueError as e:  # no such store here (an export moved elsewhere): try the next
            log.info("no %s queries for the recall check: %s", source, e)
            continue
        ids = np.flatnonzero(src.rows.valid)
        if ids.size == 0:
            continue
        ids = np.sort(np.random.default_rng(seed).choice(ids, min(N_QUERIES, ids.size), replace=False))
        q = model.embed_query(source=source, target=target, latents=src.read(ids))
        return q, (f"{len(ids)} {source}->{target} embed_query rows of {src.path} (split {split})")
    q = perturbed_queries(vectors, N_QUERIES, seed)
    return q, (f"{len(q)} perturbed gallery rows (random rows + Gaussian noise of norm {PERTURB_NOISE}, "
               "re-normalised): the model has no query store here")


def media_paths(cfg: Any, store: FeatureStore) -> tuple[list[str | None] | None, dict[str, Any]]:
    """Each row's media file from the dataset's records (the stores keep only ids and texts), joined by
    row id and checked by the store's membership fingerprint; (None, why) when they cannot be had."""
    from m3jepa.data import get_dataset
    from m3jepa.data.records import membership_fingerprint

    m = store.manifest
    if m.modality not in MEDIA_MODALITIES:
        return None, {"source": None, "why": f"{m.modality} rows have no media file"}
    enc = cfg.encode
    try:
        # skip_bad: items the encode dropped have no row; the membership check below catches the rest
        ds = get_dataset(m.dataset, enc.root or m.data_root, seed=enc.seed, limit=enc.limit, skip_bad=True)
        records = ds.records(m.split, m.modality)
    except (ValueError, OSError) as e:
        log.warning("no media paths for %s: dataset %s cannot be read (%s)", store.path, m.dataset, e)
        return None, {"source": None, "why": f"dataset {m.dataset!r} cannot be read: {e}"}
    if membership_fingerprint(records) != m.membership:
        log.warning("no media paths for %s: dataset %s now holds other rows", store.path, m.dataset)
        return None, {"source": None, "why": f"dataset {m.dataset!r} split {m.split} now holds other rows"}
    return [r.payload for r in records], {"source": "dataset records", "dataset": m.dataset,
                                          "membership": m.membership}


def group_captions(model: Any, store: FeatureStore) -> tuple[dict[str, str], dict[str, Any]]:
    """group id -> the first valid caption of that group in the run's text store of the same split, for
    galleries of other modalities (an image row's caption is its group's); empty when there is none."""
    from m3jepa.core.paired import modality_store

    if store.manifest.modality == "text":
        return {}, {"source": "the rows' own text"}
    if "text" not in model.modalities:
        return {}, {"source": None, "why": "the model has no text modality"}
    try:
        text = open_store(modality_store(model.cfg, store.manifest.split, "text"))
        rows = text.rows
    except ValueError as e:
        return {}, {"source": None, "why": f"no text store: {e}"}
    out: dict[str, str] = {}
    for group, caption, ok in zip(rows.group_ids, rows.texts, rows.valid, strict=True):
        if ok and caption is not None:
            out.setdefault(group, caption)
    return out, {"source": "first caption of the row's group", "store": str(text.path.resolve())}
