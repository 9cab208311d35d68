"""The one loader of trained models: a run's checkpoint or an export folder, read and checked, and its
predictor rebuilt on a Runtime.

`m3jepa evaluate`, `m3jepa.load`, `m3jepa export` and `m3jepa lora-export` all open models here, so a
check on what is read from disk (checksums, formats, shapes) goes here once and covers all of them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from m3jepa.config import ConfigError, PipelineConfig, RuntimeConfig, from_dict, migrate
from m3jepa.core.checkpoint import CheckpointError, TrainState, load_checkpoint
from m3jepa.core.device import Runtime, resolve
from m3jepa.core.layout import ADAPTERS, CHECKPOINT_NAMES, WEIGHTS, ExportDir, RunDir
from m3jepa.core.objective import Objective

log = logging.getLogger(__name__)

EXPORT_FORMAT = "m3jepa-predictor"
EXPORT_VERSION = 1
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
            if not file.is_file():
                return names, {}
            try:
                return names, {m: t.numpy() for m, t in load_file(str(file)).items()}
            except (OSError, SafetensorError) as e:
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
    if not ck_path.is_dir():
        raise CheckpointError(f"{ck_path} does not exist; is {run} a run written by train-predictor (best "
                              "exists once it has finished a validation)?")
    ck = load_checkpoint(ck_path)  # verifies checksums.json
    cfg = eval_config(run, ck.cfg, split, protocol, root)  # the run's absolute store root
    adapters = ck_path / ADAPTERS
    return Trained(
        source=ModelSource(run, "run", checkpoint), cfg=cfg, dims=dict(ck.state.dims),
        directions=list(ck.state.directions or cfg.train.directions), encoders=dict(ck.state.stores),
        weights={k: v for k, v in ck.weights.items() if not k.startswith(ADAPTER_PREFIX)},
        weights_file=ck_path / WEIGHTS, adapters=adapters if adapters.is_dir() else None,
        state=ck.state,
    )


def open_export(folder: str | Path) -> Trained:
    """An `m3jepa export` folder: config.json checked, then the weights."""
    layout = ExportDir(Path(folder))
    meta = read_export_config(layout.path)
    try:
        cfg = from_dict(PipelineConfig, migrate(meta["pipeline"]))
        dims = {str(m): int(d) for m, d in meta["dims"].items()}
        encoders = {m: {"encoder": e["encoder"], "revision": e["revision"]}
                    for m, e in meta["encoders"].items()}
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{layout.config} is malformed ({e}); export the run again") from None
    try:
        weights = load_file(str(layout.weights))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{layout.weights} cannot be read: {e}") from None
    return Trained(
        source=ModelSource(layout.path, "export"), cfg=cfg, dims=dims, directions=list(meta["directions"]),
        encoders=encoders, weights=weights, weights_file=layout.weights,
        adapters=layout.adapters if layout.adapters.is_dir() else None, export=meta,
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
    if meta.get("format_version") != EXPORT_VERSION:
        raise CheckpointError(f"{folder}: export format version {meta.get('format_version')!r}; this m3jepa "
                              f"reads version {EXPORT_VERSION}")
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
