"""What a training step asks of the device: the operations it dispatches and the ones that would make the
host wait for a GPU, counted on any device (a CPU included) with torch's dispatch and function modes.

A GPU runs kernels asynchronously: the host queues them and moves on, unless an operation needs a value
back (`.item()`, `.tolist()`, `nonzero`, a boolean mask, a `bincount`, ...). Each such read stalls the
host until the GPU has finished everything queued before it. `StepAudit` sees every aten operation a step
dispatches, on whatever device it runs, so a CPU test can prove the CUDA step has none of them
(tests/test_step_audit.py), and `bench.gpu` reports the counts beside its timings. On a CUDA device
`cuda_syncs` also counts what torch itself reports (`torch.cuda.set_sync_debug_mode`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten operations that read a device value back to the host on CUDA, whatever their arguments
ALWAYS_SYNC = frozenset({
    "_local_scalar_dense",  # .item(), float(t), int(t), bool(t), `if t:`
    "nonzero", "nonzero_numpy", "argwhere",  # output size depends on the values
    "masked_select",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "bincount",  # CUDA reads the minimum and maximum back to size its output, minlength or not
    "equal", "is_nonzero", "allclose",  # Python booleans
})
# Tensor methods that hand device data to Python without dispatching an aten operation (.item(), float(),
# bool() and int() dispatch _local_scalar_dense, counted there)
PYTHON_READS = frozenset({"tolist", "numpy"})
# operations that only allocate (no kernel runs on a GPU)
ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


def why_syncs(func, args: tuple, kwargs: dict) -> str | None:
    """Why aten operation `func` called with (args, kwargs) would make the host wait on CUDA, else None."""
    name = func._schema.name.split("::")[-1]
    if name in ALWAYS_SYNC:
        return f"{func} reads a device value back"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return f"{func} with a boolean mask (its nonzero positions are counted on the host)"
    # repeats given as a tensor (overloads "Tensor" and "self_Tensor"): the output length is their sum
    if name == "repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None:
        return f"{func} without output_size (the output length is summed on the host)"
    if name == "histc" and _arg(args, kwargs, 2, "min", 0) == _arg(args, kwargs, 3, "max", 0):
        return f"{func} without a range (min and max are read back)"
    if name in ("_to_copy", "copy_") and _device_to_host(func, args, kwargs):
        return f"{func} from an accelerator to the host"
    return None


def _arg(args: tuple, kwargs: dict, i: int, key: str, default):
    return args[i] if len(args) > i else kwargs.get(key, default)


def _device_to_host(func, args: tuple, kwargs: dict) -> bool:
    if func._schema.name.endswith("copy_"):
        dst, src = args[0], args[1]
    else:
        src, dst = args[0], None
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and src.device.type != "cpu"
    return dst.device.type == "cpu" and src.device.type != "cpu"


class HostSyncError(RuntimeError):
    """An operation that would make the host wait for the GPU ran where none may."""


@dataclass
class PhaseCount:
    """The operations of one phase (forward, backward, optimizer, ...) of a step."""

    ops: Counter = field(default_factory=Counter)  # "aten.addmm.default" -> calls
    views: int = 0  # views and aliases: no kernel, no memory
    allocations: int = 0  # empty tensors: memory, no kernel
    syncs: list[str] = field(default_factory=list)  # why each syncing operation would sync

    @property
    def total(self) -> int:
        """Every aten operation dispatched."""
        return sum(self.ops.values())

    @property
    def compute(self) -> int:
        """Operations that run a kernel: all but views, aliases and bare allocations."""
        return self.total - self.views - self.allocations

    def to_json(self) -> dict:
        return {"total": self.total, "compute": self.compute, "views": self.views,
                "allocations": self.allocations, "syncs": len(self.syncs), "sync_ops": list(self.syncs)}


class _Dispatch(TorchDispatchMode):
    def __init__(self, audit: StepAudit) -> None:
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "aten":
            self.audit.record(func, args, kwargs)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, audit: StepAudit) -> None:
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in PYTHON_READS:
            self.audit.sync(f"Tensor.{name}() hands device data to Python")
        return func(*args, **(kwargs or {}))


class StepAudit:
    """Counts the aten operations dispatched inside it, per phase, and every one that would sync a GPU.

        with StepAudit(strict=True) as audit:
            with audit.phase("forward"):
                loss = model(x)
            with audit.phase("backward"):
                loss.backward()
        audit.report()  # {"forward": {"total": ..., "compute": ..., "syncs": 0, ...}, ...}

    `strict`: raise HostSyncError at the first syncing operation (its traceback shows the line).
    Operations outside any `phase` are counted under "other".
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.phases: dict[str, PhaseCount] = {}
        self.current = "other"
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> StepAudit:
        self._stack.enter_context(_Function(self))
        self._stack.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the operations inside to phase `name`."""
        before, self.current = self.current, name
        try:
            yield
        finally:
            self.current = before

    def _count(self) -> PhaseCount:
        return self.phases.setdefault(self.current, PhaseCount())

    def record(self, func, args: tuple, kwargs: dict) -> None:
        count = self._count()
        count.ops[str(func)] += 1
        if func.is_view or func._schema.name.split("::")[-1] in ("detach", "alias", "split", "unbind"):
            count.views += 1
        elif func._schema.name.split("::")[-1] in ALLOCATIONS:
            count.allocations += 1
        why = why_syncs(func, args, kwargs)
        if why is not None:
            self.sync(why)

    def sync(self, why: str) -> None:
        self._count().syncs.append(why)
        if self.strict:
            raise HostSyncError(f"{why}: a training step must not make the host wait for the GPU")

    def total(self) -> PhaseCount:
        """Every phase together."""
        out = PhaseCount()
        for c in self.phases.values():
            out.ops.update(c.ops)
            out.views += c.views
            out.allocations += c.allocations
            out.syncs += c.syncs
        return out

    def report(self) -> dict:
        """{phase: PhaseCount.to_json(), ..., "step": every phase together}."""
        return {**{k: v.to_json() for k, v in self.phases.items()}, "step": self.total().to_json()}


@contextlib.contextmanager
def cuda_syncs(device: torch.device) -> Iterator[list[str]]:
    """On a CUDA device: the synchronising operations torch itself sees inside (its sync debug mode, one
    warning each), as a list filled on exit; elsewhere an empty list."""
    found: list[str] = []
    if device.type != "cuda":
        yield found
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    found += [str(w.message) for w in caught if "synchroniz" in str(w.message)]
