"""Prefix stores and layer stacks: finish(prefix(x)) equals the encoder's pooled output, stores round-trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m3jepa.config import EncodeConfig
from m3jepa.data.records import Record, membership_fingerprint
from m3jepa.encoders import EncoderError, get_encoder_spec
from m3jepa.encoders.layers import (
    LITE0_BLOCKS,
    efficientnet_geometry,
    get_layer_stack,
    pad_states,
    stack_geometry,
)
from m3jepa.store import Manifest, StoreError, StoreMismatchError, StoreWriter, open_store, verify_store
from m3jepa.store.cli_views import inspect_view
from m3jepa.store.manifest import rows_from_records

CPU = torch.device("cpu")
ATOL = 1e-5  # float32 tolerance: the cut changes no arithmetic, only where it is interrupted


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _captions(pngs: list[Path]) -> list[str]:
    return [p.with_suffix(".txt").read_text(errors="replace").splitlines()[0].strip() for p in pngs]


def _batch(enc, payloads):
    pre = enc.preprocessor
    return pre.collate([pre(p) for p in payloads])


def _finish(stack, pre):
    with torch.no_grad():
        return stack.finish(pre.states, pre.mask)


@pytest.fixture
def stamps(real_pngs):
    pngs = [p for p in real_pngs if p.with_suffix(".txt").is_file()]
    assert len(pngs) >= 4
    return pngs


@pytest.fixture(scope="module")
def minilm():
    return get_encoder_spec("minilm-l6").factory(CPU, torch.float32)


TEXTS = ["a cat", "a brown dog sitting on a big red chair in the afternoon sun", "hello there", "x"]


# ---------------------------------------------------------------- transformers stacks


@pytest.mark.parametrize("n", [1, 2, 3])
def test_dinov2_finish_of_prefix_is_the_cls_latent(tiny_dinov2, stamps, n):
    from transformers import Dinov2Model

    enc = get_encoder_spec(f"hf:{tiny_dinov2}").factory(CPU, torch.float32)
    stack = get_layer_stack(enc, n)
    assert (stack.layer_index, stack.geometry.state_dim) == (4 - n, 32)
    batch = _batch(enc, [str(p) for p in stamps[:3]])
    pre = stack.prefix(batch)
    assert pre.states.shape == (3, 257, 32) and bool(pre.mask.all())
    ref_model = Dinov2Model.from_pretrained(tiny_dinov2).eval()  # independent: the model's own forward
    with torch.no_grad():
        ref = ref_model(pixel_values=batch["pixel_values"], output_hidden_states=True)
    torch.testing.assert_close(pre.states, ref.hidden_states[4 - n], atol=ATOL, rtol=0)  # entering layer L-n
    torch.testing.assert_close(_finish(stack, pre), ref.last_hidden_state[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(_finish(stack, pre), enc.encode(batch, "pooled").pooled, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_llama_finish_of_prefix_is_the_last_two_layer_mean(tiny_llama, n):
    from transformers import AutoTokenizer, LlamaModel

    enc = get_encoder_spec(f"hf:{tiny_llama}").factory(CPU, torch.float32)
    stack = get_layer_stack(enc, n)
    assert type(stack).__name__ == "DecoderStack" and stack.layer_index == 4 - n
    batch = _batch(enc, TEXTS)  # mixed lengths: rows are right-padded
    pre = stack.prefix(batch)
    pooled = _finish(stack, pre)
    torch.testing.assert_close(pooled, enc.encode(batch, "pooled").pooled, atol=ATOL, rtol=0)
    tok, model = AutoTokenizer.from_pretrained(tiny_llama), LlamaModel.from_pretrained(tiny_llama).eval()
    for i, text in enumerate(TEXTS):  # each text alone, unpadded: the independent reference
        with torch.no_grad():
            hs = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
        torch.testing.assert_close(pre.rows()[i], hs[4 - n][0], atol=ATOL, rtol=0)
        torch.testing.assert_close(pooled[i], ((hs[-1][0] + hs[-2][0]) / 2).mean(0), atol=ATOL, rtol=0)


def test_padding_never_changes_a_row(tiny_llama, minilm):
    for enc in (get_encoder_spec(f"hf:{tiny_llama}").factory(CPU, torch.float32), minilm):
        stack = get_layer_stack(enc, 3)
        pre = stack.prefix(_batch(enc, TEXTS))
        rows = pre.rows()
        alone = [stack.prefix(_batch(enc, [t])).rows()[0] for t in TEXTS]
        for a, b in zip(rows, alone, strict=True):  # a row's states do not depend on its batch mates
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        wide = pad_states(rows)
        garbage = torch.zeros(len(rows), 7, wide.states.shape[2]) + 1e3  # 7 more padded positions
        states = torch.cat([wide.states, garbage], dim=1)  # (B, T + 7, D)
        mask = torch.cat([wide.mask, torch.zeros(len(rows), 7, dtype=torch.long)], dim=1)  # (B, T + 7)
        padded = stack.finish(states, mask).detach()
        torch.testing.assert_close(_finish(stack, pre), padded, atol=ATOL, rtol=0)


def test_minilm_finish_of_prefix_on_real_captions(minilm, stamps):
    texts = _captions(stamps[:6])
    batch = _batch(minilm, texts)
    stack = get_layer_stack(minilm, 3)
    assert type(stack).__name__ == "BertStack" and stack.layer_index == 3
    pooled = _finish(stack, stack.prefix(batch))
    torch.testing.assert_close(pooled, minilm.encode(batch, "pooled").pooled, atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(6))  # L2-normalised as the encoder


def test_efficientnet_finish_of_prefix_on_real_stamps(stamps):
    enc = get_encoder_spec("efficientnet-lite0").factory(CPU, torch.float32)
    batch = _batch(enc, [str(p) for p in stamps[:3]])
    ref = enc.encode(batch, "pooled").pooled  # (3, 1280)
    for n in (3, 1, 16):
        stack = get_layer_stack(enc, n)
        pre = stack.prefix(batch)
        side = stack.geometry.state_grid[0]
        assert pre.states.shape == (3, side * side, stack.geometry.state_dim)
        torch.testing.assert_close(_finish(stack, pre), ref, atol=ATOL, rtol=1e-5)
    assert efficientnet_geometry(3).state_dim == 192 and efficientnet_geometry(3).state_grid == (7, 7)
    assert len(LITE0_BLOCKS) == len(enc.model._blocks)


def test_tunable_weights_load_alone_and_train(tiny_dinov2, tiny_llama):
    from transformers import AutoModel

    for path in (tiny_dinov2, tiny_llama):
        enc = get_encoder_spec(f"hf:{path}").factory(CPU, torch.float32)
        stack = get_layer_stack(enc, 2)
        batch = _batch(enc, TEXTS) if "llama" in path.name else {"pixel_values": torch.randn(2, 3, 224, 224)}
        pre = stack.prefix(batch)
        want = _finish(stack, pre)
        keep = {k: v for k, v in enc.model.state_dict().items()
                if any(k.startswith(p) for p in stack.weight_prefixes())}
        modules = (stack.tunable_modules(), stack.head_modules())
        owned = sum(p.numel() for m in modules for p in m.parameters())
        assert sum(v.numel() for v in keep.values()) == owned  # exactly the tunable layers and the head
        torch.manual_seed(123)  # a differently initialised model that gets only those weights
        enc.model = AutoModel.from_config(enc.model.config).eval()
        enc.model.load_state_dict(keep, strict=False)
        fresh = get_layer_stack(enc, 2)
        torch.testing.assert_close(_finish(fresh, pre), want, atol=ATOL, rtol=0)
        fresh.tunable_modules().requires_grad_(True)  # what LoRA does to its adapters, here to all weights
        fresh.finish(pre.states, pre.mask).square().sum().backward()
        assert all(p.grad is not None for p in fresh.tunable_modules().parameters())
        assert all(p.grad is None for p in fresh.layers[: fresh.layer_index].parameters())


def test_geometry_from_config_and_refusals(tiny_llama):
    g = stack_geometry(get_encoder_spec(f"hf:{tiny_llama}"), 3)
    assert (g.layer_index, g.tunable_layers, g.state_dim, g.state_grid) == (1, 3, 32, None)
    assert stack_geometry(get_encoder_spec("minilm-l6"), 3).layer_index == 3
    with pytest.raises(EncoderError, match=r"must be in \[1, 4\]"):
        stack_geometry(get_encoder_spec(f"hf:{tiny_llama}"), 5)
    with pytest.raises(EncoderError, match="no layer stack"):
        stack_geometry(get_encoder_spec("onehot"), 3)
    with pytest.raises(ValueError, match="tunable_layers"):
        EncodeConfig(kind="prefix", tunable_layers=0)
    assert EncodeConfig(kind="prefix").tunable_layers == 3


# ---------------------------------------------------------------- prefix stores


def _prefix_manifest(n: int, fmt: str, **kw) -> Manifest:
    records = [Record(i, f"s{i}", f"g{i}", "text", f"caption {i}") for i in range(n)]
    base = dict(dataset="toy", split="val", modality="text", membership=membership_fingerprint(records),
                rows=n, encoder="minilm-l6", encoder_revision="r", pooling="masked-mean", layers="last",
                dim=6, kind="prefix", format=fmt, shard_size=4, layer_index=3, tunable_layers=3, state_dim=5)
    base.update(kw)
    return Manifest(**base)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_prefix_store_round_trip(tmp_path, fmt):
    n = 10
    rng = np.random.default_rng(0)
    states = [rng.normal(size=(int(t), 5)).astype(np.float32) for t in rng.integers(1, 9, size=n)]
    pooled = rng.normal(size=(n, 6)).astype(np.float32)  # dim (pooled) differs from state_dim on purpose
    manifest = _prefix_manifest(n, fmt)
    path = tmp_path / "store"
    with StoreWriter(path, manifest) as w:
        for index, lo, hi in w.planned_shards():
            part = states[lo:hi]
            offsets = np.concatenate([[0], np.cumsum([s.shape[0] for s in part])])
            w.write_shard(index, pooled[lo:hi], np.concatenate(part), offsets)
        records = [Record(i, f"s{i}", f"g{i}", "text", f"caption {i}") for i in range(n)]
        w.finalize(rows_from_records(records), [])
    assert verify_store(path).ok
    assert "states entering layer 3 (3 tunable layers), state dim 5" in inspect_view(path)
    store = open_store(path)
    assert (store.manifest.kind, store.manifest.layer_index, store.manifest.state_dim) == ("prefix", 3, 5)
    assert store.token_counts().tolist() == [s.shape[0] for s in states]
    order = [7, 0, 3]
    padded, mask = store.read_prefix(order)
    assert padded.shape == (3, max(states[i].shape[0] for i in order), 5)
    for j, i in enumerate(order):
        t = states[i].shape[0]
        np.testing.assert_array_equal(padded[j, :t], states[i].astype(np.float16).astype(np.float32))
        assert mask[j].tolist() == [True] * t + [False] * (padded.shape[1] - t)
        assert not padded[j, t:].any()
    np.testing.assert_allclose(store.read_all(), pooled, atol=2e-3)
    with pytest.raises(StoreMismatchError, match="kind"):  # a pooled encoding never mixes into it
        StoreWriter(path, _prefix_manifest(n, fmt, kind="pooled", layer_index=None, tunable_layers=None,
                                           state_dim=None)).open()
    with pytest.raises(StoreMismatchError, match="layer_index"):
        StoreWriter(path, _prefix_manifest(n, fmt, layer_index=4, tunable_layers=2)).open()


def test_prefix_manifest_validation(tmp_path):
    with pytest.raises(StoreError, match="layer_index"):
        _prefix_manifest(4, "zarr", layer_index=None)
    with pytest.raises(StoreError, match="prefix fields"):
        _prefix_manifest(4, "zarr", kind="tokens")
    m = _prefix_manifest(4, "zarr", state_grid=(7, 7))
    assert Manifest.from_json(json.loads(m.dumps())).identity() == m.identity()  # tuple vs JSON list
    with pytest.raises(ValueError, match=r"expected \(T, 5\)"), StoreWriter(tmp_path / "s", m) as w:
        w.write_shard(0, np.zeros((4, 6)), np.zeros((4, 6)), np.arange(5))


# ---------------------------------------------------------------- the real CLI


def _m3jepa(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "m3jepa", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_prefix_encode_cli_reproduces_the_pooled_store(tmp_path, tuxpaint_root, minilm):
    from m3jepa.store import store_path
    from m3jepa.store.manifest import prefix_variant

    common = ["encode", "--dataset", "tuxpaint", "--modality", "text", "--limit", "20", "--split", "val",
              "--store-root", str(tmp_path), "--workers", "0", "--threads", "1"]
    done = _m3jepa(*common, "--kind", "prefix", "--tunable-layers", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    done = _m3jepa(*common)  # the plain pooled store of the same rows, next to it in the same root
    assert done.returncode == 0, done.stderr[-2000:]
    prefix_path = store_path(tmp_path, "tuxpaint", "val", "text", "minilm-l6", prefix_variant(3))
    pooled_path = store_path(tmp_path, "tuxpaint", "val", "text", "minilm-l6")
    verified = _m3jepa("stores", "verify", str(prefix_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    prefix, pooled = open_store(prefix_path), open_store(pooled_path)
    m = prefix.manifest
    assert (m.kind, m.layer_index, m.tunable_layers, m.state_dim, m.dim) == ("prefix", 3, 3, 384, 384)
    assert prefix.rows.sample_ids == pooled.rows.sample_ids and len(prefix) > 0
    ids = np.arange(len(prefix))
    states, mask = prefix.read_prefix(ids)  # float16 states, widened
    with torch.no_grad():
        got = get_layer_stack(minilm, 3).finish(torch.from_numpy(states), torch.from_numpy(mask).long())
    want = pooled.read_all()  # (n, 384) float16 features of the full encoder
    np.testing.assert_allclose(got.numpy(), want, atol=5e-4, rtol=0)  # measured 9e-5
    np.testing.assert_allclose(prefix.read_all(), want, atol=1e-3, rtol=0)  # its own pooled column
