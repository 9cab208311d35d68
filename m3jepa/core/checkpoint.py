"""Checkpoints: safetensors weights, JSON state and config, optimizer and RNG state; written atomically."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from m3jepa.config import PipelineConfig, dump_toml, load_pipeline

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
STATE = "state.json"
CONFIG = "config.toml"
OPTIMIZER = "optimizer.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from an incompatible config."""


@dataclass
class TrainState:
    """Everything besides tensors that a run needs to continue or to be evaluated alone."""

    step: int = 0  # optimizer steps completed
    best_metric: float = -1.0
    best_step: int = -1
    evals_since_best: int = 0
    last_recalls: dict[str, float] = field(default_factory=dict)  # direction → val R@1 fraction (dynamic AGD)
    dims: dict[str, int] = field(default_factory=dict)  # modality → latent dimension
    directions: list[str] = field(default_factory=list)
    stores: dict[str, dict[str, str]] = field(default_factory=dict)  # modality → encoder, revision
    stopped_early: bool = False
    samples_seen: int = 0


def save_checkpoint(
    directory: Path,
    cfg: PipelineConfig,
    model: torch.nn.Module,
    state: TrainState,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write a checkpoint directory: build it beside, then swap it in, so a kill never leaves half of one.

    `extra(dir)` writes more files into the checkpoint before the swap (the LoRA mode's adapters).
    """
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS))
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True))
    (tmp / CONFIG).write_text(dump_toml(cfg))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / OPTIMIZER)
    if extra is not None:
        extra(tmp)
    old = directory.with_name(directory.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def recover_interrupted(directory: Path) -> None:
    """If a kill fell between the two renames of save_checkpoint, put the previous checkpoint back."""
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and old.exists():
        old.rename(directory)


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    cfg: PipelineConfig
    state: TrainState
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None


def load_checkpoint(directory: Path, with_optimizer: bool = False) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint; errors name the missing or bad file."""
    recover_interrupted(directory)
    for name in (WEIGHTS, STATE, CONFIG):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}; was it written by m3jepa?")
    try:
        cfg = load_pipeline(directory / CONFIG, written_by_m3jepa=True)
        state = TrainState(**json.loads((directory / STATE).read_text()))
        weights = load_file(str(directory / WEIGHTS))
    except (ValueError, TypeError, OSError) as e:
        raise CheckpointError(f"checkpoint {directory} cannot be read: {e}") from e
    opt = None
    if with_optimizer:
        if not (directory / OPTIMIZER).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {OPTIMIZER}; it cannot be resumed")
        # weights_only: a checkpoint is data, never code.
        opt = torch.load(directory / OPTIMIZER, map_location="cpu", weights_only=True)
    return Checkpoint(path=directory, cfg=cfg, state=state, weights=weights, optimizer=opt)


def config_differences(
    a: PipelineConfig, b: PipelineConfig, sections: tuple[str, ...], ignore: frozenset[str] = frozenset()
) -> list[str]:
    """Keys of the given sections whose values differ, as 'section.key: a != b' ('section.key' in
    `ignore` never counts)."""
    out = []
    for section in sections:
        da, db = asdict(getattr(a, section)), asdict(getattr(b, section))
        for key in sorted(set(da) | set(db)):
            if f"{section}.{key}" not in ignore and da.get(key) != db.get(key):
                out.append(f"{section}.{key}: {da.get(key)!r} != {db.get(key)!r}")
    return out
