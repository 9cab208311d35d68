"""The MoE's expert product: every expert on the rows routed to it, as one grouped product or a loop.

Both take the T·k (row, expert) assignments already sorted by expert id, and return the experts'
outputs in that order:
- `grouped_experts`: the experts' weights stacked (N, h, d) and both layers run as one
  `torch.nn.functional.grouped_mm` each, group boundaries read from a device tensor of offsets. Nothing
  is read back to the host, so on a GPU the step issues its kernels without waiting.
- `loop_experts`: the plain reference, each expert's own `nn.Sequential` on its slice of rows; slicing
  needs the group sizes as Python ints (one host sync per call on a GPU).
They compute the same function (tests/test_moe_grouped.py checks forward and backward against each
other, dropout included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# dtypes whose grouped product runs as one kernel with its offsets left on the device, per device type.
# CUDA: torch's bf16 grouped GEMM (CUTLASS) on compute capability 9.x and 10.x (H100, H200, B200);
# other GPUs and dtypes take torch's fallback, which copies the offsets to the host to slice.
# CPU: torch's implementation loops over the groups in C++, reading the offsets in place (no device
# to wait for); float64 is not implemented.
GROUPED_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUPED_CUDA_DTYPES = (torch.bfloat16,)
GROUPED_CUDA_MAJORS = (9, 10)
# grouped_mm needs every row of either operand to start on a 16-byte boundary
ALIGN_BYTES = 16


def expert_mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """One expert: d → h → d with GELU and dropout (the official release drops after both layers)."""
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, dim),
        nn.Dropout(dropout),
    )


def grouped_mm_runs(dtype: torch.dtype) -> bool:
    """Whether this torch has `grouped_mm` for `dtype` at all (with or without a host sync)."""
    return hasattr(F, "grouped_mm") and dtype in GROUPED_CPU_DTYPES


def grouped_mm_sync_free(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `grouped_mm` on `device` in `dtype` runs without copying its offsets to the host."""
    if not grouped_mm_runs(dtype):  # torch before 2.9, or float64
        return False
    if device.type == "cpu":
        return dtype in GROUPED_CPU_DTYPES
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        return dtype in GROUPED_CUDA_DTYPES and major in GROUPED_CUDA_MAJORS
    return False


def grouped_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `expert_product = "auto"` takes the grouped product: on an accelerator where it needs no
    host sync. Not on a CPU: there a host read costs nothing, grouped_mm runs as fast as the loop, and
    stacking the weights each step costs more (a fresh 400 MB float32 copy at the paper's size, page
    faults included: 0.69x the loop's speed for the fp32 step at B = 128, docs/benchmarks.md §1)."""
    return device.type != "cpu" and grouped_mm_sync_free(device, dtype)


def plain_experts(experts: nn.ModuleList) -> bool:
    """True when every expert is exactly `expert_mlp`'s stack of torch layers (what the grouped product
    reproduces); the CPU fast path's swapped layers (m3jepa.accel) are not."""
    kinds = (nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout)
    return all(
        isinstance(e, nn.Sequential) and len(e) == len(kinds)
        and all(type(layer) is kind for layer, kind in zip(e, kinds, strict=True))
        for e in experts
    )


def grouped_fits(experts: nn.ModuleList, dtype: torch.dtype) -> bool:
    """Whether both layers' widths keep grouped_mm's rows 16-byte aligned in `dtype`."""
    first = experts[0][0]
    step = ALIGN_BYTES // dtype.itemsize
    return first.in_features % step == 0 and first.out_features % step == 0


def grouped_experts(experts: nn.ModuleList, x: Tensor, ids: Tensor, offs: Tensor) -> Tensor:
    """`expert_mlp` of expert ids[i] on row x[i], for rows x (A, d) sorted by expert, in one grouped
    product per layer; offs (N,) int32 where each expert's rows end. Returns (A, d) in x's dtype and order.

    The weights are stacked here, each step, from the experts' own Parameters (so checkpoints, the
    optimizer and `loop_experts` see the same per-expert tensors); under autocast the stack is cast once.
    """
    first, second = experts[0][0], experts[0][3]
    gelu, drop = experts[0][1], experts[0][2]
    w1 = torch.stack([e[0].weight for e in experts]).to(x.dtype)  # (N, h, d)
    w2 = torch.stack([e[3].weight for e in experts]).to(x.dtype)  # (N, d, h)
    h = F.grouped_mm(x, w1.transpose(1, 2), offs=offs)  # (A, h)
    if first.bias is not None:
        h = h + F.embedding(ids, torch.stack([e[0].bias for e in experts]).to(x.dtype))  # (A, h)
    h = F.dropout(F.gelu(h, approximate=gelu.approximate), drop.p, drop.training)  # (A, h)
    y = F.grouped_mm(h, w2.transpose(1, 2), offs=offs)  # (A, d)
    if second.bias is not None:
        y = y + F.embedding(ids, torch.stack([e[3].bias for e in experts]).to(x.dtype))  # (A, d)
    return F.dropout(y, experts[0][4].p, experts[0][4].training)  # (A, d)


def loop_experts(experts: nn.ModuleList, x: Tensor, sizes: list[int]) -> Tensor:
    """The reference: expert e's own module on its slice of rows x (A, d) sorted by expert, `sizes` (N,)
    host ints. Returns (A, d) in x's order."""
    outs = [experts[e](part) for e, part in enumerate(x.split(sizes)) if sizes[e] > 0]  # (n_e, d) each
    return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])  # (A, d)
