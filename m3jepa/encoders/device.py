"""Device and compute-dtype resolution for encoders: auto, cpu, cuda."""

from __future__ import annotations

import logging

import torch

from m3jepa.encoders.base import EncoderError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> tuple[torch.device, torch.dtype]:
    """'auto' → (cuda, bfloat16) when CUDA is available, else (cpu, float32); 'cuda' without CUDA fails.

    The dtype is the compute dtype for large encoders; small ones may keep float32 (see docs/encoders.md).
    """
    name = device.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu"), torch.float32
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise EncoderError(
                f"--device {device} was asked for but CUDA is not available in this torch "
                f"({torch.__version__}); pass --device cpu or --device auto"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EncoderError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev, torch.bfloat16
    raise EncoderError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")
