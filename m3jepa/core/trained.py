"""The one loader of trained models: a run's checkpoint or an export folder, read and checked, and its
predictor rebuilt on a Runtime.

`m3jepa evaluate`, `m3jepa.load`, `m3jepa export` and `m3jepa lora-export` all open models here, so a
check on what is read from disk (checksums, formats, shapes) goes here once and covers all of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes

from m3jepa.config import ConfigError, PipelineConfig, RuntimeConfig, from_dict, migrate
from m3jepa.core.checkpoint import (
    CHECKSUMS,
    OPTIMIZER,
    Checkpoint,
    CheckpointError,
    TrainState,
    load_checkpoint,
)
from m3jepa.core.device import Runtime, resolve
from m3jepa.core.exportfiles import refuse_links, verify_export
from m3jepa.core.layout import ADAPTERS, CHECKPOINT_NAMES, VOCABULARIES, WEIGHTS, ExportDir, RunDir
from m3jepa.core.objective import Objective
from m3jepa.core.runlock import writer_of

log = logging.getLogger(__name__)

EXPORT_FORMAT = "m3jepa-predictor"
EXPORT_VERSION = 2  # 2: checksums.json covers the files and config.json's meaning (core/exportfiles.py)
READABLE_VERSIONS = (1, 2)  # 1: written before exports had checksums: loaded with a warning
# A run being trained swaps its checkpoints in while a reader reads them: a reader copies the checkpoint and
# verifies the copy, trying again (SNAPSHOT_WAIT_S apart) while a swap makes the copy inconsistent.
SNAPSHOT_TRIES = 50
SNAPSHOT_WAIT_S = 0.1
# modalities whose rows are a fixed vocabulary (classes, candidate answers): a model keeps the list
VOCABULARY_MODALITIES = ("label", "answer")
ADAPTER_PREFIX = "encoders."  # a LoRA checkpoint's adapter keys: they load through peft, not the objective


@dataclass(frozen=True)
class ModelSource:
    """Where a model was loaded from: a run directory and checkpoint, or an export folder."""

    path: Path
    kind: str  # "run" | "export"
    checkpoint: str | None = None


@dataclass
class Trained:
    """A trained model as read from disk, before it is put on a device.

    `cfg` is the checkpoint's (or export's) resolved config; a run's has the absolute store root the run
    recorded, so its stores are found from any directory. `weights` are the predictor's and the loss's
    (a LoRA run's adapters load from `adapters` through peft).
    """

    source: ModelSource
    cfg: PipelineConfig
    dims: dict[str, int]  # modality -> latent dimension
    directions: list[str]
    encoders: dict[str, dict[str, str]]  # modality -> {"encoder": name, "revision": rev}
    weights: dict[str, torch.Tensor]
    weights_file: Path
    adapters: Path | None  # adapters/<modality>/ in peft format, when the model has them
    state: TrainState | None = None  # a run checkpoint's (steps, best metric)
    export: dict[str, Any] | None = None  # an export's config.json
    weights_sha256: str | None = None  # of the weights file as verified and read (None: not recorded)
    # a live run's checkpoint is read from a private copy (`open_run`): it lives as long as this object
    snapshot: tempfile.TemporaryDirectory | None = None
    vocabulary_bytes: bytes | None = None  # an export's vocabularies.safetensors, as verified

    @property
    def checkpoint_dir(self) -> Path | None:
        """A run's checkpoint directory (None for an export)."""
        return self.weights_file.parent if self.source.kind == "run" else None

    def runtime(self, device: str | None = None, precision: str | None = None) -> Runtime:
        """The Runtime the model runs on: the config's runtime section unless `device`/`precision` are
        given, checked as the config is."""
        rc = self.cfg.runtime
        return resolve(RuntimeConfig(device=device or rc.device, precision=precision or rc.precision))

    def objective(self, runtime: Runtime) -> Objective:
        """The objective (predictor and loss) rebuilt on `runtime.device` with these weights, strictly, in
        eval mode."""
        with runtime.device:
            objective = Objective(self.cfg.model, self.cfg.loss, self.dims)
        try:
            objective.load_state_dict(self.weights, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{self.weights_file}: the weights do not fit the model its config "
                                  f"describes: {e}") from None
        return objective.eval()

    def vocabularies(self) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
        """({"label"/"answer": the trained list}, {same: its (K, D_m) stage-1 latents}): a run's from its
        train store, an export's from config.json and vocabularies.safetensors."""
        if self.export is not None:
            names = dict(self.export.get("vocabularies", {}))
            file = ExportDir(self.source.path).vocabularies
            data = self.vocabulary_bytes
            if data is None:  # a version-1 export (no checksums): read as it is
                if not file.is_file():
                    return names, {}
                data = _read(file)
            try:
                return names, {m: t.numpy() for m, t in load_bytes(data).items()}
            except (SafetensorError, ValueError) as e:
                raise CheckpointError(f"{file} cannot be read: {e}") from None
        found = {m: run_vocabulary(self.cfg, m) for m in VOCABULARY_MODALITIES if m in self.dims}
        return {m: v[0] for m, v in found.items()}, {m: v[1] for m, v in found.items()}


def run_vocabulary(cfg: PipelineConfig, modality: str) -> tuple[list[str], np.ndarray]:
    """(the group ids, i.e. class names or answers, of a vocabulary modality's train store in row order,
    their (K, D) stage-1 latents), valid rows only."""
    from m3jepa.core.paired import modality_store
    from m3jepa.store import open_store

    store = open_store(modality_store(cfg, cfg.train.train_split, modality))
    valid = np.asarray(store.rows.valid, dtype=bool)
    names = [g for g, ok in zip(store.rows.group_ids, valid, strict=True) if ok]
    return names, store.read(np.flatnonzero(valid))  # (K, D) float32


def open_trained(path: str | Path, checkpoint: str = "best") -> Trained:
    """A run folder's `checkpoint` (best | latest) or an export folder, whichever `path` is."""
    path = Path(path)
    if ExportDir.holds_export(path):
        return open_export(path)
    if RunDir.holds_run(path):
        return open_run(path, checkpoint)
    raise CheckpointError(f"{path} is neither a run directory (checkpoints/) nor an export (config.json + "
                          "model.safetensors); pass what `m3jepa train-predictor` or `m3jepa export` wrote")


def open_run(run: str | Path, checkpoint: str = "best", split: str | None = None,
             protocol: str | None = None, root: str | None = None) -> Trained:
    """A run's checkpoint, every file verified against its checksums.json; the config's eval.split and
    eval.protocol replaced by `split`/`protocol` where given (checked as the config is), and encode.root
    by `root` (a folder dataset's folder, which names its stores: `evaluate --root`)."""
    from m3jepa.core.runstores import eval_config

    run = Path(run)
    if checkpoint not in CHECKPOINT_NAMES:
        raise CheckpointError(f"checkpoint={checkpoint!r} is not one of {', '.join(CHECKPOINT_NAMES)}")
    ck_path = RunDir(run).checkpoint(checkpoint)
    if ck_path.is_symlink():
        raise CheckpointError(f"{ck_path} is a symbolic link; a run holds its own checkpoints: replace the "
                              "link by a copy of what it points to")
    writer = writer_of(run)
    snapshot = None
    if writer is None:
        if not ck_path.is_dir():
            raise CheckpointError(f"{ck_path} does not exist; is {run} a run written by train-predictor "
                                  "(best exists once it has finished a validation)?")
        ck = load_checkpoint(ck_path)  # verifies checksums.json
    else:
        ck, snapshot = _snapshot(ck_path, writer)
    cfg = eval_config(run, ck.cfg, split, protocol, root)  # the run's absolute store root
    adapters = ck.path / ADAPTERS
    return Trained(
        source=ModelSource(run, "run", checkpoint), cfg=cfg, dims=dict(ck.state.dims),
        directions=list(ck.state.directions or cfg.train.directions), encoders=dict(ck.state.stores),
        weights={k: v for k, v in ck.weights.items() if not k.startswith(ADAPTER_PREFIX)},
        weights_file=ck_path / WEIGHTS, adapters=adapters if adapters.is_dir() else None,
        state=ck.state, weights_sha256=_recorded_sha256(ck.path), snapshot=snapshot,
    )


def _snapshot(ck_path: Path, writer: int) -> tuple[Checkpoint, tempfile.TemporaryDirectory]:
    """A consistent copy of a checkpoint that process `writer` may swap at any moment: copied (without the
    optimizer state, which loading a model does not need) into a private temporary folder and verified
    against the copied checksums.json; tried again while a swap made the copy inconsistent."""
    last: Exception | None = None
    for _ in range(SNAPSHOT_TRIES):
        tmp = tempfile.TemporaryDirectory(prefix="m3jepa-snapshot-")
        copy = Path(tmp.name) / ck_path.name
        try:
            before = ck_path.stat().st_ino  # a swap renames a new folder in: another inode
            shutil.copytree(ck_path, copy, ignore=shutil.ignore_patterns(OPTIMIZER), symlinks=True)
            swapped = ck_path.stat().st_ino != before
        except OSError as e:  # the folder was renamed away while it was copied
            swapped, last = True, e
        if swapped:
            tmp.cleanup()
            time.sleep(SNAPSHOT_WAIT_S)
            continue
        try:
            if not (copy / CHECKSUMS).is_file():
                raise CheckpointError(f"checkpoint {ck_path} has no {CHECKSUMS}: a copy of a checkpoint "
                                      "being written cannot be verified; wait for the run to finish")
            ck = load_checkpoint(copy, skip=frozenset({OPTIMIZER}))
        except CheckpointError as e:  # copied whole, and still wrong: the checkpoint itself is damaged
            tmp.cleanup()
            raise CheckpointError(str(e).replace(str(copy), str(ck_path))) from None
        log.warning("run %s is being written by process %d: read a consistent snapshot of %s at step %d "
                    "(verified against its %s); later checkpoints are not seen", ck_path.parent.parent,
                    writer, ck_path.name, ck.state.step, CHECKSUMS)
        return ck, tmp
    raise CheckpointError(f"run {ck_path.parent.parent} is being written by process {writer} and its "
                          f"{ck_path.name} checkpoint kept changing while it was copied ({last}); try again, "
                          "or wait for the run to finish")


def _recorded_sha256(ck_path: Path) -> str | None:
    """The weights' sha256 as checksums.json records it (verified on load), or None without a record."""
    try:
        return str(json.loads((ck_path / CHECKSUMS).read_text())["sha256"][WEIGHTS])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None


def open_export(folder: str | Path) -> Trained:
    """An `m3jepa export` folder: no file read through a symbolic link; config.json and every file the model
    is built from verified against checksums.json (core/exportfiles.py), then the weights read from the
    verified bytes."""
    layout = ExportDir(Path(folder))
    refuse_links(layout.path)
    meta = read_export_config(layout.path)
    if meta["format_version"] >= 2:
        verified = verify_export(layout.path, meta)
    else:
        log.warning("%s was exported before exports carried checksums (format version 1): its files are not "
                    "verified; export the run again to get them", layout.path)
        verified = {WEIGHTS: _read(layout.weights)}
    try:
        cfg = from_dict(PipelineConfig, migrate(meta["pipeline"]))
        dims = {str(m): int(d) for m, d in meta["dims"].items()}
        encoders = {m: {"encoder": e["encoder"], "revision": e["revision"]}
                    for m, e in meta["encoders"].items()}
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{layout.config} is malformed ({e}); export the run again") from None
    try:
        weights = load_bytes(verified[WEIGHTS])
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{layout.weights} cannot be read: {e}") from None
    return Trained(
        source=ModelSource(layout.path, "export"), cfg=cfg, dims=dims, directions=list(meta["directions"]),
        encoders=encoders, weights=weights, weights_file=layout.weights,
        adapters=layout.adapters if layout.adapters.is_dir() else None, export=meta,
        weights_sha256=hashlib.sha256(verified[WEIGHTS]).hexdigest(),
        vocabulary_bytes=verified.get(VOCABULARIES),
    )


def read_export_config(folder: Path) -> dict[str, Any]:
    """config.json of an export, checked before anything is built from it: the format, its version, the
    keys load needs, and (`check_export_sizes`) the pipeline, the dims and the memory they need."""
    where = ExportDir(folder).config
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where} cannot be read: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{where} cannot be read: it is nested deeper than Python's parser "
                              "follows") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{where} is not an m3jepa export (format {EXPORT_FORMAT!r})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{folder}: export format version {meta.get('format_version')!r}; this m3jepa "
                              f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    missing = [k for k in ("pipeline", "dims", "encoders", "directions") if k not in meta]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}")
    check_export_sizes(meta, where)
    return meta


def check_export_sizes(meta: dict[str, Any], where: Path) -> None:
    """Refuse (CheckpointError naming the key in `where`) an export config whose pipeline is not a valid
    config, whose dims are not latent widths, or whose predictor cannot fit this host's memory (8 bytes a
    parameter: core/memory.py); sets meta["dims"] to ints. Before any tensor is allocated from it."""
    from m3jepa.core.memory import check_dims, check_model_fits

    if not isinstance(meta["pipeline"], dict):
        raise CheckpointError(f"{where}: pipeline must be an object (the run's config), got "
                              f"{str(meta['pipeline'])[:60]}")
    if not isinstance(meta["dims"], dict) or not meta["dims"]:
        raise CheckpointError(f"{where}: dims must be an object of modality -> latent width, got "
                              f"{str(meta['dims'])[:60]}")
    try:
        cfg = from_dict(PipelineConfig, migrate(meta["pipeline"]))
    except ConfigError as e:
        raise CheckpointError(f"{where}: pipeline: {e}") from None
    try:
        meta["dims"] = check_dims(meta["dims"], "dims")
        check_model_fits(cfg.model, meta["dims"], torch.device("cpu"), training=False)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
