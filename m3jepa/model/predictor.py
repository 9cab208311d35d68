"""The M3-JEPA predictor: modality projections, task embeddings, a multi-gate MoE, and per-target heads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3jepa.config import ModelConfig
from m3jepa.model.moe import DenseMixer, MultiGateMoE
from m3jepa.model.routing import OnRead

TASKS = ("pred", "cl")  # the two tasks of the multi-gate MoE: latent prediction and contrastive
PAPER_DIMS = {"image": 1024, "text": 4096}  # DINOv2-Large, Llama-3-8B


@dataclass
class PredictorOutput:
    """What every predictor returns for one direction.

    The router terms may be given as functions, computed when first read (`routing.OnRead`): the loss
    reads them only when its weight for them is not 0.
    """

    pred: Tensor | None  # (B, D_target) predicted target latent; None for the linear baseline
    cl_query: Tensor  # (B, d_cl) L2-normalised query in the contrastive space
    aux_loss: Tensor = OnRead()  # () Switch load-balancing term, UNWEIGHTED (scaled by load_balance_weight)
    expert_counts: dict[str, Tensor]  # task -> (N,) rows routed to each expert
    z_loss: Tensor | None = OnRead(default=None)  # () router z-loss averaged over the tasks, UNWEIGHTED


@dataclass(frozen=True)
class Direction:
    """A parsed direction string: 'image->text' or 'image+text->text'."""

    sources: tuple[str, ...]
    target: str

    @property
    def source(self) -> str | tuple[str, ...]:
        """A single modality name, or the tuple for a concatenated multimodal input."""
        return self.sources[0] if len(self.sources) == 1 else self.sources


def parse_direction(direction: str) -> Direction:
    """'image+text->audio' → Direction(sources=('image', 'text'), target='audio')."""
    if direction.count("->") != 1:
        raise ValueError(f"direction {direction!r} is not of the form 'source->target'")
    src, tgt = (s.strip() for s in direction.split("->"))
    sources = tuple(s.strip() for s in src.split("+"))
    if not all(sources) or not tgt:  # 'image+->text' is a typo, not a one-source direction
        raise ValueError(f"direction {direction!r} has an empty source or target")
    return Direction(sources=sources, target=tgt)


def as_inputs(
    source: str | tuple[str, ...], x: Tensor | Mapping[str, Tensor], dims: Mapping[str, int]
) -> dict[str, Tensor]:
    """Normalise (source, x) to {modality: (B, D_m)} and check names and shapes."""
    if isinstance(source, str):
        if not isinstance(x, Tensor):
            raise TypeError(f"source {source!r} is one modality, so x must be a tensor, not {type(x)}")
        inputs = {source: x}
    else:
        if not isinstance(x, Mapping) or set(x) != set(source):
            got = sorted(x) if isinstance(x, Mapping) else type(x).__name__
            raise ValueError(f"source {source!r} needs x as a dict with exactly those keys, got {got}")
        inputs = {m: x[m] for m in source}
    for m, t in inputs.items():
        if m not in dims:
            raise KeyError(f"unknown modality {m!r}; the predictor was built for {', '.join(dims)}")
        if t.ndim != 2 or t.shape[-1] != dims[m]:
            raise ValueError(f"{m} input has shape {tuple(t.shape)}; expected (B, {dims[m]}) pooled latents")
    return inputs


# F.normalize's eps: rows shorter than this are divided by it instead of their norm
NORMALIZE_EPS = 1e-12


class _L2Normalize(torch.autograd.Function):
    """x / max(‖x‖, eps) along the last dim: F.normalize's function with a backward of 6 operations
    instead of the 11 its autograd records (tests/test_model.py checks both against F.normalize)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
        scale = norm.clamp_min(NORMALIZE_EPS)  # (..., 1)
        y = x / scale  # (..., D)
        ctx.save_for_backward(y, scale, norm >= NORMALIZE_EPS)  # the last: rows not clamped
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        y, scale, unclamped = ctx.saved_tensors
        # d(x/‖x‖) = (g − y⟨g, y⟩)/‖x‖; a clamped row is x/eps, linear: g/eps
        along = (g * y).sum(dim=-1, keepdim=True) * unclamped  # (..., 1)
        return (g - y * along) / scale  # (..., D)


def l2_normalize(x: Tensor) -> Tensor:
    """Rows of x (..., D) scaled to unit L2 norm (rows under 1e-12 divided by 1e-12), as F.normalize."""
    return _L2Normalize.apply(x)


# A dimension whose training rows never vary has std 0; its standardised target is 0 whatever this floor.
MIN_STD = 1e-6


