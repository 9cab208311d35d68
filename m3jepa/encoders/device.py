"""Device and compute-dtype resolution for encoders (stage 1): auto, cpu, cuda, from the device table."""

from __future__ import annotations

import logging

import torch

from m3jepa.device_table import DEVICE_TABLE, auto_kind, names, visible
from m3jepa.encoders.base import EncoderError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> tuple[torch.device, torch.dtype]:
    """'auto' → (cuda, bfloat16) when CUDA is available, else (cpu, float32); 'cuda' without CUDA fails.

    The device table (`m3jepa.device_table`) decides: "auto" is its first visible accelerator, and the
    dtype is the row's compute dtype for large encoders; small ones may keep float32 (docs/encoders.md).
    """
    name = device.strip().lower()
    type_, _, index = name.partition(":")
    kind = auto_kind() if name == "auto" else DEVICE_TABLE.get(type_)
    if kind is None or (index and not (kind.per_rank and index.isdigit())):
        raise EncoderError(f"--device {device!r} is not one of {', '.join(names())}")
    if not kind.accelerator:
        return kind.device(), kind.encoder_dtype
    count = visible(kind)
    if count == 0:
        raise EncoderError(
            f"--device {device} was asked for but {kind.type.upper()} is not available in this torch "
            f"({torch.__version__}); pass --device cpu or --device auto"
        )
    dev = kind.device() if name == "auto" else torch.device(name)
    if dev.index is not None and dev.index >= count:
        raise EncoderError(f"--device {device}: only {count} {kind.type.upper()} device(s) exist")
    return dev, kind.encoder_dtype
