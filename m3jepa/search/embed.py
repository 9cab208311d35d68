"""`m3jepa embed`: a run's store re-written in the model's aligned space as a new feature store."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3jepa.core.layout import ExportDir, RunDir
from m3jepa.files import atomic_write_text
from m3jepa.progress import progress
from m3jepa.search.errors import SearchError
from m3jepa.search.identity import ModelRef, model_ref, store_checksum, targets
from m3jepa.store import FeatureStore, Manifest, StoreWriter, open_store
from m3jepa.store.manifest import MANIFEST, load_manifest, read_rows

log = logging.getLogger(__name__)

SIDECAR = "embedding.json"  # beside manifest.json: the model and the source store (the manifest has no key)
SPACE = "cl"


@dataclass(frozen=True)
class Embedded:
    """An embedded store on disk: its path, and whether this call found it already written."""

    path: Path
    cached: bool


def default_out(model_path: Path, split: str, modality: str, kind: str = "run") -> Path:
    """RUN/embedded/SPLIT/MODALITY for a run; EXPORT.embedded/SPLIT/MODALITY, beside it, for an export."""
    layout = ExportDir(model_path) if kind == "export" else RunDir(model_path)
    return layout.embedded(split, modality)


def embed_store(model: Any, source: Path, out: Path, *, force: bool = False) -> Embedded:
    """Write `model.embed_target(modality=M, latents=<source's rows>)` of the store at `source` (modality M)
    into a new store at `out`: the same rows, ids, groups, captions and shard plan, float32, dim = cl_dim.

    A rerun with the same model and source store is a no-op; a different one is refused unless `force`."""
    src = open_store(source)
    modality = src.manifest.modality
    _check_model_fits(model, src)
    ref = model_ref(model)
    record = _sidecar(ref, src)
    if _prepare(out, record, force):
        return Embedded(out, cached=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SIDECAR, json.dumps(record, indent=2, sort_keys=True) + "\n")
    dim = _cl_dim(model, modality)
    manifest = _manifest(src.manifest, ref, dim)
    rows = read_rows(src.path)  # checked above: src.rows verified rows_sha256, order and membership
    src.check_files()
    with StoreWriter(out, manifest) as writer:
        done = writer.done_shards()  # resume: an interrupted embed keeps its committed shards
        todo = [(i, start, end) for i, start, end in writer.planned_shards() if i not in done]
        with progress(sum(end - start for _, start, end in todo), desc=f"embedding {src.manifest.split} "
                      f"{modality}", unit="rows") as bar:
            for index, start, end in todo:
                writer.write_shard(index, _embed_rows(model, src, modality, dim, index))
                bar.update(end - start)
        writer.finalize(rows, src.manifest.skipped,
                        [(d["sample_id"], d["reason"]) for d in src.manifest.dropped])
    log.info("embedded %s (%d rows) into %s", source, src.manifest.rows, out)
    return Embedded(out, cached=False)


def _check_model_fits(model: Any, src: FeatureStore) -> None:
    m = src.manifest
    if m.modality not in targets(model.directions):
        raise SearchError(f"the model only uses {m.modality} as a source (its directions are "
                          f"{', '.join(model.directions)}); embed a modality it targets")
    want = model.encoders.get(m.modality, {})
    if (want.get("encoder"), want.get("revision")) != (m.encoder, m.encoder_revision):
        raise SearchError(f"{src.path} was encoded with {m.encoder}@{m.encoder_revision}, the model was "
                          f"trained on {want.get('encoder')}@{want.get('revision')}; embed a store of that "
                          "encoder")


def _cl_dim(model: Any, modality: str) -> int:
    probe = np.zeros((1, model.objective.predictor.dims[modality]), np.float32)  # (1, D_m)
    return int(model.embed_target(modality=modality, latents=probe).shape[1])


def _sidecar(ref: ModelRef, src: FeatureStore) -> dict[str, Any]:
    m = src.manifest
    return {
        "space": SPACE,
        "model": ref.to_json(),
        "source": {"path": str(src.path.resolve()), "encoder": m.encoder,
                   "encoder_revision": m.encoder_revision, "checksum": store_checksum(m)},
    }


def read_sidecar(store: Path) -> dict[str, Any]:
    """embedding.json of an embedded store, checked for the keys the index needs."""
    path = store / SIDECAR
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SearchError(f"{store} is not an embedded store (no {SIDECAR}); write one with `m3jepa embed`") \
            from None
    except (OSError, ValueError) as e:
        raise SearchError(f"{path} cannot be read ({e}); rerun `m3jepa embed --force`") from None
    if not isinstance(data, dict) or not {"space", "model", "source"} <= data.keys():
        raise SearchError(f"{path} lacks space/model/source; rerun `m3jepa embed --force`")
    return data


def _prepare(out: Path, record: dict[str, Any], force: bool) -> bool:
    """True when `out` already holds this embedding, complete; clears `out` when forced or foreign."""
    if not out.exists() or not any(out.iterdir()):
        return False
    if (out / SIDECAR).is_file():
        found = read_sidecar(out)
        same = found == record
        if same and _complete(out):
            log.info("%s is already embedded with this model and store (cached)", out)
            return True
        if same:
            return False  # an interrupted embed of the same thing: the writer resumes it
        if not force:
            what = "model" if found["model"] != record["model"] else "source store"
            raise SearchError(f"{out} was embedded from another {what}; pass --force to rewrite it or "
                              "choose another --out")
    elif not force:
        raise SearchError(f"{out} holds files but is not an embedded store; choose another --out or pass "
                          "--force to replace it")
    shutil.rmtree(out)
    return False


def _complete(out: Path) -> bool:
    return (out / MANIFEST).is_file() and load_manifest(out).complete


def _manifest(src: Manifest, ref: ModelRef, dim: int) -> Manifest:
    return Manifest(
        dataset=src.dataset, split=src.split, modality=src.modality, membership=src.membership,
        rows=src.rows, encoder=ref.encoder, encoder_revision=ref.weights_sha256,
        pooling=SPACE, layers="none", dim=dim, dtype="float32", kind="pooled", format=src.format,
        shard_size=src.shard_size,
        # the rows are the source's rows, so its content fingerprint (and staleness) carries over
        content=src.content, content_hash=src.content_hash, data_root=src.data_root,
    )


def _embed_rows(model: Any, src: FeatureStore, modality: str, dim: int, index: int) -> np.ndarray:
    """(n, cl_dim) float32 for the n rows of source shard `index`: the model's gallery embedding of valid
    rows, zeros for invalid ones. The shard's sha256 is checked on the bytes read (a changed byte, chunks
    swapped between shards, a shard replaced by a modified copy: refused, naming the shard)."""
    info = src.manifest.shards[index]
    start, end = info.row_start, info.row_end
    latents = src.read_shard_checked(index).astype(np.float32)  # (n, D_m)
    valid = src.rows.valid[start:end]  # (n,) bool
    out = np.zeros((end - start, dim), np.float32)
    if valid.any():
        out[valid] = model.embed_target(modality=modality, latents=latents[valid])
    return out


def embed_run(model: Any, split: str, modality: str, out: Path | None = None, *,
              force: bool = False) -> Embedded:
    """Embed the store of (split, modality) of the model's run (its config names the store) into `out`
    (default: RUN/embedded/SPLIT/MODALITY; for an export EXPORT.embedded/SPLIT/MODALITY beside it)."""
    from m3jepa.core.paired import modality_store

    if modality not in targets(model.directions):
        raise SearchError(f"the model only uses {modality} as a source (its directions are "
                          f"{', '.join(model.directions)}); embed a modality it targets")
    source = modality_store(model.cfg, split, modality)
    return embed_store(model, source, out or default_out(Path(model.source.path), split, modality,
                                                           model.source.kind), force=force)


def run_splits(model: Any, modality: str) -> list[str]:
    """`--split all`: the splits the model's run names (train, validation, evaluation) whose `modality`
    store exists, in that order."""
    from m3jepa.core.errors import StoreDataError
    from m3jepa.core.paired import modality_store

    cfg = model.cfg
    found = []
    for split in dict.fromkeys([cfg.train.train_split, cfg.train.val_split, cfg.eval.split]):
        try:
            modality_store(cfg, split, modality)
        except StoreDataError:
            continue
        found.append(split)
    if not found:
        raise SearchError(f"no {modality} store of any split of {model.source.path} exists; run "
                          f"`m3jepa encode --dataset {cfg.encode.dataset} --modality {modality}` first")
    return found
