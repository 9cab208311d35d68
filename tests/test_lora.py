"""LoRA tails: only the tail is loaded, exactly the adapters train, and the cached-prefix path equals the
full encoder with the same adapters loaded by peft, before and after training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from m3jepa.config import ConfigError, LoraConfig, load_pipeline
from m3jepa.data.records import Record, membership_fingerprint
from m3jepa.encoders import EncoderError, get_encoder_spec
from m3jepa.encoders.layers import get_layer_stack
from m3jepa.lora.tunable import build_tunable, load_tail, resolve_targets
from m3jepa.store import Manifest, StoreWriter, open_store
from m3jepa.store.manifest import rows_from_records

CPU = torch.device("cpu")
ATOL = 1e-5
TEXTS = ["a cat", "a brown dog sitting on a big red chair in the afternoon sun", "hello there", "x"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _batch(enc, payloads):
    pre = enc.preprocessor
    return pre.collate([pre(p) for p in payloads])


def _train_a_little(tail, states, mask, steps: int = 3) -> None:
    """Move the adapters off their zero init, as training does (lora_B starts at 0)."""
    opt = torch.optim.SGD([p for p in tail.parameters() if p.requires_grad], lr=0.5)
    with torch.no_grad():
        direction = torch.randn(tail(states, mask).shape, generator=torch.Generator().manual_seed(0))
    tail.train(True)
    for _ in range(steps):
        opt.zero_grad()
        (tail(states, mask) * direction).sum().backward()  # not a norm: MiniLM's latents are unit length
        opt.step()
    tail.train(False)


def _full_with_adapters(spec, adapter_dir: Path):
    """The independent reference: the whole encoder loaded by transformers, adapters loaded by peft."""
    from peft import PeftModel

    enc = spec.factory(CPU, torch.float32)
    PeftModel.from_pretrained(enc.model, str(adapter_dir))  # injects into enc.model in place
    return enc


# ---------------------------------------------------------------- what is loaded, what trains


def test_minilm_tail_loads_only_its_last_layers_and_pins_the_trainable_set():
    spec = get_encoder_spec("minilm-l6")
    tail = build_tunable(spec, "text", LoraConfig(), 3)
    model = tail.stack.model
    real = {n for n, p in model.named_parameters() if p.device.type != "meta"}
    tail_layers = ("encoder.layer.3.", "encoder.layer.4.", "encoder.layer.5.")
    assert real and all(n.startswith(tail_layers) for n in real)
    assert all(p.device.type == "meta" for p in model.embeddings.parameters())  # never read
    # exactly: r=4 adapters on query and value of layers 3, 4 and 5, nothing else
    want = {
        f"peft.base_model.model.encoder.layer.{i}.attention.self.{m}.lora_{ab}.default.weight"
        for i in (3, 4, 5) for m in ("query", "value") for ab in "AB"
    }
    assert set(tail.trainable_names()) == want
    shapes = {n: tuple(p.shape) for n, p in tail.named_parameters() if p.requires_grad}
    assert all(s == ((4, 384) if ".lora_A." in n else (384, 4)) for n, s in shapes.items())
    assert sum(p.numel() for p in tail.parameters() if p.requires_grad) == 12 * 4 * 384


def test_efficientnet_tail_matches_the_full_model_but_has_no_lora_target(real_pngs):
    spec = get_encoder_spec("efficientnet-lite0")
    tail_stack = load_tail(spec, 3)
    full = spec.factory(CPU, torch.float32)
    pre = get_layer_stack(full, 3).prefix(_batch(full, real_pngs[:2]))
    with torch.no_grad():
        want = get_layer_stack(full, 3).finish(pre.states, pre.mask)
        torch.testing.assert_close(tail_stack.finish(pre.states, pre.mask), want, atol=ATOL, rtol=0)
    assert resolve_targets("efficientnet", ["q", "v", "pw"]) == []
    with pytest.raises(EncoderError, match="none peft can wrap"):
        build_tunable(spec, "image", LoraConfig(), 3)


def test_targets_resolve_per_family_and_pass_module_names_through():
    assert resolve_targets("llama", ["q", "v"]) == ["q_proj", "v_proj"]
    assert resolve_targets("bert", ["q", "k", "o"]) == ["query", "key", "attention.output.dense"]
    assert resolve_targets("bert", ["intermediate.dense"]) == ["intermediate.dense"]


def test_lora_config_is_validated():
    with pytest.raises(ConfigError, match="encode.kind=\"prefix\""):
        load_pipeline(None, ["lora.enabled=true"])
    with pytest.raises(ConfigError, match="tunable_layers=2"):
        load_pipeline(None, ["lora.enabled=true", "lora.layers=2", 'encode.kind="prefix"'])
    with pytest.raises(ConfigError, match="lora.r"):
        load_pipeline(None, ["lora.r=0"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_pipeline(None, ["lora.rank=4"])
    cfg = load_pipeline(None, ["lora.enabled=true", 'encode.kind="prefix"'])
    assert (cfg.lora.layers, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (
        3, 4, 16.0, 0.1, ["q", "v"])
    assert load_pipeline(None, ["lora.enabled=true", 'lora.layers="all"']).lora.layers == "all"
    with pytest.raises(ConfigError, match="set train.mixup = 0 for a LoRA run"):
        load_pipeline(None, ["lora.enabled=true", 'encode.kind="prefix"', "train.mixup=0.5"])


# ---------------------------------------------------------------- the prefix path equals the full encoder


def _check_against_full(spec, enc, batch, n: int, tmp_path: Path) -> None:
    stack = get_layer_stack(enc, n)
    pre = stack.prefix(batch)
    tail = build_tunable(spec, spec.modality, LoraConfig(r=4, alpha=16, dropout=0.1), n)
    with torch.no_grad():  # before training: zero-initialised adapters change nothing
        torch.testing.assert_close(tail(pre.states, pre.mask), enc.encode(batch, "pooled").pooled,
                                   atol=ATOL, rtol=0)
    _train_a_little(tail, pre.states, pre.mask)
    tail.save_adapters(tmp_path / "adapters")
    with torch.no_grad():
        trained = tail(pre.states, pre.mask)
        base = enc.encode(batch, "pooled").pooled
    assert (trained - base).abs().max() > 1e-3  # the adapters did move the latents
    full = _full_with_adapters(spec, tmp_path / "adapters")
    with torch.no_grad():
        torch.testing.assert_close(trained, full.encode(batch, "pooled").pooled, atol=ATOL, rtol=0)
    # and reloading the saved adapters into a fresh tail gives the same latents
    again = build_tunable(spec, spec.modality, LoraConfig(), n)
    again.load_adapters(tmp_path / "adapters")
    with torch.no_grad():
        torch.testing.assert_close(again(pre.states, pre.mask), trained, atol=0, rtol=0)


@pytest.mark.parametrize("n", [1, 3])
def test_tiny_llama_prefix_path_equals_full_model_with_adapters(tiny_llama, n, tmp_path):
    spec = get_encoder_spec(f"hf:{tiny_llama}")
    enc = spec.factory(CPU, torch.float32)
    _check_against_full(spec, enc, _batch(enc, TEXTS), n, tmp_path)


def test_tiny_dinov2_prefix_path_equals_full_model_with_adapters(tiny_dinov2, real_pngs, tmp_path):
    spec = get_encoder_spec(f"hf:{tiny_dinov2}")
    enc = spec.factory(CPU, torch.float32)
    _check_against_full(spec, enc, _batch(enc, real_pngs[:3]), 2, tmp_path)


def test_minilm_prefix_path_equals_full_model_with_adapters(tmp_path):
    spec = get_encoder_spec("minilm-l6")
    enc = spec.factory(CPU, torch.float32)
    _check_against_full(spec, enc, _batch(enc, TEXTS), 3, tmp_path)


def test_merged_weights_reproduce_the_adapted_tail(tmp_path):
    spec = get_encoder_spec("minilm-l6")
    enc = spec.factory(CPU, torch.float32)
    pre = get_layer_stack(enc, 3).prefix(_batch(enc, TEXTS))
    tail = build_tunable(spec, "text", LoraConfig(), 3)
    _train_a_little(tail, pre.states, pre.mask)
    with torch.no_grad():
        want = tail(pre.states, pre.mask)
    merged = tail.merged_state()
    prefixes = tuple(tail.stack.weight_prefixes())
    assert set(merged) == {k for k in enc.model.state_dict() if k.startswith(prefixes)}
    enc.model.load_state_dict(merged, strict=False)  # a plain model (no peft) with the merged tail
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(_batch(enc, TEXTS), "pooled").pooled, want, atol=ATOL, rtol=0)
        torch.testing.assert_close(tail(pre.states, pre.mask), want, atol=0, rtol=0)  # unmerged again


def test_length_grouping_and_the_cached_source_change_no_latent(tmp_path):
    spec = get_encoder_spec("minilm-l6")
    enc = spec.factory(CPU, torch.float32)
    texts = [" ".join(["word"] * (1 + (7 * i) % 40)) for i in range(40)]  # 3 to 42 tokens
    pre = get_layer_stack(enc, 3).prefix(_batch(enc, texts))
    tail = build_tunable(spec, "text", LoraConfig(), 3)
    with torch.no_grad():
        grouped = tail(pre.states, pre.mask.bool())  # lengths vary 14x: grouped by length
        whole = tail.stack.finish(pre.states, pre.mask)  # one padded pass
    torch.testing.assert_close(grouped, whole, atol=ATOL, rtol=0)
    # the in-memory prefix source pads exactly as the store's own read_prefix
    from m3jepa.lora.objective import StorePrefixSource

    path = _prefix_store(tmp_path / "s", [r.half().numpy() for r in pre.rows()])
    ids = np.array([5, 0, 39, 17])
    cached = StorePrefixSource(path)
    assert cached.rows is not None
    states, mask = open_store(path).read_prefix(ids)
    got = cached(ids)
    assert torch.equal(got.states, torch.from_numpy(states)) and torch.equal(got.mask, torch.from_numpy(mask))


def _prefix_store(path: Path, states: list[np.ndarray]) -> Path:
    records = [Record(i, f"s{i}", f"g{i}", "text", f"caption {i}") for i in range(len(states))]
    manifest = Manifest(dataset="toy", split="val", modality="text",
                        membership=membership_fingerprint(records), rows=len(states), encoder="minilm-l6",
                        encoder_revision="r", pooling="masked-mean",
                        layers="last", dim=4, kind="prefix", format="zarr", shard_size=16, layer_index=3,
                        tunable_layers=3, state_dim=states[0].shape[1])
    with StoreWriter(path, manifest) as w:
        for index, lo, hi in w.planned_shards():
            part = states[lo:hi]
            offsets = np.concatenate([[0], np.cumsum([x.shape[0] for x in part])])
            w.write_shard(index, np.zeros((hi - lo, 4), np.float32), np.concatenate(part), offsets)
        w.finalize(rows_from_records(records), [])
    return path