class TargetStandardizer(nn.Module):
    """(y − mean_m) / std_m per dimension, with the train split's statistics of each modality m as buffers.

    The buffers are named `mean_<m>` / `std_<m>` and start at 0 / 1 (the identity) until `fit` sets them.
    """

    def __init__(self, dims: Mapping[str, int], device: torch.device | str | None = None) -> None:
        super().__init__()
        self.modalities = tuple(dims)
        for m, dm in dims.items():
            self.register_buffer(f"mean_{m}", torch.zeros(dm, device=device))  # (D_m,)
            self.register_buffer(f"std_{m}", torch.ones(dm, device=device))  # (D_m,)

    def stats(self, modality: str) -> tuple[Tensor, Tensor]:
        """(mean (D_m,), std (D_m,)) of one modality."""
        if modality not in self.modalities:
            raise KeyError(f"unknown modality {modality!r}; standardised for {', '.join(self.modalities)}")
        return getattr(self, f"mean_{modality}"), getattr(self, f"std_{modality}")

    def fit(self, modality: str, mean: Tensor, std: Tensor) -> None:
        """Set one modality's statistics (D_m,) (any float dtype and device; copied into the buffers)."""
        m_buf, s_buf = self.stats(modality)
        m_buf.copy_(mean.to(m_buf))
        s_buf.copy_(std.to(s_buf).clamp_min(MIN_STD))

    def forward(self, modality: str, y: Tensor) -> Tensor:
        mean, std = self.stats(modality)
        return (y - mean.to(y.dtype)) / std.to(y.dtype)  # (B, D_m)


def _embedding(dim: int) -> nn.Parameter:
    # Small normal init, as for token embeddings: distinct per key from the first step.
    return nn.Parameter(torch.randn(dim) * 0.02)


