"""Operations and host syncs per training step of the paper's structure, counted on any device.

    python -m bench.step_audit                 # fp32 and bf16, grouped experts (a GPU's path) and the loop
    python -m bench.step_audit --json out.json
    python -m bench.step_audit --casts         # also every dtype cast of the bf16 grouped step, by source
    python -m bench.step_audit --compile       # also the step under runtime.compile (torch.compile), counted
                                               # by the profiler (a cold compile takes minutes on 2 cores)

The paper's structure (12 experts, top-4, two tasks with their own gates, dropout 0.1, both directions
alternating) at narrow widths (the count does not depend on them): forward, backward and the optimizer
step (torch's fused AdamW, clipping 1.0 folded in) under `m3jepa.train.audit.StepAudit`, after two
warm-up steps, the mean of one step per direction. "compute" counts the operations that run a kernel;
"total" adds views, aliases and bare allocations. Syncs are the operations that would make the host wait
for a GPU. Under bf16 the plain model runs under CPU autocast: the GPU's code path, not the CPU fast path.

`--casts` lists the dtype casts (`aten._to_copy`) that bf16 autocast adds to the grouped step, by what is
cast: a parameter (autocast's per-call cast of a float32 weight or bias), the experts' stacked parameters,
an activation, or in backward a parameter's gradient (its float32 .grad) or an activation's gradient.

`--compile` counts the grouped step with its objective under `torch.compile` (what `runtime.compile =
"default"` does in the loop) with a second counter, because a dispatch mode makes torch.compile run the
eager step instead of its graphs: torch.profiler, inductor's kernels each recorded as an event
(`torch._inductor.config.cpp.enable_kernel_profile`). It counts every call inside a compiled graph (a
generated kernel, or an aten operation the graph calls: the matmuls, topk, sort) and, outside the graphs,
the outermost aten operations that are neither views nor bare allocations (the loss seed, the optimizer).
The same counter runs on the eager step beside it, so the two counters can be compared.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench import _common as C
from m3jepa.config import LossConfig, ModelConfig, PipelineConfig
from m3jepa.core.compiled import compiled
from m3jepa.core.device import Runtime
from m3jepa.core.objective import Objective
from m3jepa.train.audit import ALLOCATIONS, StepAudit
from m3jepa.train.optim import build_optimizer, optimizer_step

PAPER_NARROW = dict(dim=64, hidden=64, num_experts=12, top_k=4, dropout=0.1, gates="multi", cl_dim=32)
DIMS = {"image": 32, "text": 48}


def _paper_step(precision: str, product: str, batch: int = 32, device: str = "cpu",
                compile_mode: str = "off"):
    """(objective, step(i, phase) -> loss) of the paper's structure: `phase(name)` is a context per phase.
    `device` only picks the optimizer build_optimizer makes (a "cuda" runtime: torch's fused AdamW, the
    GPU's path); the step itself runs on the CPU. `compile_mode`: the step calls the objective through
    m3jepa.core.compiled in that mode, as the loop does under runtime.compile."""
    cfg = PipelineConfig()
    cfg.model = ModelConfig(**PAPER_NARROW)
    cfg.runtime.precision = precision
    torch.manual_seed(0)
    obj = Objective(cfg.model, LossConfig(), DIMS)
    obj.predictor.mixer.expert_product = product
    runtime = Runtime(torch.device(device), precision, compile=compile_mode)
    opt = build_optimizer(obj, cfg, runtime, cpu_fast_path=False)
    model = compiled(obj, runtime)
    g = torch.Generator().manual_seed(1)
    batches = [("image->text", torch.randn(batch, 32, generator=g), torch.randn(batch, 48, generator=g)),
               ("text->image", torch.randn(batch, 48, generator=g), torch.randn(batch, 32, generator=g))]

    def step(i: int, phase=lambda name: contextlib.nullcontext()) -> torch.Tensor:
        direction, x, y = batches[i % 2]
        opt.zero_grad(set_to_none=True)
        with phase("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(direction, x, y).total
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer_step(opt, obj, 1.0)
        return loss

    return obj, step


def audit_steps(precision: str, product: str, batch: int = 32) -> dict:
    """{phase: counts per step} of `precision` ("fp32"/"bf16") with the experts run as `product`."""
    _, step = _paper_step(precision, product, batch)
    step(0), step(1)
    with StepAudit() as audit:
        step(2, audit.phase), step(3, audit.phase)
    return {name: _per_step(counts, 2) for name, counts in audit.report().items()}


class _Casts(TorchDispatchMode):
    """Records every dtype-changing `aten._to_copy`: phase, what was cast, dtypes, shape, m3jepa line."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.casts: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        src = args[0] if args else None
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") not in (None, src.dtype):
            frames = [f for f in traceback.extract_stack() if "/m3jepa/" in f.filename]
            where = f"{frames[-1].filename.split('m3jepa/')[-1]}:{frames[-1].lineno}" if frames else "-"
            self.casts.append({"phase": self.phase, "kind": _kind(src), "from": str(src.dtype)[6:],
                               "to": str(out.dtype)[6:], "shape": list(src.shape), "where": where,
                               "storage": _storage(out)})
        return out


def _kind(src: torch.Tensor) -> str:
    if isinstance(src, nn.Parameter):
        return "parameter"
    fn = src.grad_fn
    if fn is not None and type(fn).__name__ == "StackBackward0" and all(
        n is not None and type(n).__name__ == "AccumulateGrad" for n, _ in fn.next_functions
    ):
        return "stacked parameters"  # the experts' weights or biases, stacked for grouped_mm
    return "activation"


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def cast_sites(product: str = "grouped") -> list[dict]:
    """Every dtype cast of one bf16 step (image->text, after two warm-up steps), each as {phase, kind,
    from, to, shape, where}; a backward cast whose result became a parameter's .grad is a "parameter
    gradient", any other backward cast an "activation gradient"."""
    obj, step = _paper_step("bf16", product)
    step(0), step(1)
    casts = _Casts()

    @contextlib.contextmanager
    def phase(name: str):
        casts.phase = name
        yield

    with casts:
        step(2, phase)
    grads = {_storage(p.grad) for p in obj.parameters() if p.grad is not None}
    later: set[int] = set()  # memory a later cast wrote: an earlier cast there had been freed
    for c in reversed(casts.casts):
        storage = c.pop("storage")
        if c["phase"] == "backward":
            kept = storage in grads and storage not in later and c["to"] == "float32"
            c["kind"] = "parameter gradient" if kept else "activation gradient"
        later.add(storage)
    return casts.casts


# aten operations that run no kernel: views and aliases by name, for the profiler's events, and the
# dispatch audit's own bare allocations (its "total" minus its "compute")
_NO_KERNEL = frozenset({
    "view", "_unsafe_view", "alias", "as_strided", "t", "transpose", "permute", "expand", "reshape",
    "squeeze", "unsqueeze", "select", "slice", "narrow", "split", "split_with_sizes", "unbind", "chunk",
    "view_as", "_reshape_alias", "detach", "lift_fresh", "resolve_conj", "resolve_neg", "contiguous",
    "to", "_to_copy_noop",
}) | ALLOCATIONS


def profiled_steps(precision: str, product: str = "grouped", compile_mode: str = "off",
                   batch: int = 32) -> dict:
    """{phase: calls per step} of the paper's step counted by the profiler (the module docstring says
    how), eager or through torch.compile in `compile_mode`: the mean of one step per direction after four
    warm-up steps (the compiles)."""
    import torch._inductor.config as inductor
    from torch.profiler import ProfilerActivity, profile, record_function

    _, step = _paper_step(precision, product, batch, compile_mode=compile_mode)
    # read when a graph is compiled (the warm-up steps); patched for them only, not for the process
    with inductor.patch({"cpp.enable_kernel_profile": True}):
        for i in range(4):
            step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(4, lambda name: record_function(f"phase:{name}"))
        step(5, lambda name: record_function(f"phase:{name}"))
    counts: Counter = Counter()
    for event in prof.events():
        if event.name.startswith("phase:") and event.cpu_parent is None:
            counts[event.name[6:]] += _calls(event)
    out = {name: counts[name] / 2 for name in ("forward", "backward", "optimizer")}
    out["step"] = sum(out.values())
    return out


def _calls(event) -> int:
    """Kernel-running calls under `event`: each call inside a compiled graph, and outside the graphs each
    outermost aten operation that is neither a view nor a bare allocation (what Python or autograd asked
    for; not the CPU implementation's own inner calls, which a GPU's kernels do not make)."""
    if event.name.startswith("## Call CompiledFxGraph"):
        return len(event.cpu_children)
    if event.name.startswith("aten::"):
        return int(event.name[6:] not in _NO_KERNEL)
    return sum(_calls(child) for child in event.cpu_children)


def _per_step(counts: dict, steps: int) -> dict:
    out = {k: v / steps for k, v in counts.items() if isinstance(v, int | float)}
    out["sync_ops"] = sorted(set(counts["sync_ops"]))
    return out


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--casts", action="store_true", help="also list the bf16 grouped step's dtype casts")
    p.add_argument("--compile", action="store_true",
                   help="also count the grouped step under torch.compile (runtime.compile) with the profiler")
    args = p.parse_args()
    C.setup(args)
    record = {"benchmark": "step_audit", "torch": torch.__version__, "git": C.git_sha(), "results": []}
    print(f"{'precision':<10}{'experts':<9}{'phase':<11}{'compute':>8}{'total':>8}{'syncs':>7}")
    for precision in ("fp32", "bf16"):
        for product in ("grouped", "loop"):
            counts = audit_steps(precision, product)
            record["results"].append({"precision": precision, "experts": product, "per_step": counts})
            for phase in ("forward", "backward", "optimizer", "step"):
                c = counts[phase]
                print(f"{precision:<10}{product:<9}{phase:<11}{c['compute']:>8.0f}{c['total']:>8.0f}"
                      f"{c['syncs']:>7.0f}")
            if counts["step"]["sync_ops"]:
                print(f"{'':<19}syncs: {'; '.join(counts['step']['sync_ops'])}")
    if args.casts:
        record["casts"] = cast_sites()
        _print_casts(record["casts"])
    if args.compile:
        record["profiled"] = _print_profiled()
    C.write_json(args.json, record)


def _print_profiled() -> list[dict]:
    """The bf16 grouped step (a GPU's path) eager and compiled, both counted by the profiler. Not fp32:
    torch 2.13's meta kernel of `_grouped_mm` takes bf16 only, so torch.compile cannot trace an fp32
    grouped product (in fp32 a CPU and a GPU take the loop, which compiles around its host read)."""
    rows = []
    print(f"\ncalls per step counted by the profiler (bf16, grouped experts)\n{'step':<10}"
          f"{'forward':>8}{'backward':>9}{'optimizer':>10}{'step':>6}")
    for mode in ("off", "default"):
        c = profiled_steps("bf16", compile_mode=mode)
        rows.append({"precision": "bf16", "experts": "grouped", "compile": mode, "per_step": c})
        print(f"{'eager' if mode == 'off' else 'compiled':<10}{c['forward']:>8.0f}{c['backward']:>9.0f}"
              f"{c['optimizer']:>10.0f}{c['step']:>6.0f}")
    return rows


def _print_casts(casts: list[dict]) -> None:
    print(f"\ndtype casts of one bf16 grouped step (image->text): {len(casts)}")
    for (ph, kind), n in sorted(Counter((c["phase"], c["kind"]) for c in casts).items()):
        print(f"  {ph:<9}{kind:<21}{n:>3}")
    for c in casts:
        print(f"    {c['phase']:<9}{c['kind']:<21}{c['from']}->{c['to']:<9}{str(c['shape']):<14}{c['where']}")


if __name__ == "__main__":
    main()
