"""Float32 matrix products: exact, or TF32 on a GPU (`runtime.matmul_precision`), decided with the runtime.

torch computes float32 matmuls exactly by default. An Ampere or later GPU can run them as TF32 (inputs
rounded to 10 significant bits, float32 sums and results) at several times the speed, which every
GPU training stack turns on (nanoGPT, open_clip and torchtune set it at start-up); bf16 autocast leaves
few float32 matmuls (the float32 gates and InfoNCE logits), an fp32 run has nothing else. "auto" takes
it on a GPU. A CPU has no TF32: there "auto" is exact, and "high" is refused, not silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch

from m3jepa.config import ConfigError, RuntimeConfig
from m3jepa.device_table import kind_of

R = TypeVar("R")  # m3jepa.core.device.Runtime (which imports this module)

# torch's names: "highest" exact float32, "high" TF32 (or bf16x3) where the hardware has it
TF32 = "high"
EXACT = "highest"


def matmul_precision(cfg: RuntimeConfig, device: torch.device) -> str:
    """torch's float32 matmul precision for `device` that runtime.matmul_precision asks for (whether the
    device has TF32 is the device table's `tf32`)."""
    if not kind_of(device).tf32:
        if cfg.matmul_precision == TF32:
            what = "a CPU" if device.type == "cpu" else f"a {device.type} device"
            raise ConfigError(
                f'runtime.matmul_precision = "high" asks for TF32 float32 matmuls, which {what} does not '
                f'have (this run resolved to {device}); set "auto" or "highest", or runtime.precision = '
                '"bf16" for faster products on a CPU (the CPU fast path)'
            )
        return EXACT
    return TF32 if cfg.matmul_precision == "auto" else cfg.matmul_precision


def with_matmul_precision(runtime: R, cfg: RuntimeConfig, apply: bool = True) -> R:
    """`runtime` carrying its matmul precision, set in torch (process-wide) when `apply`.

    `resolve` passes apply=False when a test fakes the host's GPUs, so no global setting leaks.
    """
    precision = matmul_precision(cfg, runtime.device)  # type: ignore[attr-defined]
    if apply:
        torch.set_float32_matmul_precision(precision)
    return dataclasses.replace(runtime, matmul_precision=precision)