class M3JepaPredictor(nn.Module):
    """Source latents → (predicted target latent, contrastive query); `predictor` = "moe" or "mlp".

    Per task t in (pred, cl), with z the projected source:
        u_t = z + E_t;   h_t = u_t + GELU(LayerNorm_t(Mixer(u_t, gate_t)))
    then pred = PredHead[target](h_pred) and cl_query = normalize(CLHead[target](h_cl)).
    """

    def __init__(self, cfg: ModelConfig, dims: Mapping[str, int]) -> None:
        super().__init__()
        if cfg.predictor not in ("moe", "mlp"):
            raise ValueError(f"M3JepaPredictor builds moe or mlp, not {cfg.predictor!r}")
        self.dims = dict(dims)
        d = cfg.dim
        self.in_proj = nn.ModuleDict({m: nn.Linear(dm, d) for m, dm in self.dims.items()})
        self.modality_emb = nn.ParameterDict({m: _embedding(d) for m in self.dims})
        self.task_emb = nn.ParameterDict({t: _embedding(d) for t in TASKS})
        if cfg.predictor == "moe":
            self.mixer: nn.Module = MultiGateMoE(
                d, cfg.hidden, cfg.num_experts, cfg.top_k, cfg.dropout, TASKS, cfg.gates, cfg.routing
            )
        else:
            self.mixer = DenseMixer(d, cfg.hidden, cfg.dropout, TASKS)
        self.norms = nn.ModuleDict({t: nn.LayerNorm(d) for t in TASKS})
        self.pred_head = nn.ModuleDict({m: nn.Linear(d, dm) for m, dm in self.dims.items()})
        self.cl_head = nn.ModuleDict({m: nn.Linear(d, cfg.cl_dim) for m in self.dims})
        self.cl_target = nn.ModuleDict({m: nn.Linear(dm, cfg.cl_dim) for m, dm in self.dims.items()})
        self.target_space: TargetStandardizer | None = None  # `standardize_targets` sets it

    def embed(self, source: str | tuple[str, ...], x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Project each source modality into d and SUM them (a concatenated input adds its parts).

        The modality embedding is added after the GELU, where it is not absorbed by the bias.
        """
        inputs = as_inputs(source, x, self.dims)
        parts = [F.gelu(self.in_proj[m](t)) + self.modality_emb[m] for m, t in inputs.items()]  # (B, d)
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum(dim=0)  # (B, d)

    def forward(
        self,
        source: str | tuple[str, ...],
        x: Tensor | Mapping[str, Tensor],
        target_modality: str,
        dense: bool = False,
    ) -> PredictorOutput:
        """Predict the `target_modality` latent and contrastive query from source latents x (B, D_m).

        Both tasks go through the mixer in ONE call (`forward_tasks`): each expert runs once on the
        rows both gates send it, which is the same function as one mixer call per task.
        """
        if target_modality not in self.dims:
            raise KeyError(f"unknown target {target_modality!r}; built for {', '.join(self.dims)}")
        z = self.embed(source, x)  # (B, d)
        tasks = torch.stack([self.task_emb[t] for t in TASKS])  # (2, d)
        u = z.unsqueeze(0) + tasks.unsqueeze(1)  # (2, B, d): u[i] = z + E_{TASKS[i]}
        b = z.shape[0]
        mixed = self.mixer.forward_blocks(u.flatten(0, 1), TASKS, [b] * len(TASKS), dense)  # y (B, d) each
        h = {t: self._residual(t, u_t, mixed[t].y) for t, u_t in zip(TASKS, u.unbind(0), strict=True)}
        pred = self.pred_head[target_modality](h["pred"])  # (B, D_target)
        query = self._cl_query(target_modality, h["cl"])  # (B, d_cl)
        counts = {t: m.expert_counts for t, m in mixed.items()}
        return PredictorOutput(
            pred=pred,
            cl_query=query,
            aux_loss=lambda: sum(m.aux_loss for m in mixed.values()) / len(TASKS),  # ()
            expert_counts=counts,
            z_loss=lambda: sum(m.z_loss for m in mixed.values()) / len(TASKS),  # ()
        )

    def query(
        self, source: str | tuple[str, ...], x: Tensor | Mapping[str, Tensor], target_modality: str
    ) -> Tensor:
        """`forward(source, x, target_modality).cl_query` (B, d_cl) alone: the contrastive task only (no
        prediction head, no pred gate, no routing statistics), and for one or two rows the MoE's per-row
        expert loop (`MultiGateMoE.mix`). The same function as `forward` to float32 rounding; what a
        search query needs (m3jepa.api `embed_query`, space "cl")."""
        if target_modality not in self.dims:
            raise KeyError(f"unknown target {target_modality!r}; built for {', '.join(self.dims)}")
        u = self.embed(source, x) + self.task_emb["cl"]  # (B, d)
        return self._cl_query(target_modality, self._residual("cl", u, self.mixer.mix(u, "cl")))  # (B, d_cl)

    def _residual(self, task: str, u: Tensor, y: Tensor) -> Tensor:
        """A task's trunk output (B, d): its input u plus the normalised, GELU'd mixer output y."""
        return u + F.gelu(self.norms[task](y))  # (B, d)

    def _cl_query(self, target_modality: str, h: Tensor) -> Tensor:
        """The L2-normalised contrastive query (B, d_cl) from the cl task's trunk output h (B, d)."""
        return l2_normalize(self.cl_head[target_modality](h))  # (B, d_cl)

    def standardize_targets(self) -> None:
        """Predict standardised target latents (loss.pred_target = "standardized"): adds the per-modality
        mean and std buffers (zeros and ones until `TargetStandardizer.fit` sets them from the train split),
        which checkpoints then carry, so evaluation and `m3jepa.load` score in the same space."""
        if self.target_space is None:
            device = self.pred_head[next(iter(self.dims))].weight.device
            self.target_space = TargetStandardizer(self.dims, device=device)

    def pred_space(self, modality: str, y: Tensor) -> Tensor:
        """Target latents y (B, D_m) in the space `pred` lives in: y itself, or standardised."""
        return y if self.target_space is None else self.target_space(modality, y)  # (B, D_m)

    def encode_target(self, target_modality: str, y: Tensor) -> Tensor:
        """Target latents y (B, D_target) → L2-normalised keys (B, d_cl) for the contrastive loss."""
        return l2_normalize(self.cl_target[target_modality](y))  # (B, d_cl)


def paper_preset() -> ModelConfig:
    """The paper's predictor: N=12, k=4, h=2048, dropout 0.1, with d = d_cl = 2048.

    d = d_cl = h = 2048 is the official release's layout (its `hidden_size` is both the common
    width and each expert's hidden width, and its contrastive heads map hidden → hidden); it is what
    brings the parameter count to the ~140.6M the paper reports. The gates are the paper's (multi).
    """
    return ModelConfig(
        predictor="moe",
        dim=2048,
        hidden=2048,
        num_experts=12,
        top_k=4,
        dropout=0.1,
        gates="multi",
        routing="topk_softmax",
        cl_dim=2048,
    )


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of `module`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_breakdown(module: nn.Module) -> dict[str, int]:
    """Parameters per top-level child (and direct parameters), for docs and logs."""
    out: dict[str, int] = {}
    for name, p in module.named_parameters():
        key = name.split(".")[0]
        out[key] = out.get(key, 0) + p.numel()
    return out


def paper_parameter_count(gates: str = "multi", dims: Mapping[str, int] | None = None) -> int:
    """Parameters of the paper preset at DINOv2-Large/Llama-3-8B dims, built on the meta device."""
    cfg = paper_preset()
    cfg.gates = gates
    with torch.device("meta"):  # no memory, no init cost: only shapes are needed
        model = M3JepaPredictor(cfg, dims or PAPER_DIMS)
    return count_parameters(model)
