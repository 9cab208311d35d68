"""Multi-gate mixture of experts: shared expert MLPs, one top-k gate per task, sparse dispatch."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

SHARED = "shared"  # the gate key when every task routes through one gate (the official release)
# `MultiGateMoE.mix` loops over each row's k experts up to this many rows, and dispatches above it. The
# Tux Paint MoE's mixer on one loaded core, cl task: 1 row 0.35 ms looped against 0.54 ms dispatched,
# 2 rows 0.73 against 0.76, 4 rows 1.84 against 1.61 (the dispatch wins from 4 rows).
LOOP_ROWS = 2


@dataclass
class MoEOutput:
    """One MoE evaluation: the mixed rows, the routing counts and the load-balancing term."""

    y: Tensor  # (T, d)
    expert_counts: Tensor  # (N,) int64: rows routed to each expert (each row counts k times)
    aux_loss: Tensor  # () Switch-style load-balancing term, unweighted
    z_loss: Tensor  # () ST-MoE router z-loss mean_t(logsumexp_n logits)², unweighted


@dataclass
class Routing:
    """Top-k routing of T rows among N experts."""

    experts: Tensor  # (T, k) int64 expert ids
    weights: Tensor  # (T, k) mixing weights of the selected experts
    probs: Tensor  # (T, N) softmax over all N logits (for the load-balancing term)
    logits: Tensor | None = None  # (T, N) the gate's logits (for the router z-loss)


def expert_mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """One expert: d → h → d with GELU and dropout (the official release drops after both layers)."""
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, dim),
        nn.Dropout(dropout),
    )


def route(logits: Tensor, top_k: int, routing: str = "topk_softmax") -> Routing:
    """Pick k experts per row from gate logits (T, N).

    "topk_softmax" (paper, Shazeer-style): softmax over the k selected logits, so weights sum to 1;
    this is the same as renormalising the top-k of the full softmax.
    "softmax_topk" (official release): softmax over all N, keep the k largest, no renormalisation,
    so weights sum to less than 1.
    """
    probs = logits.softmax(dim=-1)  # (T, N)
    top_logits, experts = logits.topk(top_k, dim=-1)  # (T, k), (T, k)
    if routing == "topk_softmax":
        weights = top_logits.softmax(dim=-1)  # (T, k)
    elif routing == "softmax_topk":
        weights = probs.gather(-1, experts)  # (T, k)
    else:
        raise ValueError(f"routing={routing!r} is not one of topk_softmax, softmax_topk")
    return Routing(experts=experts, weights=weights, probs=probs, logits=logits)


def load_balance_loss(r: Routing, num_experts: int) -> Tensor:
    """Switch-Transformer term N · Σ_e f_e · P_e; equals 1 under perfectly uniform routing.

    f_e is the fraction of the T·k assignments sent to expert e (not differentiable), P_e the mean
    router probability of e (differentiable), so the gradient pushes probability off busy experts.
    """
    one_hot = F.one_hot(r.experts, num_experts).to(r.probs.dtype)  # (T, k, N)
    frac = one_hot.sum(dim=(0, 1)) / r.experts.numel()  # (N,)
    mean_prob = r.probs.mean(dim=0)  # (N,)
    return num_experts * torch.einsum("n,n->", frac, mean_prob)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): (1/T) Σ_t (logsumexp_n logits_tn)², logits (T, N).

    It penalises large gate logits, which keeps the router's softmax out of its saturated region.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()  # ()


# A gate is reported as collapsed when its expert load has fewer effective experts (exp of the entropy
# of the load distribution) than the geometric midpoint sqrt(k·N) of the floor k (every row sent to the
# same k experts) and the ceiling N (uniform): normalised entropy H/log N < (log k + log N) / (2 log N).
# For top-1 routing that is the usual H/log N < 0.5; for N = 12, k = 4 it is 0.779 (docs/predictor.md).
def collapse_threshold(num_experts: int, top_k: int) -> float:
    """The normalised-entropy threshold under which a top-k gate over N experts is called collapsed."""
    if num_experts <= 1:
        return 0.0
    return 0.5 * (math.log(top_k) + math.log(num_experts)) / math.log(num_experts)


def routing_health(counts: Sequence[float], rows: float, top_k: int) -> dict[str, Any]:
    """Routing health of one gate from its per-expert assignment counts (host numbers, N of them).

    `rows`: the rows routed (each row makes top_k assignments, to distinct experts). Returns
    `share` {"e00": fraction of the rows that expert 0 received, ...} (each in [0, 1], summing to k),
    `entropy` (entropy of the load distribution counts/Σcounts divided by log N, in [0, 1]; 1 = uniform),
    `max_share`, the `threshold` of `collapse_threshold` and `collapsed` (entropy < threshold).
    """
    n = len(counts)
    total = float(sum(counts))
    width = len(str(n - 1))
    share = {f"e{e:0{width}d}": (float(c) / rows if rows else 0.0) for e, c in enumerate(counts)}
    load = [float(c) / total for c in counts] if total else [0.0] * n
    h = -sum(p * math.log(p) for p in load if p > 0)
    entropy = h / math.log(n) if n > 1 else 1.0
    threshold = collapse_threshold(n, top_k)
    return {
        "share": share,
        "entropy": entropy,
        "max_share": max(share.values()) if share else 0.0,
        "threshold": threshold,
        "collapsed": bool(total > 0 and entropy < threshold),
    }


def log_view(health: dict[str, Any]) -> dict[str, Any]:
    """What a metrics.jsonl record keeps of `routing_health`: each expert's share of the rows and the
    normalised entropy (the threshold is a constant of the run; `evaluate` reports it)."""
    return {"share": health["share"], "entropy": health["entropy"]}


def routing_summary(routing: dict[str, dict[str, dict[str, Any]]], where: str) -> str:
    """One line of routing health over every (direction, gate): the entropy range, how many gates are
    collapsed, and what a collapsed gate means (every row through the same few experts)."""
    gates = [(d, g, h) for d, by_gate in routing.items() for g, h in by_gate.items()]
    if not gates:
        return ""
    n = len(gates[0][2]["share"])
    k = round(sum(gates[0][2]["share"].values()))  # shares sum to k: each row uses k experts
    lo = min(h["entropy"] for _, _, h in gates)
    hi = max(h["entropy"] for _, _, h in gates)
    collapsed = [f"{d} {g}" for d, g, h in gates if h.get("collapsed")]
    threshold = gates[0][2].get("threshold")
    line = (f"routing ({where}; each row uses {k} of {n} experts): normalised entropy {lo:.2f}-{hi:.2f} "
            f"over {len(gates)} gates (1 = uniform, {math.log(k) / math.log(n) if n > 1 else 1:.2f} = every "
            f"row through the same {k} experts)")
    if collapsed and threshold is not None:
        line += (f"; collapsed (below {threshold:.2f}): {', '.join(collapsed)}. Collapse has not cost recall "
                 "in this project's measurements (docs/results.md): nothing to do")
    return line


def warn_unbalanced(
    routing: dict[str, dict[str, dict[str, Any]]], load_balance_weight: float, where: str,
    warned: set | None = None,
) -> None:
    """Warn only where a collapse means a setting is not doing its job: the run asked for balanced routing
    (model.load_balance_weight > 0) and a gate collapsed anyway; once per (direction, gate) when `warned`
    is given. Collapse alone is reported, not warned about: load balancing that removed it lowered
    validation R@1 on emoji and did not raise it on Tux Paint (docs/results.md)."""
    if load_balance_weight <= 0:
        return
    for d, gates in routing.items():
        for gate, h in gates.items():
            if not h.get("collapsed") or (warned is not None and (d, gate) in warned):
                continue
            if warned is not None:
                warned.add((d, gate))
            log.warning(
                "model.load_balance_weight=%s did not balance the %s gate of %s (%s): normalised entropy "
                "%.2f < %.2f; raise it, or set it to 0 (docs/predictor.md, Routing health)",
                load_balance_weight, gate, d, where, h["entropy"], h["threshold"],
            )


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
        ops (argsort, gathers, splits, a scatter-add); the loop is k expert calls and k multiply-adds,
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
        instead of one per task plus their sum: this is the training fast path.
        """
        tasks = list(xs)
        routes = [self.route_rows(xs[t], t) for t in tasks]
        n = self.num_experts
        counts = [torch.bincount(r.experts.flatten(), minlength=n) for r in routes]  # (N,) each
        if dense:
            ys = [self._dense(xs[t], r) for t, r in zip(tasks, routes, strict=True)]  # (T_t, d) each
        else:
            ys = self._sparse_many([xs[t] for t in tasks], routes, torch.stack(counts).sum(dim=0))
        return {
            t: MoEOutput(
                y=y,
                expert_counts=c,
                aux_loss=load_balance_loss(r, self.num_experts),
                z_loss=router_z_loss(r.logits),
            )
            for t, y, c, r in zip(tasks, ys, counts, routes, strict=True)
        }

    def route_rows(self, x: Tensor, task: str) -> Routing:
        """Route rows x (T, d) with the gate of `task`, in float32 even under autocast.

        Routing is a discrete choice: bf16 logits (8 mantissa bits) tie or swap near-equal experts,
        so the gate (T·d·N FLOPs, negligible) runs in float32 and bf16 training routes like float32.
        """
        gate = self.gate_for(task)
        dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64 (tests)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), gate.weight.to(dtype), gate.bias.to(dtype))  # (T, N)
        return route(logits, self.top_k, self.routing)

    def _sparse_many(self, xs: Sequence[Tensor], routes: Sequence[Routing], counts: Tensor) -> list[Tensor]:
        """Sparse dispatch of several row blocks at once; returns one (T_t, d) output per block."""
        sizes = [x.shape[0] for x in xs]
        x = xs[0] if len(xs) == 1 else torch.cat(list(xs))  # (ΣT, d)
        experts = torch.cat([r.experts for r in routes])  # (ΣT, k)
        weights = torch.cat([r.weights for r in routes])  # (ΣT, k)
        return list(self._sparse(x, Routing(experts, weights, probs=weights), counts).split(sizes))

    def _sparse(self, x: Tensor, r: Routing, counts: Tensor) -> Tensor:
        """Group the T·k (row, expert) assignments by expert, run each expert once, scatter back."""
        t, k = r.experts.shape
        if t == 0:
            return torch.zeros_like(x)
        order = r.experts.flatten().argsort(stable=True)  # (T·k,) assignments grouped by expert id
        rows = order // k  # (T·k,) source row of each assignment (flat index = row·k + slot)
        weights = r.weights.flatten()[order]  # (T·k,)
        # The one host sync of sparse dispatch: group sizes must be Python ints to slice.
        sizes = counts.tolist()
        autocast = torch.is_autocast_enabled(x.device.type) and x.is_floating_point()
        if autocast:  # cast the T rows once rather than each expert's T·k/N gathered copy
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if autocast and self.row_bucket > 1:
            ys = self._experts_bucketed(x, rows, sizes)  # (T·k, d)
        else:
            xs = x.index_select(0, rows)  # (T·k, d) rows in expert order
            outs = [self.experts[e](c) for e, c in enumerate(xs.split(sizes)) if sizes[e] > 0]  # (n_e, d)
            ys = torch.cat(outs)  # (T·k, d)
        ys = ys * weights.unsqueeze(-1).to(ys.dtype)  # (T·k, d)
        return ys.new_zeros(t, ys.shape[-1]).index_add(0, rows, ys)  # (T, d)

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
        w = torch.zeros_like(r.probs).scatter(-1, r.experts, r.weights)  # (T, N)
        return torch.einsum("tn,tnd->td", w.to(x.dtype), all_out)  # (T, d)


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
        return MoEOutput(y=y, expert_counts=counts, aux_loss=x.new_zeros(()), z_loss=x.new_zeros(()))

    def forward_tasks(self, xs: Mapping[str, Tensor], dense: bool = False) -> dict[str, MoEOutput]:
        """Apply the MLP once to every task's rows {task: (T_t, d)}, as MultiGateMoE.forward_tasks."""
        for task in xs:
            if task not in self.tasks:
                raise KeyError(f"unknown task {task!r}; known: {', '.join(self.tasks)}")
        sizes = [x.shape[0] for x in xs.values()]
        ys = self.mlp(torch.cat(list(xs.values()))).split(sizes)  # (T_t, d) each
        return {
            t: MoEOutput(
                y=y,
                expert_counts=torch.full((1,), n, dtype=torch.long, device=y.device),
                aux_loss=y.new_zeros((), dtype=torch.float32),
                z_loss=y.new_zeros((), dtype=torch.float32),
            )
            for t, y, n in zip(xs, ys, sizes, strict=True)
        }
