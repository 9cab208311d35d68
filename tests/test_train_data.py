"""Stage-2 data: rows paired by group id, batch order as a pure function of the step, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from m3jepa.config import load_pipeline
from m3jepa.core import checkpoint as ckpt
from m3jepa.core.directions import direction_modalities, parse_direction
from m3jepa.core.errors import StoreDataError
from m3jepa.core.order import batch_indices
from m3jepa.core.paired import ModalityFeatures, pair_rows
from m3jepa.eval.embed import first_per_group


def _mod(modality: str, groups: list[str], valid: list[bool] | None = None) -> ModalityFeatures:
    n = len(groups)
    return ModalityFeatures(
        modality=modality,
        store=Path(f"/stores/{modality}"),
        features=torch.arange(n * 2.0).view(n, 2),
        group_ids=np.asarray(groups, dtype=object),
        valid=np.asarray(valid or [True] * n),
        texts=[None] * n,
        encoder="e",
        revision="r",
    )


def test_pair_rows_joins_by_group_not_position():
    images = _mod("image", ["b", "a", "c"])
    texts = _mod("text", ["a", "a", "c", "b", "b", "c"])  # shuffled on purpose
    img_rows, txt_rows = pair_rows(images, texts)
    for i, t in zip(img_rows, txt_rows, strict=True):
        assert images.group_ids[i] == texts.group_ids[t]
    assert sorted(txt_rows.tolist()) == list(range(6))  # every caption paired once
    t_rows, i_rows = pair_rows(texts, images)  # the other direction mirrors it
    assert sorted(zip(t_rows.tolist(), i_rows.tolist(), strict=True)) == sorted(
        zip(txt_rows.tolist(), img_rows.tolist(), strict=True)
    )


def test_orphan_rows_are_an_error_naming_the_group():
    with pytest.raises(StoreDataError, match="'z'"):
        pair_rows(_mod("image", ["a", "b"]), _mod("text", ["a", "a", "z", "z"]))


def test_rows_whose_partner_was_skipped_are_dropped():
    images = _mod("image", ["a", "b"], valid=[True, False])
    texts = _mod("text", ["a", "a", "b", "b"], valid=[True, True, True, False])
    img_rows, txt_rows = pair_rows(images, texts)
    assert txt_rows.tolist() == [0, 1] and img_rows.tolist() == [0, 0]


def test_no_shared_group_is_an_error():
    with pytest.raises(StoreDataError, match="share no group"):
        pair_rows(_mod("image", ["a"], valid=[False]), _mod("text", ["a"], valid=[False]))


def test_batch_indices_are_a_pure_function_of_the_step():
    n, b = 103, 16
    per_epoch = n // b
    seen = np.concatenate([batch_indices(n, b, seed=3, step=s) for s in range(per_epoch)])
    assert len(set(seen.tolist())) == per_epoch * b  # one epoch: no row twice
    assert np.array_equal(batch_indices(n, b, 3, 17), batch_indices(n, b, 3, 17))
    assert not np.array_equal(batch_indices(n, b, 3, 0), batch_indices(n, b, 3, per_epoch))  # new epoch
    assert not np.array_equal(batch_indices(n, b, 3, 0), batch_indices(n, b, 4, 0))  # seed matters
    assert len(batch_indices(5, 16, 0, 0)) == 5  # a split smaller than a batch is one batch


def test_directions_parse():
    assert parse_direction("image->text") == ("image", "text")
    assert direction_modalities(["image->text", "text->image", "audio->text"]) == ["image", "text", "audio"]
    assert parse_direction("image+question->answer") == (("image", "question"), "answer")
    for bad in ("image", "image->text->audio", "image+->text", "->text", "image->"):
        with pytest.raises(StoreDataError):
            parse_direction(bad)


def test_first_per_group_keeps_row_order():
    groups = np.asarray(["a", "a", "b", "b", "c"], dtype=object)
    assert first_per_group(np.arange(5), groups).tolist() == [0, 2, 4]


def test_checkpoint_round_trip_and_atomic_swap(tmp_path):
    cfg = load_pipeline(None, ["train.max_steps=3"])
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = ckpt.TrainState(step=3, dims={"image": 3}, directions=["image->text"])
    d = tmp_path / "latest"
    ckpt.save_checkpoint(d, cfg, model, state, opt)
    ckpt.save_checkpoint(d, cfg, model, state, opt)  # overwriting goes through the swap
    loaded = ckpt.load_checkpoint(d, with_optimizer=True)
    assert loaded.cfg == cfg and loaded.state == state
    assert torch.equal(loaded.weights["weight"], model.weight)
    assert loaded.optimizer["optimizer"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    # a kill between the two renames leaves only `.old`: loading puts it back
    d.rename(tmp_path / "latest.old")
    assert ckpt.load_checkpoint(d).state.step == 3


def test_checkpoint_missing_file_is_named(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_checkpoint(tmp_path / "c")


def test_config_differences_names_keys():
    a = load_pipeline(None)
    b = load_pipeline(None, ["model.top_k=2", "train.lr=1.0"])
    diff = ckpt.config_differences(a, b, ("model", "train"))
    assert any(d.startswith("model.top_k") for d in diff) and any(d.startswith("train.lr") for d in diff)
