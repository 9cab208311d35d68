"""Training recipes (issue 14, parts 2 and 3): standardised prediction targets, latent mixup, CLIP's
learnable temperature, a carved validation split and a run sized by its data, each against a reference."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic_stores import DATASET, DIMS, make_split, make_stores, overrides, write_store

from m3jepa.config import ConfigError, LossConfig, ModelConfig, TrainConfig, load_pipeline
from m3jepa.core.checkpoint import load_checkpoint
from m3jepa.core.objective import Objective, to_pred_space
from m3jepa.core.paired import carve_validation, load_split
from m3jepa.eval.embed import embed_direction
from m3jepa.eval.evaluate import evaluate_run
from m3jepa.model.losses import ContrastiveTemperature
from m3jepa.model.mixup import mix_plan, mixup_pair
from m3jepa.train.loop import train
from m3jepa.train.optim import build_optimizer
from m3jepa.train.recipes import MIN_BUDGET, SIZED_KEYS, auto_size, sized_values, target_statistics
from m3jepa.train.schedule import lr_at


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    return make_stores(tmp_path_factory.mktemp("stores"))


def _cfg(stores: Path, run: Path, **extra):
    return load_pipeline(None, overrides(stores, run, **extra))


# ---------------------------------------------------------------- standardised targets


def test_target_statistics_match_numpy(stores, tmp_path) -> None:
    data = load_split(_cfg(stores, tmp_path / "r"), "train", ["image->text"])
    rows = np.unique(data.pairs["image->text"][1])
    mean, std = target_statistics(data, "text", rows)
    feats = data.modalities["text"].features.double().numpy()[rows]
    np.testing.assert_allclose(mean.numpy(), feats.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(std.numpy(), feats.std(axis=0), rtol=1e-8)  # ddof 0


def test_standardized_loss_is_mse_on_standardised_targets() -> None:
    torch.manual_seed(0)
    model = ModelConfig(dim=16, hidden=16, num_experts=4, top_k=2, cl_dim=8, dropout=0.0)
    obj = Objective(model, LossConfig(pred_target="standardized"), {"image": 12, "text": 10}).eval()
    mean, std = torch.randn(10), torch.rand(10) + 0.5
    obj.predictor.target_space.fit("text", mean, std)
    x, y = torch.randn(5, 12), torch.randn(5, 10) * 3
    parts = obj("image->text", x, y)
    pred = obj.predictor("image", x, "text").pred
    torch.testing.assert_close(parts.pred, F.mse_loss(pred, (y - mean) / std))
    raw = Objective(model, LossConfig(), {"image": 12, "text": 10})
    assert raw.predictor.target_space is None and not any("target_space" in k for k in raw.state_dict())


def test_standardized_run_keeps_statistics_and_scores_in_that_space(stores, tmp_path) -> None:
    run = tmp_path / "run"
    train(_cfg(stores, run, **{"loss.pred_target": "standardized"}))
    ck = load_checkpoint(run / "checkpoints" / "best")
    data = load_split(ck.cfg, "train", ["image->text"])
    feats = data.modalities["text"].features.double().numpy()[np.unique(data.pairs["image->text"][1])]
    mean, std = ck.weights["predictor.target_space.mean_text"], ck.weights["predictor.target_space.std_text"]
    np.testing.assert_allclose(mean.numpy(), feats.mean(0), atol=1e-6)
    np.testing.assert_allclose(std.numpy(), feats.std(0), rtol=1e-5)
    metrics = evaluate_run(run).to_json()
    assert metrics["r2"]["image->text"] > 0.0
    # evaluate's pred gallery is the standardised target, L2-normalised
    with torch.device("cpu"):
        obj = Objective(ck.cfg.model, ck.cfg.loss, ck.state.dims)
    obj.load_state_dict(ck.weights)
    test = load_split(ck.cfg, "test", ["image->text"])
    emb = embed_direction(obj.predictor.eval(), test, "image->text", "pred")
    y = test.rows("text", emb.gallery_rows)
    torch.testing.assert_close(emb.gallery_t, F.normalize((y - mean) / std, dim=-1))
    torch.testing.assert_close(to_pred_space(obj.predictor, "text", y), (y - mean) / std)
    import m3jepa  # m3jepa.load scores its pred space with the run's statistics too

    model = m3jepa.load(run, device="cpu")
    got = model.embed_target(modality="text", latents=y, space="pred")
    np.testing.assert_allclose(got, F.normalize((y - mean) / std, dim=-1).numpy(), rtol=1e-5, atol=1e-6)


def test_pred_target_is_validated() -> None:
    with pytest.raises(ConfigError, match="pred_target"):
        LossConfig(pred_target="zscore")


# ---------------------------------------------------------------- mixup


def test_mixup_matches_a_by_hand_mix() -> None:
    plan = mix_plan(6, prob=1.0, alpha=1.0, seed=3, step=7, direction=1)
    assert plan.mixed and sorted(plan.partner.tolist()) == list(range(6))
    assert np.all((plan.lam >= 0) & (plan.lam <= 1))
    x = {"image": torch.randn(6, 4, dtype=torch.float64), "question": torch.randn(6, 3, dtype=torch.float64)}
    y = torch.randn(6, 5, dtype=torch.float64)
    mx, my = mixup_pair(x, y, plan)
    for got, ref in ((mx["image"], x["image"]), (mx["question"], x["question"]), (my, y)):
        r = ref.numpy()
        want = np.stack([plan.lam[i] * r[i] + (1 - plan.lam[i]) * r[plan.partner[i]] for i in range(6)])
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    # seeded: the same draws for the same (seed, step, direction, rank), others for another step
    again = mix_plan(6, 1.0, 1.0, 3, 7, 1)
    assert np.array_equal(again.partner, plan.partner) and np.array_equal(again.lam, plan.lam)
    assert not np.array_equal(mix_plan(6, 1.0, 1.0, 3, 8, 1).lam, plan.lam)


def test_mixup_probability_and_beta_shape() -> None:
    assert not mix_plan(8, 0.0, 1.0, 0, 0, 0).mixed
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    plan = mix_plan(8, 0.0, 1.0, 0, 0, 0)
    assert mixup_pair(x, y, plan) == (x, y)
    share = np.mean([mix_plan(4, 0.3, 1.0, 0, s, 0).mixed for s in range(2000)])
    assert share == pytest.approx(0.3, abs=0.04)
    lam = np.concatenate([mix_plan(64, 1.0, 0.2, 0, s, 0).lam for s in range(200)])
    assert lam.mean() == pytest.approx(0.5, abs=0.03) and np.mean((lam < 0.1) | (lam > 0.9)) > 0.5  # U-shaped


def test_mixup_trains_and_is_validated(stores, tmp_path) -> None:
    result = train(_cfg(stores, tmp_path / "run", **{"train.mixup": 1.0, "train.mixup_alpha": 0.4}))
    assert result.steps == 60 and result.best_metric > 20.0
    with pytest.raises(ConfigError, match="train.mixup"):
        TrainConfig(mixup=1.5)
    with pytest.raises(ConfigError, match="mixup_alpha"):
        TrainConfig(mixup_alpha=0.0)


# ---------------------------------------------------------------- CLIP's learnable temperature


def test_learnable_temperature_is_clips() -> None:
    """CLIP: logit scale log(1/0.07) at the start, clamped at 100 (τ ≥ 0.01), no weight decay."""
    tau = ContrastiveTemperature(0.07, learnable=True)
    assert float(-tau.log_tau.detach()) == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        tau.log_tau.fill_(math.log(1e-4))
    assert float(1 / tau().detach()) == pytest.approx(100.0)
    cfg = load_pipeline(None, ["loss.learn_temperature=true", "loss.temperature=0.07"])
    obj = Objective(cfg.model, cfg.loss, {"image": 8, "text": 6})
    from m3jepa.core.device import resolve

    opt = build_optimizer(obj, cfg, resolve(cfg.runtime))
    group = next(g for g in opt.param_groups if any(p is obj.loss.temperature.log_tau for p in g["params"]))
    assert group["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match="temperature"):
        LossConfig(temperature=0.001)


# ---------------------------------------------------------------- carved validation split


def _no_val_stores(root: Path) -> Path:
    make_split(root, "train", 200)
    make_split(root, "test", 20)
    for m in ("image", "text"):
        write_store(root, "val", m, [], np.zeros((0, DIMS[m]), np.float32))  # the dataset has no val rows
    return root


def test_carved_validation_is_group_aware_and_seeded(tmp_path) -> None:
    root = _no_val_stores(tmp_path / "stores")
    cfg = _cfg(root, tmp_path / "r")
    data = load_split(cfg, "train", cfg.train.directions)
    kept, val, summary = carve_validation(data, 0.1, seed=0)
    assert summary["groups"] == 20 and summary["of_groups"] == 200
    groups = data.modalities["image"].group_ids
    text_groups = data.modalities["text"].group_ids
    for d, src, tgt in (("image->text", groups, text_groups), ("text->image", text_groups, groups)):
        v_s, v_t = val.pairs[d]
        k_s, _ = kept.pairs[d]
        assert set(src[v_s]).isdisjoint(set(src[k_s]))  # no group on both sides
        assert list(src[v_s]) == list(tgt[v_t])  # pairs keep their partner
        assert len(v_s) + len(k_s) == data.num_pairs(d)
    assert len(set(groups[val.pairs["image->text"][0]])) == 20
    assert set(groups[val.pairs["image->text"][0]]) == set(text_groups[val.pairs["text->image"][0]])
    again = carve_validation(load_split(cfg, "train", cfg.train.directions), 0.1, seed=0)[1]
    assert np.array_equal(again.pairs["image->text"][0], val.pairs["image->text"][0])  # seed-stable
    other = carve_validation(load_split(cfg, "train", cfg.train.directions), 0.1, seed=1)[1]
    assert not np.array_equal(other.pairs["image->text"][0], val.pairs["image->text"][0])


def test_training_without_a_val_split_carves_one(tmp_path, caplog) -> None:
    root = _no_val_stores(tmp_path / "stores")
    with caplog.at_level(logging.WARNING):
        result = train(_cfg(root, tmp_path / "run"))
    assert result.steps == 60 and "validating on 20 of the 200 groups" in caplog.text
    store_fed = train(_cfg(root, tmp_path / "store", **{"train.feed": "store"}))  # validation in memory
    assert store_fed.best_metric == result.best_metric  # the same groups carved, the same batches
    with pytest.raises(Exception, match="split 'val' has no image rows"):
        train(_cfg(root, tmp_path / "refused", **{"train.carve_val": 0.0}))


# ---------------------------------------------------------------- a run sized by its data


def test_sized_values_follow_the_documented_rule() -> None:
    tiny = sized_values({"image->text": 200, "text->image": 200}, epochs=20, batch_size=128)
    assert tiny == {"model.dim": 256, "model.hidden": 512, "model.cl_dim": 128, "train.batch_size": 128,
                    "train.max_steps": MIN_BUDGET}
    assert sized_values({"a->b": 100}, 20, 128)["train.batch_size"] == 64  # halved to fit 100 pairs
    mid = sized_values({"a->b": 50_000}, 20, 128)
    assert (mid["model.dim"], mid["train.max_steps"]) == (512, math.ceil(20 * 50_000 / 128))
    assert sized_values({"a->b": 566_000}, 20, 128)["model.dim"] == 2048  # the paper's COCO preset


def test_auto_size_keeps_given_keys(stores, tmp_path, caplog) -> None:
    cfg = _cfg(stores, tmp_path / "run")
    data = load_split(cfg, "train", cfg.train.directions)
    with caplog.at_level(logging.WARNING):
        sized = auto_size(cfg, data, SIZED_KEYS - {"model.dim"})
    assert sized.model.dim == cfg.model.dim == 64  # given: kept
    # 512 pairs, the given batch of 32: max(MIN_BUDGET, 20 epochs · 512 / 32 = 320) = 3000
    assert (sized.model.hidden, sized.model.cl_dim, sized.train.max_steps) == (512, 128, MIN_BUDGET)
    assert "model.hidden=512" in caplog.text and "model.dim" not in caplog.text.split("train pairs")[1]


def test_a_sized_batch_starts_at_the_device_rows_batch(stores, tmp_path, monkeypatch) -> None:
    """Without a pipeline the batch starts at the device table's train_batch (CPU 128, GPU 4,096), halved
    to fit the pairs; a batch given by --set is kept. The CUDA rows are read, never probed: no GPU needed."""
    import dataclasses

    from m3jepa.device_table import DEVICE_TABLE

    cfg = _cfg(stores, tmp_path / "run")  # 512 pairs a direction, train.batch_size = 32 given
    data = load_split(cfg, "train", cfg.train.directions)
    keys = frozenset({"train.batch_size"})
    sized = {d: auto_size(cfg, data, keys, torch.device(d)) for d in ("cpu", "cuda", "cuda:1")}
    batch = {d: c.train.batch_size for d, c in sized.items()}
    assert batch == {"cpu": 128, "cuda": 512, "cuda:1": 512}  # 4,096 halved to the 512 pairs
    assert auto_size(cfg, data, frozenset(), torch.device("cuda")).train.batch_size == 32  # given: kept
    monkeypatch.setitem(DEVICE_TABLE, "cuda", dataclasses.replace(DEVICE_TABLE["cuda"], train_batch=256))
    assert auto_size(cfg, data, keys, torch.device("cuda")).train.batch_size == 256  # the row decides
    # the loop passes its resolved device: a faked CPU row's batch is what the run saves
    monkeypatch.setitem(DEVICE_TABLE, "cpu", dataclasses.replace(DEVICE_TABLE["cpu"], train_batch=64))
    run = tmp_path / "sized"
    train(_cfg(stores, run, **{"train.max_steps": 2, "train.eval_every": 2}), auto_keys=keys)
    assert "batch_size = 64" in (run / "config.toml").read_text()


def test_train_with_auto_keys_saves_the_sized_config(stores, tmp_path) -> None:
    """The budget is a ceiling: early stopping on validation ends the run (patience 2 here), the learning
    rate's cosine runs over the whole budget, and the saved config holds the budget."""
    run = tmp_path / "run"
    cfg = _cfg(stores, run, **{"train.eval_every": 20, "train.patience": 2})
    result = train(cfg, auto_keys=frozenset({"train.max_steps", "model.cl_dim"}))
    assert result.stopped_early and result.steps < MIN_BUDGET
    saved = (run / "config.toml").read_text()
    assert f"max_steps = {MIN_BUDGET}" in saved and "cl_dim = 128" in saved and "dim = 64" in saved
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == result.steps and result.steps - result.best_step == 2 * 20
    last = [x for x in lines if "lr" in x][-1]  # the schedule runs over the budget, not the steps run
    assert last["lr"] == pytest.approx(lr_at(last["step"] - 1, MIN_BUDGET, 3e-3))
    assert DATASET == "synthetic"


def test_cli_train_predictor_without_a_pipeline_sizes_what_set_leaves(stores, tmp_path) -> None:
    from typer.testing import CliRunner

    from m3jepa import cli

    run = tmp_path / "run"
    sets = overrides(stores, run, **{"train.eval_every": 10})
    sets = [s for s in sets if not s.startswith("model.cl_dim=")]
    args = ["train-predictor"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    saved = (run / "config.toml").read_text()
    assert "cl_dim = 128" in saved and "max_steps = 60" in saved  # sized / given
