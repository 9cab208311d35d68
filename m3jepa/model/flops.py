"""Model FLOPs per sample, counted from the config: the matrix products of one direction's forward pass and
training step (what MFU divides by; `m3jepa model-info` prints them, bench/ uses them).

A product of an (in → out) layer costs 2·in·out FLOPs per row forward. Backward costs twice that (the
input's gradient and the weight's), except for layers fed by data (the input projections, the target
projection, the linear baseline's maps), whose input needs no gradient: once. Only the experts a row is
routed to count (top-k), the gates count, elementwise work (GELU, LayerNorm, softmax, dropout) does not.
The InfoNCE logits grow with the batch and are counted apart (`logits_flops`).
"""

from __future__ import annotations

from collections.abc import Mapping

from m3jepa.config import ModelConfig
from m3jepa.model.predictor import parse_direction

TASKS = 2  # pred and cl: each row goes through the mixer once per task


def layers(cfg: ModelConfig, dims: Mapping[str, int], direction: str) -> list[tuple[str, float, bool]]:
    """(what, multiply-adds per sample, fed by data) of every product one sample of `direction` runs."""
    parsed = parse_direction(direction)
    sources, target = parsed.sources, parsed.target
    for m in (*sources, target):
        if m not in dims:
            raise KeyError(f"direction {direction!r} names {m!r}, which has no dimension in {dict(dims)}")
    d, h, dcl = cfg.dim, cfg.hidden, cfg.cl_dim
    if cfg.predictor == "linear":
        return [(f"proj.{m}", dims[m] * dcl, True) for m in (*sources, target)]
    out = [(f"in_proj.{m}", dims[m] * d, True) for m in sources]
    if cfg.predictor == "moe":
        out += [("gates", TASKS * d * cfg.num_experts, False),
                ("experts", TASKS * cfg.top_k * 2 * d * h, False)]  # k experts of two layers, per task
    else:  # mlp: one dense MLP of the same width for both tasks
        out += [("mlp", TASKS * 2 * d * h, False)]
    out += [
        ("pred_head", d * dims[target], False),
        ("cl_head", d * dcl, False),
        ("cl_target", dims[target] * dcl, True),
    ]
    return out


def forward_flops(cfg: ModelConfig, dims: Mapping[str, int], direction: str) -> float:
    """FLOPs of one sample's forward pass of `direction` (without the InfoNCE logits)."""
    return sum(2.0 * macs for _, macs, _ in layers(cfg, dims, direction))


def train_flops(cfg: ModelConfig, dims: Mapping[str, int], direction: str) -> float:
    """FLOPs of one sample's training step of `direction`: forward and backward, without the logits."""
    return sum(2.0 * macs * (2 if from_data else 3) for _, macs, from_data in layers(cfg, dims, direction))


def logits_flops(cfg: ModelConfig, batch: int, train: bool = True) -> float:
    """Per sample, the symmetric InfoNCE logits of a batch of `batch` pairs on one process: one (B, d_cl)
    x (d_cl, B) product serves both directions (2·B·d_cl per row); backward adds the gradients of both
    sides (twice that). Under DDP each direction takes its own product against the gathered batch."""
    return 2.0 * batch * cfg.cl_dim * (3 if train else 1)
