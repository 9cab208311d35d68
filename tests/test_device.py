"""Device and precision as configuration: the resolver, batches moved in one place, the device search,
and every stage run with an explicit CPU device while torch's default device is `meta`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_stores import make_stores, overrides

from m3jepa.config import ConfigError, RuntimeConfig, load_pipeline
from m3jepa.core.device import Runtime, pin, resolve, to_device
from m3jepa.core.paired import load_split, resolve_feed
from m3jepa.distributed import DistInfo
from m3jepa.eval.device_ranks import best_correct_ranks, device_retrieval_metrics
from m3jepa.eval.evaluate import evaluate_run
from m3jepa.eval.retrieval import retrieval_metrics
from m3jepa.train.loop import train

ONE = DistInfo()
RANK1 = DistInfo(rank=1, world_size=2, local_rank=1)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return make_stores(tmp_path_factory.mktemp("stores"), n_train=96, n_val=24, n_test=24)


# ---------------------------------------------------------------- the resolver


@pytest.mark.parametrize(
    ("device", "info", "available", "count", "want", "backend"),
    [
        ("auto", ONE, False, 0, "cpu", "gloo"),
        ("auto", ONE, True, 2, "cuda:0", "nccl"),
        ("auto", RANK1, True, 2, "cuda:1", "nccl"),  # each torchrun rank on its own GPU
        ("auto", RANK1, False, 0, "cpu", "gloo"),
        ("cpu", ONE, True, 2, "cpu", "gloo"),  # an explicit cpu wins over a visible GPU
        ("cpu", RANK1, True, 2, "cpu", "gloo"),
        ("cuda", ONE, True, 1, "cuda:0", "nccl"),
        ("cuda", RANK1, True, 2, "cuda:1", "nccl"),
        ("cuda:1", ONE, True, 2, "cuda:1", "nccl"),
    ],
)
def test_resolver_picks_device_and_backend_together(device, info, available, count, want, backend):
    rt = resolve(RuntimeConfig(device=device), info, cuda_available=available, cuda_count=count)
    assert (str(rt.device), rt.backend) == (want, backend)


@pytest.mark.parametrize(
    ("device", "info", "available", "count", "message"),
    [
        ("cuda", ONE, False, 0, 'set runtime.device = "cpu" or "auto"'),
        ("cuda:0", ONE, False, 0, 'set runtime.device = "cpu" or "auto"'),
        ("cuda:3", ONE, True, 2, "only 2 CUDA device(s) are visible"),
        ("cuda", RANK1, True, 1, "only 1 CUDA device(s) are visible"),  # 2 ranks, 1 GPU
        ("cuda:0", RANK1, True, 2, "pins every torchrun rank to one GPU"),
    ],
)
def test_resolver_refuses_what_cannot_run(device, info, available, count, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(RuntimeConfig(device=device), info, cuda_available=available, cuda_count=count)


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_device_config_is_checked(bad):
    with pytest.raises(ConfigError, match="runtime.device"):
        RuntimeConfig(device=bad)
    with pytest.raises(ConfigError, match="runtime.precision"):
        RuntimeConfig(precision="fp16")


# ---------------------------------------------------------------- the device table


def test_the_config_accepts_exactly_the_tables_devices():
    from m3jepa.device_table import DEVICE_TABLE, names

    for kind in DEVICE_TABLE.values():  # each row's type, and type:N where ranks own a device each
        RuntimeConfig(device=kind.type)
        if kind.per_rank:
            RuntimeConfig(device=f"{kind.type}:0")
        else:
            with pytest.raises(ConfigError):
                RuntimeConfig(device=f"{kind.type}:0")
    with pytest.raises(ConfigError) as e:
        RuntimeConfig(device="gpu")
    assert str(e.value).endswith("is not one of " + ", ".join(names()))  # a new row needs config's name


def test_the_optimizer_fuses_where_the_table_says():
    from m3jepa.device_table import DEVICE_TABLE
    from m3jepa.train.optim import FUSED_DEVICE_TYPES

    assert set(FUSED_DEVICE_TYPES) == {t for t, k in DEVICE_TABLE.items() if k.fused_optimizer}


def test_the_meta_device_has_no_row():
    from m3jepa.device_table import kind_of

    with pytest.raises(ValueError, match="not in m3jepa's device table"):
        kind_of(torch.device("meta"))
    assert kind_of("cuda:1").type == "cuda" and kind_of(torch.device("cpu")).backend == "gloo"


def test_a_changed_row_is_what_every_consumer_sees(monkeypatch, stores):
    """One row decides the resolver, stage 1's encoder device, process_group's backend, the compression,
    the RNG state and the memory probe: change the (faked) cuda row and each of them follows."""
    import dataclasses

    import torch.distributed as dist

    from m3jepa import distributed
    from m3jepa.core.collectives import resolve_compression
    from m3jepa.core.device import fake_cuda
    from m3jepa.core.memory import device_bytes
    from m3jepa.device_table import DEVICE_TABLE
    from m3jepa.encoders import resolve_device

    row = dataclasses.replace(fake_cuda(True, 2), backend="fake-backend", encoder_dtype=torch.float16,
                              grad_compression="none", set_current=lambda d: None,
                              free_memory=lambda d: 10**15, total_memory=lambda d: 2 * 10**15)
    monkeypatch.setitem(DEVICE_TABLE, "cuda", row)
    rt = resolve(RuntimeConfig(device="auto"), RANK1, table=dict(DEVICE_TABLE))  # table=: a faked host
    assert (str(rt.device), rt.backend, rt.matmul_precision) == ("cuda:1", "fake-backend", "high")
    monkeypatch.setitem(DEVICE_TABLE, "cuda", dataclasses.replace(row, tf32=False))
    no_tf32 = resolve(RuntimeConfig(device="auto"), RANK1, table=dict(DEVICE_TABLE))
    assert no_tf32.matmul_precision == "highest"
    monkeypatch.setitem(DEVICE_TABLE, "cuda", row)
    assert resolve_compression("auto", rt) == "none" and resolve_compression("bf16", rt) == "bf16"
    assert resolve_device("auto") == (torch.device("cuda"), torch.float16)
    cfg = load_pipeline(None, overrides(stores, stores / "unused"))
    assert resolve_feed(cfg, "train", ["image->text"], "auto", torch.device("cuda", 1)) == "device"
    assert device_bytes(torch.device("cuda", 1)) == 2 * 10**15  # the model-size check's probe
    monkeypatch.setitem(DEVICE_TABLE, "cuda", dataclasses.replace(row, free_memory=lambda d: 0))
    assert resolve_feed(cfg, "train", ["image->text"], "auto", torch.device("cuda", 1)) == "memory"

    backends = []  # process_group under a torchrun environment, for stage 1's "auto" and a resolved device
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: backends.append(backend))
    for device in ("auto", "cpu", rt.device):
        with distributed.process_group(device):
            pass
    assert backends == ["fake-backend", "gloo", "fake-backend"]


def test_checkpoints_keep_the_generator_the_table_names(monkeypatch):
    import dataclasses

    from m3jepa.core import checkpoint
    from m3jepa.device_table import DEVICE_TABLE

    model = torch.nn.Linear(2, 2)
    assert set(checkpoint.rng_state(model)) == {"rng"}  # the CPU row has no generator of its own
    restored = []
    row = dataclasses.replace(DEVICE_TABLE["cpu"], get_rng_state=lambda d: torch.tensor([7, 8]),
                              set_rng_state=lambda state, d: restored.append(state.tolist()))
    monkeypatch.setitem(DEVICE_TABLE, "cpu", row)
    saved = checkpoint.rng_state(model)
    assert set(saved) == {"rng", "cpu_rng"}
    checkpoint.restore_rng(saved, torch.device("cpu"))
    assert restored == [[7, 8]]


def test_autocast_follows_the_device_type_and_precision():
    cpu_bf16 = Runtime(torch.device("cpu"), "bf16")
    with cpu_bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with Runtime(torch.device("cpu"), "fp32").autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert cpu_bf16.cpu_fast_path and not Runtime(torch.device("cuda", 0), "bf16").cpu_fast_path


def test_old_bf16_key_is_an_error_naming_the_new_one():
    with pytest.raises(ConfigError, match='runtime.precision = "bf16"'):
        load_pipeline(None, ["train.bf16=true"])


# ---------------------------------------------------------------- batches and feeds


def test_to_device_and_pin_on_the_cpu_are_identity():
    x = {"a": torch.ones(2, 3), "b": torch.zeros(1)}
    moved = to_device(x, torch.device("cpu"))
    assert moved["a"] is x["a"] and moved["b"] is x["b"]
    meta = torch.empty(2, device="meta")
    assert pin(meta) is meta  # only host tensors are pinned


def test_feed_device_needs_a_gpu_and_auto_picks_it_when_the_split_fits(stores, tmp_path):
    cfg = load_pipeline(None, overrides(stores, tmp_path / "r"))
    dirs = cfg.train.directions
    with pytest.raises(ConfigError, match='runtime.device = "cuda"'):
        resolve_feed(cfg, "train", dirs, "device", torch.device("cpu"))
    stored = 96 * 48 * 4 + 192 * 32 * 4  # float32 image and text rows of the train split
    gpu = torch.device("cuda", 0)
    assert resolve_feed(cfg, "train", dirs, "auto", gpu, free_device_bytes=2 * stored + 8) == "device"
    assert resolve_feed(cfg, "train", dirs, "auto", gpu, free_device_bytes=2 * stored - 8) == "memory"
    assert resolve_feed(cfg, "train", dirs, "auto", torch.device("cpu")) == "memory"


def test_batches_come_back_on_the_split_device(stores, tmp_path):
    cfg = load_pipeline(None, overrides(stores, tmp_path / "r"))
    for feed in ("memory", "store"):
        data = load_split(cfg, "train", cfg.train.directions, feed=feed, device=torch.device("cpu"))
        x, y = data.batch("image->text", 32, 0, 3)
        assert x.device.type == y.device.type == "cpu" and x.dtype == y.dtype == torch.float32
        assert x.shape == (32, 48) and y.shape == (32, 32)
        data.close()


# ---------------------------------------------------------------- exact recall on a device


def _reference_ranks(q: np.ndarray, g: np.ndarray, qc: np.ndarray, gc: np.ndarray) -> np.ndarray:
    """Float64 ranks by a full stable sort (ties to the lower gallery index), independent of the code."""
    s = q.astype(np.float64) @ g.astype(np.float64).T  # (Q, G)
    out = []
    for i in range(len(q)):
        order = np.lexsort((np.arange(len(g)), -s[i]))  # score descending, then index ascending
        out.append(int(np.flatnonzero(gc[order] == qc[i])[0]))
    return np.array(out)


def test_device_ranks_equal_a_float64_sort_with_ties():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((300, 16)).astype(np.float32)
    g[10] = g[200]  # exact duplicates: equal scores, the lower index wins
    g[50] = g[7]
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = (g[rng.integers(0, 300, 120)] + 0.3 * rng.standard_normal((120, 16))).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gc = rng.integers(0, 60, 300)  # several correct items per query
    qc = gc[rng.integers(0, 300, 120)]
    want = _reference_ranks(q, g, qc, gc)
    for block in (8 * 300, 8 * 300 * 7, 2**28):  # one query per block, uneven blocks, one block
        got = best_correct_ranks(
            torch.from_numpy(q), torch.from_numpy(g), torch.from_numpy(qc), torch.from_numpy(gc), block
        )
        np.testing.assert_array_equal(got.numpy(), want)


def test_device_recalls_equal_the_cpu_engine_on_the_multi_caption_protocol():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((200, 32)).astype(np.float32)
    captions = np.repeat(images, 5, axis=0) + 2.5 * rng.standard_normal((1000, 32)).astype(np.float32)
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    images, captions = norm(images), norm(captions)
    img_g, cap_g = np.arange(200), np.repeat(np.arange(200), 5)
    for q, g, qg, gg in ((captions, images, cap_g, img_g), (images, captions, img_g, cap_g)):
        cpu = retrieval_metrics(q, g, qg, gg, normalize=False)
        dev = device_retrieval_metrics(torch.from_numpy(q), torch.from_numpy(g), qg, gg)
        assert dev.recalls == cpu.recalls and dev.n_queries == cpu.n_queries
        assert 0 < dev.recalls["R@1"] < 100  # not a degenerate set


# ---------------------------------------------------------------- no tensor without a device


@pytest.fixture
def meta_default():
    """torch's default device is `meta` while the test runs: a tensor made without a device is meta,
    and the first real computation on it fails, so each stage must name its device."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_and_evaluate_name_their_device(stores, tmp_path, meta_default, precision):
    run = tmp_path / "run"
    sets = {"runtime.device": "cpu", "runtime.precision": precision, "train.max_steps": 4,
            "train.eval_every": 2, "train.checkpoint_every": 2}
    result = train(load_pipeline(None, overrides(stores, run, **sets)))
    assert result.steps == 4
    metrics = evaluate_run(run, device="cpu").to_json()
    assert 0 <= metrics["directions"]["image->text"]["R@1"] <= 100


