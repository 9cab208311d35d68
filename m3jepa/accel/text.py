"""Opt-in int8 text encoder for queries on a CPU: MiniLM's nn.Linear layers dynamically quantised."""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
ENCODERS = ("minilm-l6",)  # the text encoders whose int8 agreement was measured (docs/serve.md)
# Kept float32: the one Linear whose int8 error was largest when each was quantised alone (layer 0's FFN
# output, mean latent cosine 0.9954 over 197 Tux Paint captions; the next 0.9972). Keeping it raised the
# Tux Paint top-10 overlap from 0.898 to 0.914 for a speed-up of 2.1x instead of 2.2x at batch 8.
FLOAT_LAYERS = ("encoder.layer.0.output.dense",)


class QueryEncoderError(ValueError):
    """The int8 query encoder was asked for where it cannot run (a GPU, a LoRA-tuned tail)."""


def check_precision(precision: str, device: torch.device | str) -> None:
    """Refuse a precision that is not fp32/int8, and int8 on a device that is not a CPU."""
    if precision not in PRECISIONS:
        raise QueryEncoderError(f"query encoder precision {precision!r} is not one of "
                                f"{', '.join(PRECISIONS)}")
    if precision == "int8" and torch.device(device).type != "cpu":
        raise QueryEncoderError(f"the int8 query encoder runs only on a CPU (torch's dynamic int8 Linear has "
                                f"no {torch.device(device).type} kernel); the model is on {device}: drop "
                                "--query-encoder-precision int8 or use --device cpu")


def quantize_text_encoder(encoder: Any, device: torch.device | str) -> Any:
    """A copy of MiniLM's encoder (`encoder.model` the transformers module) whose nn.Linear layers but
    FLOAT_LAYERS are dynamically quantised to int8: weights per output channel, activations per tensor
    at each call (so a caption's result depends slightly on the captions batched with it). Embeddings,
    layer norms and FLOAT_LAYERS stay float32; `encoder` itself is left as it was."""
    check_precision("int8", device)
    module = getattr(encoder, "model", None)
    name = getattr(getattr(encoder, "spec", None), "name", None)
    if not isinstance(module, nn.Module) or name not in ENCODERS:
        what = f"{name} (a LoRA-tuned tail?)" if isinstance(name, str) else type(encoder).__name__
        raise QueryEncoderError(f"the int8 query encoder is measured for {', '.join(ENCODERS)} only; this "
                                f"model's text encoder is {what}: drop --query-encoder-precision int8")
    layers = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n not in FLOAT_LAYERS]
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():  # torch announces the quantised dtypes' move to torchao; the API stays
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        quantised = torch.ao.quantization.quantize_dynamic(copy.deepcopy(module),
                                                           dict.fromkeys(layers, qconfig), dtype=torch.qint8)
    out = copy.copy(encoder)  # shares the tokenizer and settings; only the model differs
    out.model = quantised.eval()
    log.info("text queries use MiniLM with int8 Linear layers (not bit-equal to the stored float32 latents)")
    return out
