"""The encoder contract: a spec in a registry, a picklable preprocessor, and an encode step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from m3jepa.data.records import BadItemError, Blob  # noqa: F401  (re-exported: encoders raise it)


class EncoderError(ValueError):
    """An encoder that cannot be built or run as asked; the message says what to install or pass."""


@dataclass(frozen=True)
class EncoderSpec:
    """What the store manifest records about an encoder, plus how to build it."""

    name: str  # registry name, e.g. "efficientnet-lite0", "hf:/path/to/model"
    modality: str  # image | text | audio | label
    dim: int  # pooled latent dimension D
    pooling: str  # e.g. "gap", "cls", "cls+patchmean", "masked-mean(last2)"
    revision: str  # a content hash or version of the weights
    layers: str  # which layers feed the latent, e.g. "last", "last2-mean"
    factory: Callable[[torch.device, torch.dtype], Encoder]
    # its layer stack (a key of encoders.layers.STACKS), which is also its LoRA target family (a key of
    # lora.tunable.FAMILY_TARGETS): efficientnet | dinov2 | bert | llama; None: no layer stack (audio,
    # labels). The registry's table sets it (encoders/registry.py).
    stack: str | None = None


@dataclass
class EncodedBatch:
    """Latents of one batch: pooled (B, D) and, for kind = tokens, one (T_i, D) tensor per row."""

    pooled: torch.Tensor  # (B, D)
    tokens: list[torch.Tensor] | None = None  # B x (T_i, D), padding removed


class Preprocessor(Protocol):
    """Turns one payload into tensors; picklable, so it runs inside DataLoader worker processes."""

    def __call__(self, payload: str | Blob) -> dict[str, torch.Tensor]:
        """Decode and resize (or tokenize) one item (a path, a text, or a Blob of a tar member's bytes);
        raise BadItemError on bad input."""
        ...

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Stack (or pad) items into one batch."""
        ...


class Encoder(Protocol):
    """A loaded model: its spec, its preprocessor, and a no-grad encode step."""

    spec: EncoderSpec
    preprocessor: Preprocessor

    def encode(self, batch: dict[str, Any], kind: str) -> EncodedBatch:
        """Run the model on one collated batch; kind is 'pooled' or 'tokens'."""
        ...
