"""Transformers-backed encoders: DINOv2 image towers and text models (BERT-like or decoder LMs)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from m3jepa.encoders.base import BadItemError, EncodedBatch, EncoderError, EncoderSpec
from m3jepa.encoders.image import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessor
from m3jepa.encoders.pooling import masked_mean, unpad

log = logging.getLogger(__name__)

KINDS = ("pooled", "tokens")
LAYER_MIXES = ("last", "last2-mean")


def check_kind(kind: str) -> None:
    """Refuse a kind other than 'pooled' or 'tokens'."""
    if kind not in KINDS:
        raise EncoderError(f"kind={kind!r} is not one of {', '.join(KINDS)}")


def load_tokenizer(model_dir: str) -> Any:
    """A fast tokenizer from a local directory; pad token = eos when the tokenizer has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, use_fast=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise EncoderError(f"cannot load a tokenizer from {model_dir}: {e}") from e
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token  # decoder LMs (Llama) ship without a pad token
    tok.padding_side = "right"
    return tok


class TextPreprocessor:
    """Text → {"input_ids", "attention_mask"} (1-D); pads on the right in `collate`.

    Picklable by construction: it carries the tokenizer directory and loads the (fast) tokenizer
    lazily in whichever process calls it, so DataLoader workers never receive a tokenizer object.
    """

    def __init__(self, model_dir: str, max_length: int):
        self.model_dir = str(model_dir)
        self.max_length = max_length
        self._tok: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "max_length": self.max_length, "_tok": None}

    @property
    def tokenizer(self) -> Any:
        """The loaded tokenizer (loaded on first use in this process)."""
        if self._tok is None:
            self._tok = load_tokenizer(self.model_dir)
        return self._tok

    @property
    def pad_id(self) -> int:
        """The id written into padding positions (never attended to, never pooled)."""
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else 0)

    def __call__(self, payload: str) -> dict[str, torch.Tensor]:
        """Tokenize one text, truncated to max_length tokens; BadItemError on empty text."""
        if not isinstance(payload, str) or not payload.strip():
            raise BadItemError(f"text {str(payload)[:40]!r}", "empty or whitespace-only text")
        enc = self.tokenizer(payload, truncation=True, max_length=self.max_length)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)  # (T,)
        if ids.numel() == 0:
            raise BadItemError(f"text {payload[:40]!r}", "tokenizes to no tokens")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Right-pad to the longest item: {"input_ids": (B, T), "attention_mask": (B, T)}."""
        longest = max(it["input_ids"].numel() for it in items)
        ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(items), longest), dtype=torch.long)  # (B, T)
        for i, it in enumerate(items):
            n = it["input_ids"].numel()
            ids[i, :n] = it["input_ids"]
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}


def load_auto_model(model_dir: str, device: torch.device, dtype: torch.dtype) -> Any:
    """AutoModel from a local directory, eval mode, frozen; never runs remote code."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise EncoderError(f"cannot load a transformers model from {model_dir}: {e}") from e
    model.requires_grad_(False)
    return model.to(device).eval()


class HFTextEncoder:
    """A text model pooled by a masked mean of one layer mix ('last' or the mean of the last two)."""

    def __init__(self, spec: EncoderSpec, model_dir: str | Path, device: torch.device, dtype: torch.dtype,
                 max_length: int, layers: str, normalize: bool = False):
        if layers not in LAYER_MIXES:
            raise EncoderError(f"layers={layers!r} is not one of {', '.join(LAYER_MIXES)}")
        self.spec = spec
        self.device = device
        self.layers = layers
        self.normalize = normalize
        self.preprocessor = TextPreprocessor(str(model_dir), max_length)
        self.model = load_auto_model(str(model_dir), device, dtype)

    def hidden(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model: the layer mix (B, T, D) float32 on CPU and the mask (B, T)."""
        ids = batch["input_ids"].to(self.device)  # (B, T)
        mask = batch["attention_mask"].to(self.device)  # (B, T)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=self.layers != "last")
            if self.layers == "last":
                mix = out.last_hidden_state.float()  # (B, T, D)
            else:
                # the official M3-JEPA release: mean of the last two hidden layers
                mix = (out.hidden_states[-1].float() + out.hidden_states[-2].float()) / 2  # (B, T, D)
        return mix.cpu(), batch["attention_mask"].cpu()

    def encode(self, batch: dict[str, Any], kind: str) -> EncodedBatch:
        """Pooled (B, D) masked mean (never over padding); tokens = the unpadded layer mix."""
        check_kind(kind)
        mix, mask = self.hidden(batch)
        pooled = masked_mean(mix, mask)  # (B, D)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        tokens = unpad(mix, mask) if kind == "tokens" else None
        return EncodedBatch(pooled=pooled, tokens=tokens)


def dinov2_preprocessor() -> ImagePreprocessor:
    """DINOv2's evaluation transform: bicubic resize 256, center crop 224, ImageNet mean/std."""
    return ImagePreprocessor(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, resample="bicubic")


class DinoV2Encoder:
    """A DINOv2 backbone: pooled = CLS of the final (layer-normed) hidden state; tokens = CLS + patches."""

    def __init__(self, spec: EncoderSpec, model_dir: str | Path, device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.preprocessor = dinov2_preprocessor()
        self.model = load_auto_model(str(model_dir), device, dtype)

    def encode(self, batch: dict[str, Any], kind: str) -> EncodedBatch:
        """Pooled (B, D) = last_hidden_state[:, 0]; tokens = B x (1 + P, D)."""
        check_kind(kind)
        pixels = batch["pixel_values"].to(self.device, self.dtype)  # (B, 3, H, W)
        with torch.no_grad():
            hidden = self.model(pixel_values=pixels).last_hidden_state.float().cpu()  # (B, 1 + P, D)
        pooled = hidden[:, 0].contiguous()  # (B, D)
        tokens = list(hidden.unbind(0)) if kind == "tokens" else None
        return EncodedBatch(pooled=pooled, tokens=tokens)
