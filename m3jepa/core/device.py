"""Device and precision, resolved once: the torch device, the process-group backend and autocast.

Every stage-2/3 entry point calls `resolve(cfg.runtime)` once and passes the `Runtime` down; nothing below
picks a device of its own (as in open_clip's init_distributed_device and nanoGPT's `device_type`). What
each device type means (backend, autocast dtype, pinning, RNG, memory probe) is one row of the device
table, `m3jepa.device_table.DEVICE_TABLE`, re-exported here with `kind_of`.
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
from m3jepa.device_table import DEVICE_TABLE, DeviceKind, auto_kind, kind_of, visible
from m3jepa.distributed import DistInfo, env_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where this process computes: its device, the process-group backend for it, and the precision."""

    device: torch.device
    precision: str = "fp32"  # fp32 | bf16: bf16 autocast over float32 master weights
    backend: str = "gloo"  # the device table's backend for the device type: nccl (GPUs) | gloo (CPUs)
    matmul_precision: str = "highest"  # torch's float32 matmul precision set for it (m3jepa.core.precision)
    compile: str = "off"  # torch.compile mode of the training step, or off (m3jepa.core.compiled)

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def kind(self) -> DeviceKind:
        """The device table's row of this device type (backend, pinning, RNG, memory probe, dtypes)."""
        return kind_of(self.device)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def cpu_fast_path(self) -> bool:
        """The CPU fast path (m3jepa.accel): bf16 on a CPU device."""
        return self.bf16 and self.device.type == "cpu"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the table's dtype on this device type when the precision asks for it, else a no-op."""
        return torch.autocast(self.device.type, dtype=self.kind.autocast_dtype, enabled=self.bf16)


CPU_DEVICE = torch.device("cpu")
CPU = Runtime(CPU_DEVICE)


def resolve(
    cfg: RuntimeConfig,
    info: DistInfo | None = None,
    *,
    cuda_available: bool | None = None,
    cuda_count: int | None = None,
    table: dict[str, DeviceKind] | None = None,
) -> Runtime:
    """The Runtime `cfg` asks for on this host, for this torchrun rank, from the device table.

    auto: the first accelerator of the table that is visible (cuda), else cpu. Under torchrun every rank
    of a per-rank type takes the device of its local rank (cuda:LOCAL_RANK); the backend is the table's
    (nccl for GPUs, gloo for CPUs). An explicit cuda:N is honoured for one process and refused under
    torchrun (ranks would share a GPU). `table` (a faked one) and `cuda_available`/`cuda_count` (which
    fake the cuda row's probes) exist for tests.
    """
    info = info or env_info()
    real = cuda_available is None and cuda_count is None and table is None  # a faked host changes no
    # process-wide setting
    table = dict(DEVICE_TABLE if table is None else table)
    if cuda_available is not None or cuda_count is not None:
        table["cuda"] = fake_cuda(bool(cuda_available), cuda_count or 0, table["cuda"])
    want = cfg.device
    kind = auto_kind(table) if want == "auto" else table[kind_of(want).type]
    if not kind.accelerator:
        return _runtime(kind.device(), kind, cfg, real)
    count = visible(kind)
    if count == 0:
        raise ConfigError(
            f"runtime.device={cfg.device!r} but torch sees no {kind.type.upper()} device (torch "
            f"{torch.__version__}, built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA); "
            'set runtime.device = "cpu" or "auto"'
        )
    if ":" not in want:
        index = info.local_rank if info.enabled and kind.per_rank else 0
    else:
        index = int(want.split(":")[1])
        if info.enabled:
            raise ConfigError(
                f"runtime.device={cfg.device!r} pins every torchrun rank to one GPU; "
                f'set runtime.device = "{kind.type}" (each rank takes {kind.type}:LOCAL_RANK) or "auto"'
            )
    if index >= count:
        raise ConfigError(
            f"runtime.device asks for {kind.type}:{index} but only {count} {kind.type.upper()} device(s) "
            f'are visible; set runtime.device = "{kind.type}:N" with N < {count}, or fewer processes per node'
        )
    device = kind.device(index)
    if cfg.precision == "bf16" and not kind.supports_bf16(device):
        raise ConfigError(f'{device} does not support bf16; set runtime.precision = "fp32"')
    return _runtime(device, kind, cfg, real)


def _runtime(device: torch.device, kind: DeviceKind, cfg: RuntimeConfig, apply: bool) -> Runtime:
    """The Runtime of `device`, or a ConfigError for a runtime.compile it cannot honour (a mode the device
    lacks, or the CPU fast path, whose own kernels compile is not built for)."""
    runtime = Runtime(device, cfg.precision, kind.backend, compile=cfg.compile)
    runtime = with_matmul_precision(runtime, cfg, apply)
    mode = runtime.compile
    if mode == "reduce-overhead" and not kind.graphs:
        raise ConfigError(
            f'runtime.compile = "reduce-overhead" captures the step as CUDA graphs, which {device} has no '
            'equivalent of; set runtime.compile = "default" (or "off")'
        )
    if mode != "off" and runtime.cpu_fast_path:
        raise ConfigError(
            f"runtime.compile = {mode!r} compiles the plain training step, but bf16 on a CPU takes the CPU "
            "fast path (m3jepa.accel: its own kernels, bf16 weight shadows); set runtime.precision = "
            '"fp32" to compile on a CPU, or runtime.compile = "off"'
        )
    return runtime


def fake_cuda(available: bool, count: int, row: DeviceKind | None = None) -> DeviceKind:
    """The cuda row with its probes replaced (tests: a host with `count` GPUs, bf16 on all of them)."""
    return dataclasses.replace(
        DEVICE_TABLE["cuda"] if row is None else row,
        available=lambda: available,
        count=lambda: count,
        supports_bf16=lambda device: True,
    )


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
    if kind_of(device).pins:
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
