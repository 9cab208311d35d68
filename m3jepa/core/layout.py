"""Where things live in a run folder and in an export folder: every file name, in one place.

    RUN/checkpoints/best/         the best validation checkpoint (core/checkpoint.py: model.safetensors,
    RUN/checkpoints/latest/       state.json, config.toml, optimizer.pt, adapters/, checksums.json)
    RUN/config.toml               the resolved config
    RUN/stores.json               the stores the run read (core/runstores.py)
    RUN/provenance.json           what trained it and when (core/provenance.py)
    RUN/.lock                     held by the one process writing the run (core/runlock.py)
    RUN/launch.json               the torchrun launch writing it, so its restarts resume (train/resume.py)
    RUN/trainable.json            the trainable parameters
    RUN/metrics.jsonl, .csv       the training log; RUN/tensorboard/ where installed
    RUN/metrics.json, .md         what `m3jepa evaluate` scored (metrics-SPLIT-PROTOCOL.* for other splits)
    RUN/training_curves.png, routing.png, similarity_SPLIT.png
    RUN/embedded/SPLIT/MODALITY   the gallery stores `m3jepa embed` writes (and their .index folders)

    EXPORT/config.json, model.safetensors, vocabularies.safetensors, adapters/, README.md   (api/export.py)
    EXPORT/checksums.json            what the loader verifies before it reads them (core/exportfiles.py)
    EXPORT.embedded/SPLIT/MODALITY   an export's gallery stores, beside it (never inside)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_NAMES = ("best", "latest")

# a checkpoint directory's files (core/checkpoint.py writes and reads them)
WEIGHTS = "model.safetensors"  # also an export's weights
STATE = "state.json"
CONFIG = "config.toml"  # also the run folder's resolved config
OPTIMIZER = "optimizer.pt"
CHECKSUMS = "checksums.json"  # also an export's (core/exportfiles.py)
ADAPTERS = "adapters"  # a LoRA run's adapters/<modality>/ (peft format), in checkpoints and exports

# a run folder's files besides CONFIG
CHECKPOINTS = "checkpoints"
STORES = "stores.json"
PROVENANCE = "provenance.json"
LOCK = ".lock"
LAUNCH = "launch.json"
METRICS_LOG = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
TENSORBOARD = "tensorboard"
EMBEDDED = "embedded"

# an export folder's files besides WEIGHTS and ADAPTERS
EXPORT_CONFIG = "config.json"
VOCABULARIES = "vocabularies.safetensors"  # only for a model with a label or answer vocabulary
MODEL_CARD = "README.md"


@dataclass(frozen=True)
class RunDir:
    """A run folder: the paths of what train-predictor, evaluate and embed write there."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @staticmethod
    def holds_run(path: str | Path) -> bool:
        """Whether `path` looks like a run folder (it has checkpoints/)."""
        return (Path(path) / CHECKPOINTS).is_dir()

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, name: str) -> Path:
        """checkpoints/best or checkpoints/latest (ValueError for any other name)."""
        if name not in CHECKPOINT_NAMES:
            raise ValueError(f"checkpoint={name!r} is not one of {', '.join(CHECKPOINT_NAMES)}")
        return self.checkpoints / name

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    @property
    def latest(self) -> Path:
        return self.checkpoint("latest")

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def stores(self) -> Path:
        return self.path / STORES

    @property
    def provenance(self) -> Path:
        return self.path / PROVENANCE

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def trainable(self) -> Path:
        return self.path / "trainable.json"

    @property
    def metrics_log(self) -> Path:
        """metrics.jsonl: one record per logged step and validation (the record of truth)."""
        return self.path / METRICS_LOG

    @property
    def metrics_csv(self) -> Path:
        return self.path / METRICS_CSV

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @staticmethod
    def metrics_stem(split: str = "test", protocol: str = "multi") -> str:
        """metrics for the default scoring (test, multi), else metrics-SPLIT-PROTOCOL."""
        return "metrics" if (split, protocol) == ("test", "multi") else f"metrics-{split}-{protocol}"

    def metrics(self, split: str = "test", protocol: str = "multi") -> Path:
        """The metrics JSON `m3jepa evaluate --split SPLIT --protocol PROTOCOL` writes."""
        return self.path / f"{self.metrics_stem(split, protocol)}.json"

    @property
    def training_curves(self) -> Path:
        return self.path / "training_curves.png"

    @property
    def routing_plot(self) -> Path:
        return self.path / "routing.png"

    def similarity_plot(self, split: str) -> Path:
        return self.path / f"similarity_{split}.png"

    @property
    def embedded_root(self) -> Path:
        return self.path / EMBEDDED

    def embedded(self, split: str, modality: str) -> Path:
        """The default `m3jepa embed --out` of (split, modality)."""
        return self.embedded_root / split / modality


@dataclass(frozen=True)
class ExportDir:
    """An export folder (`m3jepa export`): a model in the Hugging Face layout."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @staticmethod
    def holds_export(path: str | Path) -> bool:
        """Whether `path` looks like an export (config.json and model.safetensors)."""
        return (Path(path) / EXPORT_CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()

    @property
    def config(self) -> Path:
        return self.path / EXPORT_CONFIG

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def vocabularies(self) -> Path:
        return self.path / VOCABULARIES

    @property
    def checksums(self) -> Path:
        return self.path / CHECKSUMS

    @property
    def adapters(self) -> Path:
        return self.path / ADAPTERS

    @property
    def model_card(self) -> Path:
        return self.path / MODEL_CARD

    def embedded(self, split: str, modality: str) -> Path:
        """The default `m3jepa embed --out` of an export: BESIDE it (EXPORT.embedded/SPLIT/MODALITY),
        never inside: an export is a finished folder made to be shared."""
        return self.path.with_name(self.path.name + ".embedded") / split / modality
