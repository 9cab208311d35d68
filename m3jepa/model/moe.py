"""Multi-gate mixture of experts: shared expert MLPs, one top-k gate per task, sparse dispatch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3jepa.model.experts import (
    expert_mlp,
    grouped_experts,
    grouped_fits,
    grouped_mm_runs,
    grouped_pays,
    loop_experts,
    plain_experts,
)
from m3jepa.model.routing import (
    OnRead,
    Routing,
    collapse_threshold,
    expert_counts,
    load_balance_loss,
    log_view,
    route,
    router_z_loss,
    routing_health,
    routing_summary,
    warn_unbalanced,
)

# what m3jepa.model.moe has always offered (routing and its health now live in m3jepa.model.routing)
__all__ = [
    "SHARED", "DenseMixer", "MoEOutput", "MultiGateMoE", "Routing", "collapse_threshold", "expert_counts",
    "expert_mlp", "load_balance_loss", "log_view", "route", "router_z_loss", "routing_health",
    "routing_summary", "warn_unbalanced",
]

SHARED = "shared"  # the gate key when every task routes through one gate (the official release)
# `MultiGateMoE.mix` loops over each row's k experts up to this many rows, and dispatches above it. The
# Tux Paint MoE's mixer on one loaded core, cl task: 1 row 0.35 ms looped against 0.54 ms dispatched,
# 2 rows 0.73 against 0.76, 4 rows 1.84 against 1.61 (the dispatch wins from 4 rows).
LOOP_ROWS = 2


@dataclass
class MoEOutput:
    """One MoE evaluation: the mixed rows, the routing counts and the router's auxiliary terms.

    The two terms may be given as functions: they are computed when first read (`routing.OnRead`).
    """

    y: Tensor  # (T, d)
    expert_counts: Tensor  # (N,) int64: rows routed to each expert (each row counts k times)
    aux_loss: Tensor = OnRead()  # () Switch-style load-balancing term, unweighted
    z_loss: Tensor = OnRead()  # () ST-MoE router z-loss mean_t(logsumexp_n logits)², unweighted


class MultiGateMoE(nn.Module):
    """N shared experts; each task has its own gate (`gates="multi"`) or all share one (`"shared"`).

    The layer is evaluated once per task: `forward(x, task)` routes the rows of x with that task's
    gate. Sparse dispatch runs each expert only on the rows routed to it; `dense=True` runs every
    expert on every row and mixes them with the same sparse weights (a reference for tests).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        dropout: float = 0.0,
        tasks: Sequence[str] = ("pred", "cl"),
        gates: str = "multi",
        routing: str = "topk_softmax",
    ) -> None:
        super().__init__()
        if gates not in ("multi", SHARED):
            raise ValueError(f"gates={gates!r} is not one of multi, shared")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k, self.routing = num_experts, top_k, routing
        # > 1: under autocast, expert groups are padded to multiples of it (_experts_bucketed); 1 (the
        # plain path) pads nothing. The CPU fast path (m3jepa.accel.install) sets 16.
        self.row_bucket = 1
        # How the experts run (docs/predictor.md, Sparse dispatch): "auto" takes the grouped product
        # (`experts.grouped_experts`) on an accelerator whose grouped_mm needs no host sync for the dtype
        # (`experts.grouped_pays`), else the per-expert loop; "grouped" / "loop" force one (tests).
        self.expert_product = "auto"
        self.tasks = tuple(tasks)
        self.experts = nn.ModuleList(expert_mlp(dim, hidden, dropout) for _ in range(num_experts))
        gate_keys = self.tasks if gates == "multi" else (SHARED,)
        self.gates = nn.ModuleDict({k: nn.Linear(dim, num_experts) for k in gate_keys})

    def gate_for(self, task: str) -> nn.Linear:
        """The gate that routes `task` (the single shared gate when gates="shared")."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known: {', '.join(self.tasks)}")
        return self.gates[task] if task in self.gates else self.gates[SHARED]

    def forward(self, x: Tensor, task: str, dense: bool = False) -> MoEOutput:
        """Mix the experts on rows x (T, d) with the gate of `task`."""
        return self.forward_tasks({task: x}, dense=dense)[task]

    def mix(self, x: Tensor, task: str) -> Tensor:
        """`forward(x, task).y` (T, d) alone: no counts, no auxiliary terms, and for a few rows
        (T <= LOOP_ROWS) no dispatch either, each row running its own k experts in a loop.

        The query path (`M3JepaPredictor.query`): one row through the sparse dispatch is ~30 small
        ops (sorts, gathers, splits, the k-way mix); the loop is k expert calls and k multiply-adds,
        which is the same function summed in another order (docs/search.md, The query path).
        """
        if not 0 < x.shape[0] <= LOOP_ROWS:
            return self.forward(x, task).y
        r = self.route_rows(x, task)
        experts = r.experts.tolist()  # T·k host ints: which expert each row runs
        rows = []
        for t, chosen in enumerate(experts):
            xt = x[t : t + 1]  # (1, d)
            yt = None
            for j, e in enumerate(chosen):
                out = self.experts[e](xt) * r.weights[t, j].to(xt.dtype)  # (1, d)
                yt = out if yt is None else yt + out
            rows.append(yt)
        return rows[0] if len(rows) == 1 else torch.cat(rows)  # (T, d)

    def forward_tasks(self, xs: Mapping[str, Tensor], dense: bool = False) -> dict[str, MoEOutput]:
        """Mix the experts on several tasks' rows {task: (T_t, d)} in ONE sparse dispatch.

        Each task is routed by its own gate, exactly as `forward(x, task)` would; then all (row,
        expert) assignments of all tasks are grouped by expert, so each expert runs once on a batch
        of ~ΣT·k/N rows instead of once per task. Bigger matmuls, and one weight gradient per expert
        instead of one per task plus their sum: this is the training fast path. Routing counts,
        offsets and the combine stay on the device (the grouped product reads nothing back).
        """
        tasks = list(xs)
        x = xs[tasks[0]] if len(tasks) == 1 else torch.cat([xs[t] for t in tasks])  # (ΣT, d)
        return self.forward_blocks(x, tasks, [xs[t].shape[0] for t in tasks], dense)

    def forward_blocks(
        self, x: Tensor, tasks: Sequence[str], sizes: Sequence[int], dense: bool = False
    ) -> dict[str, MoEOutput]:
        """`forward_tasks` of rows x (ΣT, d) already concatenated: block i (sizes[i] rows) is tasks[i]'s."""
        r = self._route(x, tasks, sizes)  # block i of the ΣT rows routed by the gate of tasks[i]
        expert_ids = torch.arange(self.num_experts, device=x.device)  # (N,)
        counts = self._block_counts(r.experts, sizes, expert_ids)  # (G, N) int64 assignments per expert
        y = self._dense(x, r) if dense else self._sparse(x, r, counts, expert_ids)  # (ΣT, d)
        return {
            t: MoEOutput(
                y=y_t,
                expert_counts=counts[i],
                aux_loss=lambda i=i: load_balance_loss(_block(r, sizes, i), self.num_experts, counts[i]),
                z_loss=lambda i=i: router_z_loss(_block(r, sizes, i).logits),
            )
            for i, (t, y_t) in enumerate(zip(tasks, y.split(list(sizes)), strict=True))
        }

    def route_rows(self, x: Tensor, task: str) -> Routing:
        """Route rows x (T, d) with the gate of `task`, in float32 even under autocast."""
        return self._route(x, [task], [x.shape[0]])

    def _route(self, x: Tensor, tasks: Sequence[str], sizes: Sequence[int]) -> Routing:
        """Routing of rows x (ΣT, d) whose i-th block of sizes[i] rows goes through the gate of tasks[i].

        In float32 even under autocast: routing is a discrete choice, bf16 logits (8 mantissa bits) tie
        or swap near-equal experts, so the gates (T·d·N FLOPs, negligible) run in float32 and bf16
        training routes like float32. Each block's logits are the product `route_rows` computes alone.
        """
        gates = [self.gate_for(t) for t in tasks]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 stays (tests)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            if all(g is gates[0] for g in gates):  # one gate (shared, or a single task): one product
                logits = F.linear(x, gates[0].weight.to(dtype), gates[0].bias.to(dtype))  # (ΣT, N)
            else:
                blocks = zip(x.split(list(sizes)), gates, strict=True)
                logits = torch.cat([F.linear(p, g.weight.to(dtype), g.bias.to(dtype)) for p, g in blocks])
        return route(logits, self.top_k, self.routing)

    def _block_counts(self, experts: Tensor, sizes: Sequence[int], ids: Tensor) -> Tensor:
        """(G, N) int64 assignments per expert of each block of rows of expert ids (ΣT, k)."""
        n = self.num_experts
        if len(set(sizes)) == 1:
            return expert_counts(experts.view(len(sizes), sizes[0], experts.shape[-1]), n, ids)
        return torch.stack([expert_counts(e, n, ids) for e in experts.split(list(sizes))])

    def expert_path(self, x: Tensor) -> str:
        """How `_sparse` runs the experts on rows like x (after autocast's cast): "grouped" (one grouped
        product, no host sync), "loop" (the reference) or "bucketed" (the CPU fast path's padded loop)."""
        if self.row_bucket > 1 and torch.is_autocast_enabled(x.device.type):
            return "bucketed"
        fits = plain_experts(self.experts) and grouped_fits(self.experts, x.dtype)
        if self.expert_product == "grouped":
            if not (fits and grouped_mm_runs(x.dtype)):
                raise ValueError(
                    f"expert_product='grouped' cannot run {x.dtype} rows of width {x.shape[-1]} through "
                    "these experts (grouped_mm takes float32/bfloat16/float16, 16-byte aligned widths)"
                )
            return "grouped"
        if self.expert_product == "auto" and fits and grouped_pays(x.device, x.dtype):
            return "grouped"
        return "loop"

    def _sparse(self, x: Tensor, r: Routing, counts: Tensor, expert_ids: Tensor) -> Tensor:
        """Group the T·k (row, expert) assignments by expert, run the experts, mix each row's k outputs.

        counts (G, N): assignments per expert of each block; expert_ids (N,) 0..N-1. The grouped product
        reads nothing back to the host; the loops need the group sizes as Python ints (one host sync on
        a GPU).
        """
        t, k = r.experts.shape
        if t == 0:
            return torch.zeros_like(x)
        # (T·k,) expert ids ascending and, for each, its assignment (flat index row·k + slot); stable, so
        # each expert's rows keep their order
        ids, order = r.experts.flatten().sort(stable=True)
        rows = order.div(k, rounding_mode="floor")  # (T·k,) source row of each assignment
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            x = x.to(torch.get_autocast_dtype(x.device.type))  # cast the T rows once, not T·k gathered ones
        path = self.expert_path(x)
        if path == "grouped":
            offs = torch.searchsorted(ids, expert_ids, right=True, out_int32=True)  # (N,) where groups end
            # F.embedding as a row gather: its backward is one kernel (index_select's is a fill and an
            # atomic index_add on a GPU)
            ys = grouped_experts(self.experts, F.embedding(rows, x), ids, offs)  # (T·k, d)
        else:
            sizes = counts.sum(dim=0).tolist()  # N host ints
            if path == "bucketed":
                ys = self._experts_bucketed(x, rows, sizes)  # (T·k, d)
            else:
                ys = loop_experts(self.experts, x.index_select(0, rows), sizes)  # (T·k, d)
        # Back to (row, slot) order by the inverse permutation, then each row's k outputs weighted and
        # summed in one batched product: deterministic, unlike a scatter-add of T·k rows into T.
        per_row = F.embedding(order.argsort(), ys).view(t, k, ys.shape[-1])  # (T, k, d)
        return torch.bmm(r.weights.to(ys.dtype).unsqueeze(1), per_row).squeeze(1)  # (T, d)

    def _experts_bucketed(self, x: Tensor, rows: Tensor, sizes: list[int]) -> Tensor:
        """Each expert on its rows x[rows] (T·k, d), its group padded with zero rows to a multiple of
        `row_bucket`; returns the (T·k, d) outputs of the real rows, in expert order.

        oneDNN builds a kernel for every new matmul shape (25-45 ms here, against 6-8 ms to run one
        of these), and the rows per expert change every step. Rounded up to multiples of 16, a few
        shapes recur and stay in its primitive cache. Pad rows are zeros whose outputs are dropped,
        so they add nothing to any gradient; they cost ≤ 15 extra rows per expert.
        """
        b = self.row_bucket
        padded = [-(-n // b) * b for n in sizes]
        start = 0
        pos = []  # where each real row sits in the padded layout
        for n, m in zip(sizes, padded, strict=True):
            pos.append(torch.arange(start, start + n, device=x.device))
            start += m
        pos_t = torch.cat(pos)  # (T·k,)
        x_ext = torch.cat([x, x.new_zeros(1, x.shape[1])])  # (T + 1, d): row T is the pad row
        idx = torch.full((start,), x.shape[0], dtype=rows.dtype, device=x.device)
        idx[pos_t] = rows  # (Σ padded,)
        xs = x_ext.index_select(0, idx)  # (Σ padded, d)
        outs = [self.experts[e](c) for e, c in enumerate(xs.split(padded)) if padded[e] > 0]  # (m_e, d)
        return torch.cat(outs).index_select(0, pos_t)  # (T·k, d)

    def _dense(self, x: Tensor, r: Routing) -> Tensor:
        """Every expert on every row; weights are zero outside each row's top-k."""
        all_out = torch.stack([expert(x) for expert in self.experts], dim=1)  # (T, N, d)
        w = torch.zeros_like(r.logits).scatter(-1, r.experts, r.weights)  # (T, N)
        return torch.einsum("tn,tnd->td", w.to(x.dtype), all_out)  # (T, d)


def _zero(like: Tensor):
    """A function giving a float32 0 on like's device (a router term of a mixer without a router)."""
    return lambda: like.new_zeros((), dtype=torch.float32)


def _block(r: Routing, sizes: Sequence[int], i: int) -> Routing:
    """The routing of block i of rows (sizes[i] rows), as views of r."""
    experts, weights, logits = (t.split(list(sizes))[i] for t in (r.experts, r.weights, r.logits))
    return Routing(experts, weights, probs=lambda: r.probs.split(list(sizes))[i], logits=logits)


class DenseMixer(nn.Module):
    """The paper's "no MoE" row: one dense MLP of the same width in place of the experts."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, tasks: Sequence[str] = ("pred", "cl")):
        super().__init__()
        self.tasks = tuple(tasks)
        self.mlp = expert_mlp(dim, hidden, dropout)

    def mix(self, x: Tensor, task: str) -> Tensor:
        """`forward(x, task).y` (T, d) alone, as MultiGateMoE.mix."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known: {', '.join(self.tasks)}")
        return self.mlp(x)  # (T, d)

    def forward(self, x: Tensor, task: str, dense: bool = False) -> MoEOutput:
        """Apply the MLP to rows x (T, d); `task` and `dense` exist to match MultiGateMoE."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known: {', '.join(self.tasks)}")
        y = self.mlp(x)  # (T, d)
        counts = torch.full((1,), x.shape[0], dtype=torch.long, device=x.device)  # (1,)
        return MoEOutput(y=y, expert_counts=counts, aux_loss=_zero(x), z_loss=_zero(x))

    def forward_tasks(self, xs: Mapping[str, Tensor], dense: bool = False) -> dict[str, MoEOutput]:
        """Apply the MLP once to every task's rows {task: (T_t, d)}, as MultiGateMoE.forward_tasks."""
        return self.forward_blocks(torch.cat(list(xs.values())), list(xs), [x.shape[0] for x in xs.values()])

    def forward_blocks(
        self, x: Tensor, tasks: Sequence[str], sizes: Sequence[int], dense: bool = False
    ) -> dict[str, MoEOutput]:
        """`forward_tasks` of rows x (ΣT, d) already concatenated, as MultiGateMoE.forward_blocks."""
        for task in tasks:
            if task not in self.tasks:
                raise KeyError(f"unknown task {task!r}; known: {', '.join(self.tasks)}")
        ys = self.mlp(x).split(list(sizes))  # (T_t, d) each
        return {
            t: MoEOutput(
                y=y,
                expert_counts=torch.full((1,), n, dtype=torch.long, device=y.device),
                aux_loss=_zero(y),  # no router: both terms are 0
                z_loss=_zero(y),
            )
            for t, y, n in zip(tasks, ys, sizes, strict=True)
        }
