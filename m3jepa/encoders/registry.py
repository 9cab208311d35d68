"""The encoder registry: names → EncoderSpecs, computed cheaply (no weights loaded), with revisions."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m3jepa.encoders.base import Encoder, EncoderError, EncoderSpec
from m3jepa.encoders.hub import cached_snapshot, dir_revision, offline_error, read_config

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
# DINOv2 presets: hub id and hidden size (the pooled CLS dimension)
DINOV2 = {
    "dinov2-small": ("facebook/dinov2-small", 384),
    "dinov2-base": ("facebook/dinov2-base", 768),
    "dinov2-large": ("facebook/dinov2-large", 1024),
    "dinov2-giant": ("facebook/dinov2-giant", 1536),
}
# decoder LM presets: hub id and hidden size
LMS = {"llama3-8b": ("meta-llama/Meta-Llama-3-8B", 4096)}
LM_MAX_LENGTH = 512  # longer texts are truncated; captions are far shorter
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- transformers specs


def _hub_spec(name: str, repo_id: str, modality: str, dim: int) -> EncoderSpec:
    snapshot = cached_snapshot(repo_id)
    revision = f"hf-hub:{repo_id}@{snapshot.name if snapshot else 'not-cached'}"
    # an uncached preset still has a spec (listing it is cheap); building it fails with the offline error
    factory = None if snapshot else functools.partial(_raise, offline_error(repo_id))
    return _transformers_spec(name, modality, dim, revision, factory, snapshot)


def hf_spec(target: str) -> EncoderSpec:
    """`hf:<target>`: a local directory, or a hub id already in the local cache (else EncoderError)."""
    path = Path(target).expanduser()
    if path.is_dir():
        model_dir, revision = path.resolve(), None
    elif _HUB_ID.match(target):
        model_dir = cached_snapshot(target)
        if model_dir is None:
            raise offline_error(target)
        revision = f"hf-hub:{target}@{model_dir.name}"
    else:
        raise EncoderError(f"hf:{target}: no such directory (pass hf:/path/to/a/transformers/model)")
    config = read_config(model_dir)
    revision = revision or dir_revision(model_dir)
    audio = _audio_dir_spec(f"{HF_PREFIX}{target}", model_dir, revision, config.get("model_type"))
    if audio is not None:
        return audio
    modality = "image" if config.get("model_type") == "dinov2" else "text"
    stack = "dinov2" if modality == "image" else text_stack(config)
    if modality == "text" and _looks_visual(config):
        raise EncoderError(
            f"hf:{target}: model_type {config.get('model_type')!r} is a vision model; only dinov2 image "
            f"models and text models are supported through hf:"
        )
    dim = config.get("hidden_size")
    if not isinstance(dim, int):
        raise EncoderError(f"hf:{target}: config.json has no integer hidden_size")
    spec = _transformers_spec(f"{HF_PREFIX}{target}", modality, dim, revision, None, model_dir)
    return dataclasses.replace(spec, stack=stack)


def text_stack(config: dict[str, Any]) -> str | None:
    """The layer stack of a transformers text model, from its config.json: Llama-family decoders (RMS
    norm and grouped key/value heads: Llama, Mistral, Qwen2, ...) are "llama", BERT-like encoders (token
    type embeddings) "bert"; None for any other."""
    if "rms_norm_eps" in config and "num_key_value_heads" in config:
        return "llama"
    if "type_vocab_size" in config:
        return "bert"
    return None


def _audio_dir_spec(name: str, model_dir: Path, revision: str, model_type: Any) -> EncoderSpec | None:
    # CLAP and LanguageBind-Audio directories are audio encoders (m3jepa/encoders/audio.py)
    from m3jepa.encoders import audio

    if model_type in audio.CLAP_TYPES:
        return audio.clap_dir_spec(name, model_dir, revision)
    if model_type in audio.LANGUAGEBIND_TYPES:
        return audio.languagebind_dir_spec(name, model_dir, revision)
    return None


def _looks_visual(config: dict[str, Any]) -> bool:
    # image towers carry these keys; text models do not
    return "num_channels" in config and "patch_size" in config


def _transformers_spec(name: str, modality: str, dim: int, revision: str,
                       factory: Callable[..., Encoder] | None, model_dir: Path | None = None) -> EncoderSpec:
    if modality == "image":
        pooling, layers = "cls", "last"
        factory = factory or functools.partial(_build_dinov2, name, model_dir)
    else:
        pooling, layers = "masked-mean", "last2-mean"
        factory = factory or functools.partial(_build_text, name, model_dir)
    return EncoderSpec(name=name, modality=modality, dim=dim, pooling=pooling, revision=revision,
                       layers=layers, factory=factory)


def _raise(error: EncoderError, device: torch.device, dtype: torch.dtype) -> Encoder:
    raise error


def _build_dinov2(name: str, model_dir: Path, device: torch.device, dtype: torch.dtype) -> Encoder:
    from m3jepa.encoders.hf import DinoV2Encoder

    return DinoV2Encoder(get_encoder_spec(name), model_dir, device, dtype)


def _build_text(name: str, model_dir: Path, device: torch.device, dtype: torch.dtype) -> Encoder:
    from m3jepa.encoders.hf import HFTextEncoder

    return HFTextEncoder(get_encoder_spec(name), model_dir, device, dtype, max_length=LM_MAX_LENGTH,
                         layers="last2-mean")


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class EncoderEntry:
    """One named encoder: how its spec is computed (cheaply: no weights) and its layer stack, which is
    also its LoRA target family (None: it has none, so `--kind prefix` and LoRA refuse it)."""

    spec: Callable[[], EncoderSpec]
    stack: str | None


def _module_spec(module: str, function: str = "spec") -> Callable[[], EncoderSpec]:
    """The spec function of a module, imported only when its encoder is asked for."""
    return lambda: getattr(importlib.import_module(module), function)()


# name → entry, as datasets are (m3jepa/data/__init__.py); `hf:<path>` reaches any local transformers
# model besides, its stack read from its config.json (hf_spec).
ENCODERS: dict[str, EncoderEntry] = {
    "efficientnet-lite0": EncoderEntry(_module_spec("m3jepa.encoders.efficientnet"), "efficientnet"),
    "minilm-l6": EncoderEntry(_module_spec("m3jepa.encoders.minilm"), "bert"),
    # labels; unbound until stage 1 gives it the dataset's classes (onehot.py)
    "onehot": EncoderEntry(_module_spec("m3jepa.encoders.onehot"), None),
    # audio presets; see docs/audio.md
    "aisfx": EncoderEntry(_module_spec("m3jepa.encoders.aisfx"), None),
    "clap-htsat": EncoderEntry(_module_spec("m3jepa.encoders.audio", "clap_preset_spec"), None),
    "languagebind-audio": EncoderEntry(_module_spec("m3jepa.encoders.audio", "languagebind_preset_spec"),
                                       None),
    **{name: EncoderEntry(functools.partial(_hub_spec, name, repo, "image", dim), "dinov2")
       for name, (repo, dim) in DINOV2.items()},
    **{name: EncoderEntry(functools.partial(_hub_spec, name, repo, "text", dim), "llama")
       for name, (repo, dim) in LMS.items()},
}


def list_encoders() -> list[str]:
    """The named encoders (any local transformers model is also reachable as `hf:<path>`)."""
    return sorted(ENCODERS)


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec of a named encoder or `hf:<path or cached hub id>`; loads no weights."""
    entry = ENCODERS.get(name)
    if entry is not None:
        return dataclasses.replace(entry.spec(), stack=entry.stack)
    if name.startswith(HF_PREFIX):
        return hf_spec(name[len(HF_PREFIX):])
    raise EncoderError(
        f"unknown encoder {name!r}; known encoders: {', '.join(list_encoders())}, "
        f"or hf:<local path> for a local transformers model"
    )
