"""Checkpoints: safetensors weights, JSON state and config, optimizer and RNG state; written atomically."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from m3jepa.config import PipelineConfig, dump_toml, load_pipeline
from m3jepa.core.layout import CHECKSUMS, CONFIG, OPTIMIZER, STATE, WEIGHTS
from m3jepa.device_table import kind_of
from m3jepa.files import refused_writes, replace_dir

log = logging.getLogger(__name__)
ASIDE = ".old"  # the previous checkpoint's name while save_checkpoint swaps in the new one

# a checkpoint directory's files (their names are core/layout.py's): WEIGHTS, STATE, CONFIG, OPTIMIZER,
# and CHECKSUMS, the sha256 and size of every other file in it
__all__ = ["CHECKSUMS", "CONFIG", "OPTIMIZER", "STATE", "WEIGHTS", "Checkpoint", "CheckpointError",
           "TrainState", "load_checkpoint", "save_checkpoint"]


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
    rng: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint directory: build it beside, then swap it in, so a kill never leaves half of one.

    `extra(dir)` writes more files into the checkpoint before the swap (the LoRA mode's adapters); `rng`
    is the generators' state saved beside the optimizer (default: this process's, `rng_state(model)`;
    under torchrun the loop adds every rank's).
    """
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # a full disk: one line, the half-written tmp removed, the previous checkpoint untouched (files.py)
    need = sum(v.numel() * v.element_size() for v in weights.values()) * (3 if optimizer is not None else 1)
    kept = f"the previous {directory.name} checkpoint" if directory.exists() else ""
    with refused_writes(directory.parent, need=need, remove=[tmp], removed=f"the partial {tmp.name}",
                        kept=kept, fix="then resume the run (train-predictor --resume)"):
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / WEIGHTS))
        (tmp / STATE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True))
        (tmp / CONFIG).write_text(dump_toml(cfg))
        if optimizer is not None:  # through memory: torch.save's own writer reports a full disk without errno
            buffer = io.BytesIO()
            rng = rng_state(model) if rng is None else rng
            torch.save({"optimizer": optimizer.state_dict(), **rng}, buffer)
            (tmp / OPTIMIZER).write_bytes(buffer.getbuffer())
        if extra is not None:
            extra(tmp)
        write_checksums(tmp)  # last, so it covers the adapters `extra` wrote too
    replace_dir(tmp, directory, ASIDE)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    """Every file under `directory` but the checksums file, as sorted '/'-separated relative paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()
                  and p.relative_to(directory).as_posix() != CHECKSUMS)


def write_checksums(directory: Path) -> None:
    """Write `checksums.json`: {"sha256": {file: hex}, "bytes": {file: size}} for every file in the dir."""
    names = _files(directory)
    data = {
        "sha256": {n: _sha256(directory / n) for n in names},
        "bytes": {n: (directory / n).stat().st_size for n in names},
    }
    (directory / CHECKSUMS).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def verify_checksums(directory: Path, skip: frozenset[str] = frozenset()) -> bool:
    """Check every file (but those named in `skip`) against `checksums.json`; False when the checkpoint
    predates checksums.

    A missing, extra, resized, changed or symbolically linked file is a CheckpointError naming it.
    """
    path = directory / CHECKSUMS
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
        want, sizes = dict(data["sha256"]), dict(data["bytes"])
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"checkpoint {directory}: {CHECKSUMS} is unreadable ({e}); the checkpoint "
                              "cannot be trusted: use another checkpoint (--checkpoint best|latest)") from e
    extra = sorted(set(_files(directory)) - set(want))
    if extra:
        raise CheckpointError(f"checkpoint {directory}: {extra[0]} is not listed in {CHECKSUMS}; it was "
                              "added after the checkpoint was written: remove it")
    for name in sorted(set(want) - skip):
        _verify_file(directory, name, want[name], sizes.get(name))
    return True


def linked_part(directory: Path, name: str) -> str | None:
    """The first part of the relative path `name` under `directory` that is a symbolic link (None: none)."""
    parts = Path(name).parts
    for i in range(1, len(parts) + 1):
        if (directory.joinpath(*parts[:i])).is_symlink():
            return "/".join(parts[:i])
    return None


def _verify_file(directory: Path, name: str, sha256: str, size: int | None) -> None:
    file = directory / name
    fix = "the file is damaged; restore it from a copy or use another checkpoint (--checkpoint best|latest)"
    link = linked_part(directory, name)
    if link is not None:  # its target can be anything, and change after the check
        raise CheckpointError(f"checkpoint {directory}: {link} is a symbolic link; a checkpoint holds its "
                              "own files: replace the link by a copy of what it points to")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {directory}: {name} is missing ({CHECKSUMS} lists it); {fix}")
    got = file.stat().st_size
    if size is not None and got != size:
        raise CheckpointError(
            f"checkpoint {directory}: {name} has {got} bytes, {CHECKSUMS} says {size} (truncated?); {fix}"
        )
    if _sha256(file) != sha256:
        raise CheckpointError(
            f"checkpoint {directory}: {name} does not match its sha256 in {CHECKSUMS}; {fix}"
        )


def recover_interrupted(directory: Path) -> None:
    """If a kill fell between the two renames of save_checkpoint, put the previous checkpoint back."""
    old = directory.with_name(directory.name + ASIDE)
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


def rng_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The generators a resumed run needs: the CPU's ("rng"), and the one of the device the model trains
    on when the device table gives that type a generator of its own ("<type>_rng": dropout there)."""
    out = {"rng": torch.get_rng_state()}
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    kind = kind_of(device)
    if kind.get_rng_state is not None:
        out[f"{kind.type}_rng"] = kind.get_rng_state(device)
    return out


