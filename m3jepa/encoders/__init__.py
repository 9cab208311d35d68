"""Encoders: a registry of named frozen encoders (stage 1 only; imports transformers lazily)."""

from m3jepa.encoders.base import EncodedBatch, Encoder, EncoderError, EncoderSpec, Preprocessor
from m3jepa.encoders.device import resolve_device
from m3jepa.encoders.registry import get_encoder_spec, list_encoders

__all__ = [
    "EncodedBatch",
    "Encoder",
    "EncoderError",
    "EncoderSpec",
    "Preprocessor",
    "get_encoder_spec",
    "list_encoders",
    "resolve_device",
]
