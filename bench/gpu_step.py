"""One training step on a device, accounted: host syncs, operations and kernels per step, and MFU against
both the card's datasheet bf16 peak and the matmul rate measured in the same run.

`bench.gpu` uses these for its training part; the GPU first-contact kit can call them on any step:

    from bench import gpu_step
    gpu_step.datasheet_peak(torch.cuda.get_device_name())   # Datasheet(card, bf16_tflops, source) or None
    gpu_step.account(step, device, steps=2)                 # {"ops_per_step": ..., "syncs_per_step": ...}
    gpu_step.mfu(samples_per_s, flops_per_sample, peak_tflops)

Counting (docs/benchmarks.md §6):
- operations: `m3jepa.train.audit.StepAudit`, every aten operation the step dispatches, on any device
  ("compute": all but views, aliases and bare allocations);
- host syncs: the same audit flags every operation that would make the host wait on CUDA (on a CPU too),
  and on CUDA torch's own `set_sync_debug_mode("warn")` counts the synchronising calls it makes;
- kernels: on CUDA, the device activities `torch.profiler` records (kernels, then copies and fills apart).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from m3jepa.train.audit import StepAudit, cuda_syncs


@dataclass(frozen=True)
class Datasheet:
    """A card's dense bf16 tensor-core peak as its maker publishes it."""

    card: str
    bf16_tflops: float  # dense (no 2:4 sparsity), at boost clock
    source: str


# Matched in order against torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" is the SXM5 part,
# "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"). NVIDIA's pages give bf16 "with sparsity" for Hopper and Ada;
# the dense figure is half of it (A100's page gives both).
_NV = "https://www.nvidia.com/en-us/data-center/"
_SPARSE = "BF16 Tensor Core, with sparsity; dense = half"
DATASHEETS: tuple[tuple[str, Datasheet], ...] = (
    (r"H200 NVL", Datasheet("H200 NVL", 835.5, f"{_NV}h200/ ({_SPARSE}): 1,671")),
    (r"H200", Datasheet("H200 SXM", 989.5, f"{_NV}h200/ ({_SPARSE}): 1,979")),
    (r"H100 NVL", Datasheet("H100 NVL", 835.5, f"{_NV}h100/ ({_SPARSE}): 1,671")),
    (r"H100 PCIe", Datasheet("H100 PCIe", 756.5, f"{_NV}h100/ (the PCIe part; {_SPARSE}): 1,513")),
    (r"H100", Datasheet("H100 SXM5", 989.5, f"{_NV}h100/ ({_SPARSE}): 1,979")),
    (r"A100", Datasheet("A100 (SXM4, PCIe)", 312.0, f"{_NV}a100/ (BF16 Tensor Core: 312, sparse 624)")),
    (r"L40S", Datasheet("L40S", 366.5, f"{_NV}l40s/ ({_SPARSE}): 733")),
    (r"\bL4\b", Datasheet("L4", 121.0, f"{_NV}l4/ ({_SPARSE}): 242")),
)


def datasheet_peak(device_name: str) -> Datasheet | None:
    """The dense bf16 datasheet peak of the card torch names `device_name`, or None for one not in the table
    (MFU against the datasheet is then not reported, never guessed)."""
    for pattern, sheet in DATASHEETS:
        if re.search(pattern, device_name):
            return sheet
    return None


def mfu(samples_per_s: float, flops_per_sample: float, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation: the model FLOPs a second the step achieves over a peak (None: no peak)."""
    if peak_tflops is None or not peak_tflops > 0:
        return None
    return samples_per_s * flops_per_sample / (peak_tflops * 1e12)


def account(step: Callable[[], None], device: torch.device, steps: int = 2, dispatch: bool = True) -> dict:
    """Run `step` `steps` times under the dispatch audit (and, on CUDA, `steps` more under torch's sync
    debug mode and `steps` more under the profiler); per-step operations, syncs and kernels.

    Use an even `steps` when the step alternates directions, so both are in the mean. `dispatch=False`
    leaves the dispatch audit out (a compiled step: under a dispatch mode torch.compile would not run its
    compiled graphs, so the count would be the eager step's); its operations are then None.
    """
    out = {
        "steps": steps,
        "ops_per_step": None,
        "syncs_per_step": {"dispatch_audit": None, "cuda_sync_debug_mode": None},
        "sync_ops": None,
        "kernels_per_step": None,
        "device_copies_per_step": None,
        "counted_by": "ops and dispatch-audit syncs: m3jepa.train.audit.StepAudit (aten operations); "
                      "cuda_sync_debug_mode: torch.cuda.set_sync_debug_mode('warn'); kernels: torch.profiler",
    }
    if dispatch:
        with StepAudit() as audit:
            for _ in range(steps):
                step()
        total = audit.total()
        out["ops_per_step"] = {"total": total.total / steps, "compute": total.compute / steps,
                               "views": total.views / steps}
        out["syncs_per_step"]["dispatch_audit"] = len(total.syncs) / steps
        out["sync_ops"] = sorted(set(total.syncs))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with cuda_syncs(device) as found:
            for _ in range(steps):
                step()
        torch.cuda.synchronize(device)  # after: the debug mode would count this one too
        out["syncs_per_step"]["cuda_sync_debug_mode"] = len(found) / steps
        out.update(_kernels(step, device, steps))
    return out


def _kernels(step: Callable[[], None], device: torch.device, steps: int) -> dict:
    """Device activities per step from torch.profiler: kernels, and copies/fills apart."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
    kernels = copies = 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if re.match(r"(?i)memcpy|memset", event.name):
            copies += 1
        else:
            kernels += 1
    return {"kernels_per_step": kernels / steps, "device_copies_per_step": copies / steps}
