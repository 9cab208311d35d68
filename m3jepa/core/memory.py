"""The memory a predictor needs, counted from its config and checked against the machine before any tensor
is allocated: a model that cannot fit is one line naming its sizes, not an allocator traceback."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from m3jepa.config import MAX_WIDTH, ConfigError, ModelConfig, core_parameters
from m3jepa.device_table import kind_of

log = logging.getLogger(__name__)

# Bytes each parameter holds: training keeps float32 weights, gradients and AdamW's two moments;
# loading keeps the float32 weights and, while they are copied in, the tensors read from the file.
TRAIN_BYTES_PER_PARAMETER = 16
LOAD_BYTES_PER_PARAMETER = 8


def check_dims(dims: Mapping[str, object], where: str) -> dict[str, int]:
    """Each modality's latent width as an int in [1, MAX_WIDTH]; ConfigError naming `where`'s key."""
    out = {}
    for modality, dim in dims.items():
        key = f"{where}[{modality!r}]"
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ConfigError(f"{key} must be a whole number of dimensions, got {str(dim)[:40]!r}")
        if not 1 <= dim <= MAX_WIDTH:
            raise ConfigError(f"{key}={dim:,} is not a latent width m3jepa takes (1 to {MAX_WIDTH:,})")
        out[str(modality)] = dim
    return out


def parameter_lower_bound(model: ModelConfig, dims: Mapping[str, int]) -> int:
    """At least this many parameters: the experts, gates and a contrastive head (config.core_parameters)
    and one input projection per modality (D_m x model.dim; the linear baseline's D_m x model.cl_dim).

    Counted from the config alone, in no time and without torch (a meta-device build imports most of
    torch's compiler on first use, seconds a process); tests check it against the built model.
    """
    width = model.cl_dim if model.predictor == "linear" else model.dim
    return core_parameters(model) + sum(dims.values()) * width


def device_bytes(device: torch.device) -> int:
    """All the memory of `device`: a GPU's total (the device table's memory probe), or the host's RAM (or
    its cgroup limit) for a device that computes in it."""
    kind = kind_of(device)
    if kind.total_memory is not None:
        return kind.total_memory(device)
    from m3jepa.core.paired import ram_bytes

    return ram_bytes()


def check_model_fits(
    model: ModelConfig,
    dims: Mapping[str, int],
    device: torch.device,
    *,
    training: bool,
    where: str = "",
    available: int | None = None,
) -> int:
    """The bytes the model needs at least (TRAIN_/LOAD_BYTES_PER_PARAMETER per parameter of
    `parameter_lower_bound`); ConfigError naming the sizes that set it when that is more than all of
    `device`'s memory (`available`, measured when None).

    Activations and the data come on top, so passing is necessary, not sufficient; failing is certain.
    """
    n = parameter_lower_bound(model, dims)
    per = TRAIN_BYTES_PER_PARAMETER if training else LOAD_BYTES_PER_PARAMETER
    need = n * per
    have = device_bytes(device) if available is None else available
    if need > have:
        what = "training it holds" if training else "loading it holds"
        sizes = ", ".join(f"{k}={getattr(model, k):,}" for k in ("dim", "hidden", "num_experts", "cl_dim"))
        widths = ", ".join(f"{m}={d:,}" for m, d in sorted(dims.items()))
        raise ConfigError(
            f"{where + ': ' if where else ''}the predictor has at least {n:,} parameters ({sizes}; latent "
            f"widths {widths}); {what} {per} bytes each, {need / 1e9:,.1f} GB, more than the "
            f"{have / 1e9:,.1f} GB of {device}; make model.dim / model.hidden / model.num_experts smaller"
        )
    log.debug("the predictor needs %.2f GB of the %.1f GB of %s", need / 1e9, have / 1e9, device)
    return need
