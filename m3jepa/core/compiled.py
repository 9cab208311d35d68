"""runtime.compile: the training step's forward and backward through torch.compile (docs/training.md)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from m3jepa.core.device import Runtime

log = logging.getLogger(__name__)


def compiled(objective: nn.Module, runtime: Runtime) -> nn.Module:
    """`objective` itself (runtime.compile = "off"), or torch.compile's wrapper of it in that mode.

    The wrapper shares the objective's parameters and buffers: the training step calls it, while the
    optimizer, the gradient reducer, validation and checkpoints keep using `objective` (whose state_dict
    keys the wrapper would prefix). Each direction compiles once, on its first step (its direction string
    is a constant of the graph); the backward is compiled with it (AOTAutograd). Dropout masks come from
    the compiled graph's generator (seeded from torch's, so a compiled run repeats itself), not eager
    dropout's: a compiled run's masks differ from an eager run's.
    """
    if runtime.compile == "off":
        return objective
    log.info("runtime.compile = %s: torch.compile compiles each direction's step on its first use",
             runtime.compile)
    return torch.compile(objective, mode=None if runtime.compile == "default" else runtime.compile)
