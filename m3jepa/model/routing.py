"""MoE routing: top-k gates, the expert counts, the router's auxiliary terms and routing health."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class OnRead:
    """A dataclass field that may be given a zero-argument function instead of its value: the function
    runs the first time the field is read, and its result is kept.

    The router's auxiliary terms are built this way: a run that weights them 0 (the paper) never reads
    them, so its step never computes them (66 operations of the paper's step, forward and backward).
    """

    def __init__(self, default: Any = ...) -> None:
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:  # the dataclass machinery asking for a default
            if self.default is ...:
                raise AttributeError(self.key)
            return self.default
        value = obj.__dict__[self.key]
        if callable(value):
            value = obj.__dict__[self.key] = value()
        return value

    def __set__(self, obj: Any, value: Tensor | Callable[[], Tensor] | None) -> None:
        obj.__dict__[self.key] = value


@dataclass
class Routing:
    """Top-k routing of T rows among N experts."""

    experts: Tensor  # (T, k) int64 expert ids
    weights: Tensor  # (T, k) mixing weights of the selected experts
    # (T, N) softmax over all N logits (for the load-balancing term); computed on first read when the
    # routing rule does not need it (topk_softmax)
    probs: Tensor = OnRead()
    logits: Tensor | None = None  # (T, N) the gate's logits (for the router z-loss)


def route(logits: Tensor, top_k: int, routing: str = "topk_softmax") -> Routing:
    """Pick k experts per row from gate logits (T, N).

    "topk_softmax" (paper, Shazeer-style): softmax over the k selected logits, so weights sum to 1;
    this is the same as renormalising the top-k of the full softmax.
    "softmax_topk" (official release): softmax over all N, keep the k largest, no renormalisation,
    so weights sum to less than 1.
    """
    top_logits, experts = logits.topk(top_k, dim=-1)  # (T, k), (T, k)
    if routing == "topk_softmax":
        weights = top_logits.softmax(dim=-1)  # (T, k)
        return Routing(experts=experts, weights=weights, probs=lambda: logits.softmax(dim=-1), logits=logits)
    if routing == "softmax_topk":
        probs = logits.softmax(dim=-1)  # (T, N)
        return Routing(experts=experts, weights=probs.gather(-1, experts), probs=probs, logits=logits)
    raise ValueError(f"routing={routing!r} is not one of topk_softmax, softmax_topk")


def load_balance_loss(r: Routing, num_experts: int, counts: Tensor | None = None) -> Tensor:
    """Switch-Transformer term N · Σ_e f_e · P_e; equals 1 under perfectly uniform routing.

    f_e is the fraction of the T·k assignments sent to expert e (not differentiable), P_e the mean
    router probability of e (differentiable), so the gradient pushes probability off busy experts.
    `counts` (N,): the assignments per expert when the caller has them (`expert_counts`).
    """
    counts = expert_counts(r.experts, num_experts) if counts is None else counts  # (N,)
    frac = counts.to(r.probs.dtype) / r.experts.numel()  # (N,)
    mean_prob = r.probs.mean(dim=0)  # (N,)
    return num_experts * (frac * mean_prob).sum()  # ()


def expert_counts(experts: Tensor, num_experts: int, ids: Tensor | None = None) -> Tensor:
    """int64 assignments per expert of expert ids (..., T, k): (..., N), on their device.

    A comparison against 0..N-1 (`ids`, made here when not given) and a sum: `bincount` reads the ids'
    range back to the host on a GPU, and `one_hot` checks it on the host on a CPU.
    """
    ids = torch.arange(num_experts, device=experts.device) if ids is None else ids  # (N,)
    return (experts.flatten(-2).unsqueeze(-1) == ids).sum(dim=-2)  # (..., N)


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
