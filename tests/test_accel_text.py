"""The opt-in int8 query encoder (m3jepa.accel.text) against its plain float32 MiniLM reference, its
refusals, and that the default path never builds it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import m3jepa.accel.text as accel_text
from m3jepa.accel.text import FLOAT_LAYERS, QueryEncoderError, check_precision, quantize_text_encoder
from m3jepa.api.raw import ApiError, RawEncoders
from m3jepa.data.tuxpaint import read_caption, scan_stamps
from m3jepa.encoders import get_encoder_spec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def minilm():
    return get_encoder_spec("minilm-l6").factory(CPU, torch.float32)


@pytest.fixture(scope="module")
def captions(tuxpaint_root) -> list[str]:
    """Every 4th Tux Paint caption (238 of the 950 stamps), in a fixed order."""
    return [read_caption(tuxpaint_root / f"{s.stamp_id}.txt") for s in scan_stamps(tuxpaint_root)][::4]


def _pooled(encoder, texts: list[str], batch: int = 32) -> torch.Tensor:
    pre = encoder.preprocessor
    with torch.inference_mode():
        return torch.cat([encoder.encode(pre.collate([pre(t) for t in texts[i : i + batch]]), "pooled").pooled
                          for i in range(0, len(texts), batch)])  # (N, 384), L2-normalised


def _raw(precision: str = "fp32", device: torch.device = CPU) -> RawEncoders:
    spec = get_encoder_spec("minilm-l6")
    return RawEncoders({"text": {"encoder": spec.name, "revision": spec.revision}}, device, "float32", {},
                       query_precision=precision)


def test_int8_latents_and_neighbours_stay_close_to_float32(minilm, captions):
    """Bounds from the measured agreement (docs/serve.md: over the 785 Tux Paint captions, cosine mean
    0.980, min 0.915), with some margin for other CPUs' int8 kernels."""
    int8 = quantize_text_encoder(minilm, CPU)
    layers = {n: type(m) for n, m in int8.model.named_modules()}
    quantised = [n for n, t in layers.items() if t is torch.ao.nn.quantized.dynamic.Linear]
    assert len(quantised) == 36  # 6 layers x 6 and the (unused) pooler, less FLOAT_LAYERS
    assert all(layers[n] is nn.Linear for n in FLOAT_LAYERS)
    assert all(type(m) is not torch.ao.nn.quantized.dynamic.Linear for m in minilm.model.modules()), \
        "quantize_text_encoder changed the float32 encoder it was given"
    ref, fast = _pooled(minilm, captions), _pooled(int8, captions)
    cos = (ref * fast).sum(-1)
    assert cos.mean() >= 0.97 and cos.min() >= 0.88, (float(cos.mean()), float(cos.min()))
    assert cos.max() < 1 - 1e-6  # it does run in int8: not the float32 numbers
    # each caption as a query against every caption's float32 latent: the top 10 found with the int8
    # query against those found with the float32 one
    top = {name: torch.topk(q @ ref.T, 10).indices.tolist() for name, q in (("ref", ref), ("fast", fast))}
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top["ref"], top["fast"], strict=True)])
    assert overlap >= 0.85, overlap


def test_only_text_queries_go_through_int8(minilm, captions, monkeypatch):
    texts = captions[:9]
    plain, int8 = _raw(), _raw("int8")
    stored = plain.encode("text", texts)
    assert torch.equal(int8.encode("text", texts), stored)  # targets and M3Model.encode stay float32
    queries = int8.encode("text", texts, query=True)
    assert not torch.equal(queries, stored) and (queries * stored).sum(-1).min() > 0.9

    def refuse(*_a, **_k):
        raise AssertionError("the default path built the int8 encoder")

    monkeypatch.setattr(accel_text, "quantize_text_encoder", refuse)
    assert torch.equal(plain.encode("text", texts, query=True), stored)  # fp32 queries: the stored numbers


def test_int8_is_refused_where_it_cannot_run(minilm):
    with pytest.raises(QueryEncoderError, match="runs only on a CPU.*model is on cuda:0"):
        check_precision("int8", "cuda:0")
    with pytest.raises(ApiError, match="runs only on a CPU"):
        _raw("int8", torch.device("cuda"))
    with pytest.raises(ApiError, match="'int4' is not one of fp32, int8"):
        _raw("int4")
    check_precision("fp32", "cuda:0")  # the default is never refused

    class Tuned:  # a LoRA-tuned tail: no transformers model to quantise
        preprocessor = minilm.preprocessor

    with pytest.raises(QueryEncoderError, match="measured for minilm-l6 only"):
        quantize_text_encoder(Tuned(), CPU)


def test_serve_refuses_an_unknown_query_encoder_precision_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from m3jepa.cli import app

    res = CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--query-encoder-precision", "int4"])
    assert res.exit_code == 2
    assert "--query-encoder-precision int4 is not one of fp32, int8" in res.output
