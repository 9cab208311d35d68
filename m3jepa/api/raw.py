"""Raw inputs (captions, image paths, audio paths, class names) to stage-1 latents, with the encoders a
model was trained on: built lazily, checked against the revisions the run recorded."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

BATCH = 64  # raw items per encoder call


class ApiError(ValueError):
    """A request the model cannot serve; the message names the input or the setting and the fix."""


class RawEncoders:
    """modality → the stage-1 encoder of the run (or export), built on first use on the model's device.

    `encoders` is {modality: {"encoder": name, "revision": rev}} as the run recorded it; `vocabularies`
    {"label": [class names]} binds the one-hot label encoder to the trained class list. A LoRA-tuned
    modality goes through the encoder's frozen prefix and then its tuned tail (`tails`).
    `query_precision="int8"` (opt-in, CPU only) encodes text *queries* (`encode(..., query=True)`) with
    MiniLM's Linear layers in int8 (`m3jepa.accel.text`); everything else stays float32.
    """

    def __init__(
        self,
        encoders: dict[str, dict[str, str]],
        device: torch.device,
        store_dtype: str,
        vocabularies: dict[str, list[str]],
        tails: dict[str, Any] | None = None,
        lora_layers: int | str | None = None,
        query_precision: str = "fp32",
    ) -> None:
        if query_precision != "fp32":  # refused at load, before any request, when it cannot run here
            from m3jepa.accel.text import QueryEncoderError, check_precision

            try:
                check_precision(query_precision, device)
            except QueryEncoderError as e:
                raise ApiError(str(e)) from None
        self.query_precision = query_precision
        self.encoders = encoders
        self.device = device
        self.store_dtype = np.float16 if store_dtype == "float16" else np.float32
        self.vocabularies = vocabularies
        self.tails = tails or {}
        self.lora_layers = lora_layers
        self._built: dict[str, Any] = {}

    def encode(self, modality: str, items: Sequence[str | Path], query: bool = False) -> torch.Tensor:
        """(N, D_m) float32 latents of `items` on the model's device, rounded through the store dtype so
        a raw input and its stored row give the predictor the same numbers (with query=True and an int8
        query precision, text goes through the int8 encoder instead: close, not equal)."""
        if modality not in self.encoders:
            raise ApiError(f"this model has no {modality!r} input; its modalities are "
                           f"{', '.join(sorted(self.encoders))}")
        if not items:
            raise ApiError(f"no {modality} inputs given")
        payloads = [self._payload(modality, x) for x in items]
        encoder = self._query_encoder(modality) if query else self._encoder(modality)
        out = []
        for lo in range(0, len(payloads), BATCH):
            out.append(self._encode_batch(modality, encoder, payloads[lo : lo + BATCH]))
        latents = torch.cat(out)  # (N, D_m) float32
        return latents.half().float() if self.store_dtype is np.float16 else latents

    def _payload(self, modality: str, item: str | Path) -> str:
        from m3jepa.data.records import encoder_modality

        kind = encoder_modality(modality)
        if kind in ("image", "audio"):
            path = Path(item)
            if not path.is_file():
                raise ApiError(f"{modality} input {str(item)!r} is not a file")
            return str(path)
        text = str(item)
        if not text.strip():
            raise ApiError(f"an empty {modality} input; give some text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(f"{modality} input {text[:40]!r} is not valid text ({e.reason}); "
                           "remove the lone surrogate") from None
        return text

    def _encoder(self, modality: str) -> Any:
        if modality not in self._built:
            self._built[modality] = self._build(modality)
        return self._built[modality]

    def _query_encoder(self, modality: str) -> Any:
        """The encoder for queries: the int8 copy of a text encoder when asked for, else the plain one."""
        from m3jepa.data.records import encoder_modality

        if self.query_precision == "fp32" or encoder_modality(modality) != "text":
            return self._encoder(modality)
        key = f"{modality}:{self.query_precision}"
        if key not in self._built:
            from m3jepa.accel.text import QueryEncoderError, quantize_text_encoder

            try:
                self._built[key] = quantize_text_encoder(self._encoder(modality), self.device)
            except QueryEncoderError as e:
                raise ApiError(str(e)) from None
        return self._built[key]

    def _build(self, modality: str) -> Any:
        from m3jepa.encoders import get_encoder_spec, resolve_device

        want = self.encoders[modality]
        if want["encoder"] == "onehot":
            from m3jepa.encoders import onehot

            if "label" not in self.vocabularies:
                raise ApiError("this model's label encoder needs its class list, which it does not have")
            spec = onehot.spec(self.vocabularies["label"])
        else:
            spec = get_encoder_spec(want["encoder"])
        if spec.revision != want["revision"]:
            raise ApiError(
                f"the installed {spec.name} is revision {spec.revision}, but this model was trained on "
                f"{want['revision']}: install the encoder it was trained on"
            )
        device, dtype = resolve_device(str(self.device))  # "cuda:1" stays cuda:1
        log.info("loading the %s encoder %s on %s", modality, spec.name, device)
        encoder = spec.factory(device, dtype)
        if modality in self.tails:
            from m3jepa.encoders.layers import get_layer_stack

            n = len(get_layer_stack(encoder, 1).layers) if self.lora_layers == "all" else self.lora_layers
            return _TunedEncoder(encoder, get_layer_stack(encoder, int(n)), self.tails[modality])
        return encoder

    def _encode_batch(self, modality: str, encoder: Any, payloads: list[str]) -> torch.Tensor:
        from m3jepa.data.records import BadItemError

        pre = encoder.preprocessor
        try:
            batch = pre.collate([pre(p) for p in payloads])
        except BadItemError as e:
            raise ApiError(f"{modality} input: {e}") from None
        with torch.inference_mode():
            pooled = encoder.encode(batch, "pooled").pooled  # (b, D_m)
        return pooled.float().to(self.device)


class _TunedEncoder:
    """A LoRA-tuned modality: the encoder's frozen prefix, then the run's tail with its adapters."""

    def __init__(self, encoder: Any, stack: Any, tail: Any) -> None:
        self.preprocessor = encoder.preprocessor
        self.stack = stack
        self.tail = tail

    def encode(self, batch: dict[str, Any], kind: str) -> Any:
        from m3jepa.encoders.base import EncodedBatch

        states = self.stack.prefix(batch)  # (B, T, D_state) on the host, as a prefix store holds them
        device = self.tail.stack.device
        with torch.no_grad():
            pooled = self.tail(states.states.to(device), states.mask.bool().to(device))  # (B, D)
        return EncodedBatch(pooled=pooled)