# ---------------------------------------------------------------- DDP's gather with gradients


@pytest.mark.slow
def test_both_all_gathers_give_exact_gradients_alone(tmp_path):
    """Alone (no DDP) torch's public autograd all-gather and m3jepa's give the one-process gradients on
    gloo; inside DDP training only m3jepa's does (m3jepa/core/collectives.py says what was measured)."""
    import json
    from pathlib import Path

    from launch import torchrun

    script = Path(__file__).with_name("gather_check.py")
    res = torchrun(str(script), str(tmp_path), timeout=120)  # a free port (tests/launch.py)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(rows) == 2
    for row in rows:
        assert row["public"] < 1e-12 and row["own"] < 1e-12, row


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "gpu"], "runtime.device='gpu' is not one of auto, cpu, cuda, cuda:N"),
        (["--precision", "fp16"], "runtime.precision='fp16' is not one of fp32, bf16"),
        (["--device", "cuda"], 'set runtime.device = "cpu" or "auto"'),  # no GPU on this machine
    ],
)
def test_cli_device_flags_are_checked(stores, tmp_path, args, message):
    import os
    import subprocess
    import sys

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    cmd = [sys.executable, "-m", "m3jepa", "train-predictor", *args]
    for s in overrides(stores, tmp_path / "run", **{"train.max_steps": 2}):
        cmd += ["--set", s]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_lora_step_names_its_device(meta_default):
    """A LoRA tail (the real MiniLM, last 3 layers) built, run and trained with an explicit CPU device."""
    from m3jepa.config import LoraConfig
    from m3jepa.encoders import get_encoder_spec
    from m3jepa.lora.tunable import build_tunable

    cpu = torch.device("cpu")
    tail = build_tunable(get_encoder_spec("minilm-l6"), "text", LoraConfig(), 3, device=cpu)
    assert {p.device.type for p in tail.parameters() if p.requires_grad} == {"cpu"}
    gen = torch.Generator(device="cpu").manual_seed(0)
    states = torch.randn(3, 7, 384, generator=gen, device=cpu)  # (B, T, D_state) prefix states
    mask = torch.ones(3, 7, dtype=torch.bool, device=cpu)
    mask[1, 5:] = False  # a padded row
    tail.train(True)
    with Runtime(cpu, "bf16").autocast():
        out = tail(states, mask)  # (B, 384)
    assert out.shape == (3, 384) and out.device == cpu and torch.isfinite(out).all()
    out.float().sum().backward()
    grads = [p.grad for n, p in tail.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.device == cpu and g.abs().sum() > 0 for g in grads)


def test_fp32_evaluation_never_asks_for_the_int8_stage(monkeypatch):
    """oneDNN's private int8 op is the CPU fast path's: the default (fp32) search never checks for it."""
    from m3jepa.accel.search import int8

    asked = []
    monkeypatch.setattr(int8, "available", lambda *a, **k: asked.append(1) or False)
    rng = np.random.default_rng(3)
    images = rng.standard_normal((1100, 16)).astype(np.float32)
    captions = np.repeat(images, 4, axis=0) + rng.standard_normal((4400, 16)).astype(np.float32)
    groups_i, groups_c = np.arange(1100), np.repeat(np.arange(1100), 4)  # 4.84M scores: the rank engine
    plain = retrieval_metrics(captions, images, groups_c, groups_i)
    assert plain.backend == "bf16-rank" and not asked
    fast = retrieval_metrics(captions, images, groups_c, groups_i, fast_path=True)
    assert asked and fast.recalls == plain.recalls
