"""The device table: everything m3jepa decides per accelerator type, one row per torch device type.

Stage 2/3's resolver (`m3jepa.core.device`), stage 1's encoder device (`m3jepa.encoders.device`), the
process group (`m3jepa.distributed.process_group`), checkpoints' RNG state, the store feed's memory probe
and batch pinning all take their answers from `DEVICE_TABLE`; nothing else names a device type. Adding an
accelerator type is one row here (and `config`'s accepted names; `tests/test_device.py` checks the two
agree) plus its tests. It sits at the bottom layer (torch only), so that stage 1 and `distributed`, which
may not import `core`, read the same table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceKind:
    """One accelerator type: its process-group backend, precision, memory handling and probes."""

    type: str  # torch device type ("cpu", "cuda")
    backend: str  # torch.distributed backend for ranks computing on it
    per_rank: bool  # under torchrun each rank owns device LOCAL_RANK (GPUs); else all ranks share it (CPU)
    autocast_dtype: torch.dtype  # runtime.precision = "bf16": the autocast dtype on this type
    encoder_dtype: torch.dtype  # stage 1: the compute dtype of large encoders (docs/encoders.md)
    pins: bool  # host tensors bound for it are page-locked first, so the copy is asynchronous
    fused_optimizer: bool  # torch's AdamW has a fused kernel for parameters on this type
    tf32: bool  # float32 matmuls may run as TF32 (runtime.matmul_precision "auto" takes it: core.precision)
    # runtime.grad_compression = "auto": the dtype DDP's gradient all-reduce sends ("none": the gradients'
    # own, "bf16": half the bytes; docs/training.md, "Multi-process")
    grad_compression: str
    # probes: functions of the host, so a test can fake a row (tests/test_device.py fakes CUDA)
    available: Callable[[], bool]
    count: Callable[[], int]
    supports_bf16: Callable[[torch.device], bool]
    set_current: Callable[[torch.device], None]  # make `device` this process's current one (per_rank)
    # the device's own random generator (dropout masks drawn there); None: the CPU's, saved as "rng"
    get_rng_state: Callable[[torch.device], torch.Tensor] | None
    set_rng_state: Callable[[torch.Tensor, torch.device], None] | None
    # the memory probe: free and total bytes of the device's own memory; None: it computes in host RAM
    # (no feed "device"; train.feed = "auto" and the model-size check count the host's RAM instead)
    free_memory: Callable[[torch.device], int] | None
    total_memory: Callable[[torch.device], int] | None
    # `train-predictor` without a pipeline starts its batch here (halved until every direction has that many
    # pairs: m3jepa.train.recipes.sized_values): 128 keeps a CPU step short; a GPU needs thousands of rows
    # a step to leave the launch-bound regime (docs/training.md, "The GPU recipe")
    train_batch: int = 128
    # torch.compile's "reduce-overhead" mode captures the compiled step as device graphs (CUDA graphs):
    # one launch for the whole graph, where the launches themselves are the cost (runtime.compile)
    graphs: bool = False

    @property
    def accelerator(self) -> bool:
        """True for a device with memory of its own (everything but the CPU)."""
        return self.free_memory is not None

    def device(self, index: int | None = None) -> torch.device:
        """torch.device of this type (index None: the type alone, the current device of that type)."""
        return torch.device(self.type) if index is None else torch.device(self.type, index)


def _no_op(device: torch.device) -> None:
    return None


def _cuda_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported()


DEVICE_TABLE: dict[str, DeviceKind] = {
    "cpu": DeviceKind(
        type="cpu",
        backend="gloo",
        per_rank=False,
        autocast_dtype=torch.bfloat16,
        encoder_dtype=torch.float32,  # bf16 matmuls on a CPU are emulated in most builds: slower
        pins=False,
        fused_optimizer=True,
        tf32=False,
        grad_compression="none",
        available=lambda: True,
        count=lambda: 1,
        supports_bf16=lambda device: True,
        set_current=_no_op,
        get_rng_state=None,
        set_rng_state=None,
        free_memory=None,
        total_memory=None,
    ),
    "cuda": DeviceKind(
        type="cuda",
        backend="nccl",
        per_rank=True,
        autocast_dtype=torch.bfloat16,
        encoder_dtype=torch.bfloat16,
        pins=True,
        fused_optimizer=True,
        tf32=True,
        grad_compression="bf16",
        available=torch.cuda.is_available,
        count=torch.cuda.device_count,
        supports_bf16=_cuda_bf16,
        set_current=torch.cuda.set_device,
        get_rng_state=lambda device: torch.cuda.get_rng_state(device),
        set_rng_state=lambda state, device: torch.cuda.set_rng_state(state, device),
        free_memory=lambda device: int(torch.cuda.mem_get_info(device)[0]),
        total_memory=lambda device: int(torch.cuda.get_device_properties(device).total_memory),
        train_batch=4096,
        graphs=True,
    ),
}
CPU_KIND = DEVICE_TABLE["cpu"]


def kind_of(device: torch.device | str) -> DeviceKind:
    """The table row of `device` (a torch.device, or a name such as "cuda:1"); ValueError naming the
    table's types for one it does not have (the meta device included: nothing computes there)."""
    name = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    try:
        return DEVICE_TABLE[name]
    except KeyError:
        raise ValueError(
            f"device type {name!r} is not in m3jepa's device table ({', '.join(DEVICE_TABLE)}); "
            "add a row to m3jepa/device_table.py"
        ) from None


def visible(kind: DeviceKind) -> int:
    """How many devices of `kind` this process sees (0 when its type is not available)."""
    return kind.count() if kind.available() else 0


def auto_kind(table: dict[str, DeviceKind] | None = None) -> DeviceKind:
    """What "auto" means on this host: the first accelerator of the table that is visible, else the CPU."""
    table = DEVICE_TABLE if table is None else table
    for kind in table.values():
        if kind.accelerator and visible(kind) > 0:
            return kind
    return table["cpu"]


def names() -> list[str]:
    """The device names a config may give: auto, each type, and type:N for per-rank types."""
    out = ["auto"]
    for kind in DEVICE_TABLE.values():
        out += [kind.type] + ([f"{kind.type}:N"] if kind.per_rank else [])
    return out
