"""`m3jepa lora-export`: a run's adapters as peft folders, or merged into the tail layers' own weights."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from m3jepa.core.checkpoint import CheckpointError
from m3jepa.core.trained import Trained, open_run
from m3jepa.lora.tunable import TunableEncoder, tail_for

log = logging.getLogger(__name__)


def export_lora(run_dir: Path, out: Path, checkpoint: str = "best", merge: bool = False) -> list[Path]:
    """Write one folder per tuned modality into `out`; returns them.

    Without `merge`: the adapters in peft's format (load with `PeftModel.from_pretrained(model, folder)`).
    With `merge`: `model.safetensors` holding the tail's weights with the adapters merged in, under the
    encoder's own key names (load into the encoder with `load_state_dict(..., strict=False)`), and
    `export.json` saying which encoder, revision and keys they are.
    """
    ck = _checkpoint(run_dir, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for modality in _modalities(ck):
        dest = out / modality
        if dest.exists():
            raise FileExistsError(f"{dest} exists; choose another --out or remove it")
        source = ck.adapters / modality
        if merge:
            _write_merged(_tail(ck, modality), dest)
        else:
            shutil.copytree(source, dest)
        written.append(dest)
        log.info("exported %s %s to %s", modality, "merged weights" if merge else "adapters", dest)
    return written


def _checkpoint(run_dir: Path, name: str) -> Trained:
    ck = open_run(run_dir, name)  # the one loader: every file verified against checksums.json
    if not ck.cfg.lora.enabled:
        raise CheckpointError(f"{run_dir} is not a LoRA run (lora.enabled is false): it has no adapters")
    return ck


def _modalities(ck: Trained) -> list[str]:
    root = ck.adapters
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root is not None else []
    if not found:
        raise CheckpointError(f"{ck.checkpoint_dir} holds no adapters/<modality>/ folders; is it from a LoRA "
                              "run?")
    return found


def _tail(ck: Trained, modality: str) -> TunableEncoder:
    """The modality's tail as the run built it, with the checkpoint's adapters loaded."""
    from m3jepa.encoders import get_encoder_spec

    store = ck.encoders.get(modality)
    if store is None:
        raise CheckpointError(f"{ck.checkpoint_dir}: no store record for {modality}")
    spec = get_encoder_spec(store["encoder"])
    if spec.revision != store["revision"]:
        raise CheckpointError(f"{modality}: the run tuned {store['encoder']}@{store['revision']}, but the "
                              f"installed encoder is {spec.revision}; merging into other weights is wrong")
    tail = tail_for(spec, modality, ck.cfg.lora)
    tail.load_adapters(ck.adapters / modality)
    return tail


def _write_merged(tail: TunableEncoder, dest: Path) -> None:
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in tail.merged_state().items()}
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"))
    info = tail.info
    (tmp / "export.json").write_text(json.dumps({
        "encoder": info.encoder,
        "revision": info.revision,
        "modality": info.modality,
        "layer_index": info.geometry.layer_index,
        "tunable_layers": info.geometry.tunable_layers,
        "target_modules": list(info.target_modules),
        "keys": sorted(weights),
        "how_to_load": "encoder_model.load_state_dict(load_file('model.safetensors'), strict=False)",
    }, indent=2))
    tmp.rename(dest)