def restore_rng(saved: dict[str, Any], device: torch.device) -> None:
    """Put back what rng_state saved; a run resumed on another kind of device keeps a fresh generator
    there."""
    torch.set_rng_state(saved["rng"])
    kind = kind_of(device)
    if kind.set_rng_state is None:
        return
    if f"{kind.type}_rng" in saved:
        kind.set_rng_state(saved[f"{kind.type}_rng"], device)
    else:
        log.warning("the checkpoint was written on another device type: %s dropout masks start from a "
                    "fresh generator", kind.type)


def load_checkpoint(
    directory: Path, with_optimizer: bool = False, map_location: torch.device | str = "cpu",
    skip: frozenset[str] = frozenset(),
) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint; errors name the missing or bad file.

    The weights load onto `map_location` (the run's device: a run may resume on another device); the
    optimizer state stays on the CPU, and the optimizer's load_state_dict moves it beside each parameter.
    `skip`: files not verified (a snapshot copied without its optimizer.pt, core/trained.py).
    """
    recover_interrupted(directory)
    for name in (WEIGHTS, STATE, CONFIG):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}; was it written by m3jepa?")
    if not verify_checksums(directory, skip):
        log.warning("checkpoint %s has no %s (written before m3jepa checked checkpoints): its files are "
                    "not verified; the next checkpoint the run writes will have one", directory, CHECKSUMS)
    try:
        cfg = load_pipeline(directory / CONFIG, written_by_m3jepa=True)
        state = TrainState(**json.loads((directory / STATE).read_text()))
        weights = load_file(str(directory / WEIGHTS), device=str(map_location))
    except (ValueError, TypeError, OSError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {directory} cannot be read: {e}") from e
    opt = _load_optimizer(directory) if with_optimizer else None
    return Checkpoint(path=directory, cfg=cfg, state=state, weights=weights, optimizer=opt)


def _load_optimizer(directory: Path) -> dict[str, Any]:
    if not (directory / OPTIMIZER).is_file():
        raise CheckpointError(f"checkpoint {directory} has no {OPTIMIZER}; it cannot be resumed")
    try:
        # weights_only: a checkpoint is data, never code.
        return torch.load(directory / OPTIMIZER, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # a damaged file of a pre-checksums checkpoint
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {directory}: {OPTIMIZER} cannot be read ({first}); "
                              "the run cannot be resumed from it") from e


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


# ---------------------------------------------------------------- run identity: the one rule
# A run folder holds one run: the config that made its checkpoint. A config continues it (train-predictor
# --resume, `m3jepa run` on an existing folder) only when these sections are equal, and never otherwise.
RUN_SECTIONS = ("encode", "model", "loss", "train", "lora", "runtime")
# ... less the keys that change how fast a run goes or what it logs, never what it computes. Each is
# guaranteed by the code and tested (tests/test_run_identity.py):
# - train.num_threads: torch's intra-op threads; CPU training here is bit-identical with 1 and 2 threads
#   (the test trains both); train.feed: every feed gives the same batches, bit for bit
#   (tests/test_feed.py); train.log_every, train.checkpoint_every, train.tensorboard: what is written and
#   when, never the weights (resume is bit-exact from any checkpoint, tests/test_train.py);
# - runtime.device: a run may move to another device (its checkpoint loads with map_location; not bit-exact
#   across device kinds, docs/training.md);
# - how stores are made, not which stores the run reads: encode.splits, modalities, batch_size, workers,
#   decode_priority, device, threads, force, content_hash. The stores a run read are checked by their
#   manifest identity in stores.json on every resume (m3jepa/core/runstores.py).
SPEED_ONLY = frozenset({
    "train.num_threads", "train.feed", "train.log_every", "train.checkpoint_every", "train.tensorboard",
    "runtime.device",
    "encode.splits", "encode.modalities", "encode.batch_size", "encode.workers", "encode.decode_priority",
    "encode.device", "encode.threads", "encode.force", "encode.content_hash",
})


def run_differences(cfg: PipelineConfig, saved: PipelineConfig) -> list[str]:
    """What makes `cfg` another run than the one `saved` (a checkpoint's config) made: 'key: a != b'."""
    return config_differences(cfg, saved, RUN_SECTIONS, SPEED_ONLY)


def check_same_run(cfg: PipelineConfig, saved: PipelineConfig, run_dir: Path) -> None:
    """Refuse to continue the run in `run_dir` with a config that makes another run (one line, the fix)."""
    diff = run_differences(cfg, saved)
    if diff:
        raise CheckpointError(
            f"{run_dir} holds a run of another config ({'; '.join(diff)}); a run never continues with a "
            f"changed config: give this one its own folder with --run NEW_FOLDER, or delete {run_dir} to "
            "start over"
        )
