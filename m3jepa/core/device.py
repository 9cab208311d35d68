"""Device and precision, resolved once: the torch device, the process-group backend and autocast.

Every stage-2/3 entry point calls `resolve(cfg.runtime)` once and passes the `Runtime` down; nothing below
picks a device of its own (as in open_clip's init_distributed_device and nanoGPT's `device_type`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, fields
from typing import Any

import torch

from m3jepa.config import ConfigError, RuntimeConfig
from m3jepa.core.precision import with_matmul_precision
from m3jepa.distributed import DistInfo, env_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where this process computes: its device, the process-group backend for it, and the precision."""

    device: torch.device
    precision: str = "fp32"  # fp32 | bf16: bf16 autocast over float32 master weights
    backend: str = "gloo"  # nccl (each rank on its own GPU) | gloo (CPUs)
    matmul_precision: str = "highest"  # torch's float32 matmul precision set for it (m3jepa.core.precision)

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def cpu_fast_path(self) -> bool:
        """The CPU fast path (m3jepa.accel): bf16 on a CPU device."""
        return self.bf16 and self.device.type == "cpu"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device type when the precision asks for it, else a no-op context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


CPU_DEVICE = torch.device("cpu")
CPU = Runtime(CPU_DEVICE)


def resolve(
    cfg: RuntimeConfig,
    info: DistInfo | None = None,
    *,
    cuda_available: bool | None = None,
    cuda_count: int | None = None,
) -> Runtime:
    """The Runtime `cfg` asks for on this host, for this torchrun rank.

    auto: cuda when a GPU is visible, else cpu. Under torchrun every rank takes the GPU of its local rank
    (cuda:LOCAL_RANK) with nccl; cpu ranks use gloo. An explicit cuda:N is honoured for one process and
    refused under torchrun (ranks would share a GPU). `cuda_available`/`cuda_count` exist for tests.
    """
    info = info or env_info()
    real = cuda_available is None and cuda_count is None  # a faked host changes no process-wide setting
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    count = (torch.cuda.device_count() if available else 0) if cuda_count is None else cuda_count
    want = cfg.device
    if want == "auto":
        want = "cuda" if available and count > 0 else "cpu"
    if want == "cpu":
        return with_matmul_precision(Runtime(torch.device("cpu"), cfg.precision, "gloo"), cfg, real)
    if not available or count == 0:
        raise ConfigError(
            f"runtime.device={cfg.device!r} but torch sees no CUDA device (torch {torch.__version__}, "
            f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA); "
            'set runtime.device = "cpu" or "auto"'
        )
    if want == "cuda":
        index = info.local_rank if info.enabled else 0
    else:
        index = int(want.split(":")[1])
        if info.enabled:
            raise ConfigError(
                f"runtime.device={cfg.device!r} pins every torchrun rank to one GPU; "
                'set runtime.device = "cuda" (each rank takes cuda:LOCAL_RANK) or "auto"'
            )
    if index >= count:
        raise ConfigError(
            f"runtime.device asks for cuda:{index} but only {count} CUDA device(s) are visible; "
            f"set runtime.device = \"cuda:N\" with N < {count}, or fewer processes per node"
        )
    if cfg.precision == "bf16" and cuda_available is None and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"cuda:{index} does not support bf16; set runtime.precision = \"fp32\"")
    return with_matmul_precision(Runtime(torch.device("cuda", index), cfg.precision, "nccl"), cfg, real)


def to_device(x: Any, device: torch.device) -> Any:
    """x on `device`: a tensor, a {name: value} dict, or a dataclass of tensors (the LoRA mode's
    PrefixBatch); a copy from pinned host memory does not block.

    Host tensors bound for a GPU are pinned first (the store feed pins on its read-ahead thread already),
    so the copy is asynchronous and overlaps the compute queued before it.
    """
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if dataclasses.is_dataclass(x):
        return dataclasses.replace(x, **{f.name: to_device(getattr(x, f.name), device) for f in fields(x)})
    if x.device == device:
        return x
    if device.type == "cuda":
        return pin(x).to(device, non_blocking=True)
    return x.to(device)


def pin(x: Any) -> Any:
    """x (as to_device takes it) in page-locked host memory (a no-op for tensors already pinned or not on
    the CPU)."""
    if isinstance(x, dict):
        return {k: pin(v) for k, v in x.items()}
    if dataclasses.is_dataclass(x):
        return dataclasses.replace(x, **{f.name: pin(getattr(x, f.name)) for f in fields(x)})
    return x.pin_memory() if x.device.type == "cpu" and not x.is_pinned() else x
