"""VQA: datasets (easy-vqa, VQAv2, NLVR2 layouts), the question join, concatenated inputs, VQA accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_stores import overrides

from m3jepa.config import load_pipeline
from m3jepa.core.directions import direction_modalities, parse_direction
from m3jepa.core.errors import StoreDataError
from m3jepa.core.paired import load_split
from m3jepa.data import DEFAULT_ENCODERS, get_dataset
from m3jepa.data.records import DatasetError, Record, membership_fingerprint
from m3jepa.data.vqa import JoinTable, join_path, read_join_table, target_answer, top_answers
from m3jepa.distributed import DistInfo
from m3jepa.eval.vqa import vqa_accuracy, vqa_score
from m3jepa.store import Manifest, StoreWriter, rows_from_records, store_path

STAMPS = Path("/usr/share/tuxpaint/stamps/animals/mammals")
ENC = {"image": "syn-image", "question": "syn-text", "answer": "syn-text"}


# ---------------------------------------------------------------- scoring


def test_vqa_accuracy_against_a_hand_computed_case_with_ten_annotators():
    answers = {"2": 2, "two": 7, "3": 1}  # ten annotators
    assert vqa_score("2", answers) == pytest.approx(2 / 3)
    assert vqa_score("two", answers) == 1.0  # 7 >= 3 annotators agree
    assert vqa_score("3", answers) == pytest.approx(1 / 3)
    assert vqa_score("four", answers) == 0.0
    # mean of 2/3, 1, 1/3, 0 = 0.5
    assert vqa_accuracy(["2", "two", "3", "four"], [answers] * 4) == pytest.approx(50.0)
    assert vqa_score("3", answers, "exact") == 1.0 and vqa_score("x", answers, "exact") == 0.0
    assert target_answer(answers) == "two"
    assert target_answer({"b": 3, "a": 3}) == "a"  # ties go to the smaller string


def test_top_answers_counts_training_targets():
    from m3jepa.data.vqa import Question

    qs = [Question(str(i), "q", {"image": "i"}, {a: 5}) for i, a in enumerate("aabbbc")]
    assert top_answers(qs, 2) == ["b", "a"]


def test_direction_parsing_for_concatenated_inputs():
    assert parse_direction("image+question->answer") == (("image", "question"), "answer")
    assert parse_direction("image->text") == ("image", "text")
    mods = direction_modalities(["image+image2+question->answer"])
    assert mods == ["image", "image2", "question", "answer"]
    with pytest.raises(StoreDataError):
        parse_direction("image+->answer")


# ---------------------------------------------------------------- datasets


@pytest.mark.slow
def test_easy_vqa_splits_by_image_and_links_questions():
    ds = get_dataset("easy-vqa", seed=0)
    counts = ds.counts()
    # synthetic shapes: 4,000 training images (38,575 questions), 1,000 test images (9,673 questions)
    assert counts["train"]["image"] + counts["val"]["image"] == 4000 and counts["test"]["image"] == 1000
    assert counts["train"]["question"] + counts["val"]["question"] == 38575
    assert counts["test"]["question"] == 9673 and counts["val"]["answer"] == 13
    images = {s: {r.group_id for r in ds.records(s, "image")} for s in ("train", "val")}
    assert not images["train"] & images["val"] and 300 < len(images["val"]) < 500
    table = ds.join_table("val")
    assert set(table.links) == {r.group_id for r in ds.records("val", "question")}
    assert {v["image"] for v in table.links.values()} == images["val"] and table.scoring == "exact"
    small = get_dataset("easy-vqa", seed=0, limit=5)
    assert len(small.records("test", "image")) == 5
    assert all(q.images["image"] in {r.group_id for r in small.records("test", "image")}
               for q in small.kept_questions("test"))
    assert get_dataset("easy-vqa", seed=1).records("val", "image") != ds.records("val", "image")


def _copy_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pngs = sorted(STAMPS.glob("*.png"))[: len(names)]
    for src, name in zip(pngs, names, strict=True):
        shutil.copy(src, folder / name)


def _vqav2_tree(root: Path) -> Path:
    """Two train2014 images (3 questions) and one val2014 image (2 questions), ten annotators each."""
    def write(source: str, rows: list[tuple[int, int, str, list[str]]]) -> None:
        qs = [{"question_id": q, "image_id": i, "question": t} for q, i, t, _ in rows]
        anns = [{"question_id": q, "image_id": i, "answers": [{"answer": a} for a in ans]}
                for q, i, _, ans in rows]
        (root / f"v2_OpenEnded_mscoco_{source}2014_questions.json").write_text(json.dumps({"questions": qs}))
        (root / f"v2_mscoco_{source}2014_annotations.json").write_text(json.dumps({"annotations": anns}))

    write("train", [(10, 1, "What animal?", ["Dog"] * 8 + ["cat"] * 2),
                    (11, 1, "How many?", ["2"] * 6 + ["two"] * 4),
                    (20, 2, "Is it red?", ["yes"] * 10)])
    write("val", [(30, 3, "What animal?", ["cat"] * 3 + ["dog"] * 2 + ["mouse"] * 5),
                  (31, 3, "Is it red?", ["no"] * 9 + ["yes"])])
    _copy_images(root / "train2014", [f"COCO_train2014_{i:012d}.jpg" for i in (1, 2)])
    _copy_images(root / "val2014", [f"COCO_val2014_{3:012d}.jpg"])
    return root


def test_vqav2_layout_answers_and_candidates(tmp_path):
    from m3jepa.data.vqav2 import load_vqav2

    ds = load_vqav2(str(_vqav2_tree(tmp_path)), top_k=2)
    assert ds.answers == ["2", "dog"]  # K=2 most frequent training targets ("yes" ties, loses on order)
    table = ds.join_table("test")
    assert table.links["30"] == {"image": "val-3", "answer": None}  # "mouse" is outside the K: scored only
    assert table.counts["30"] == {"cat": 3, "dog": 2, "mouse": 5} and table.scoring == "vqa"
    assert [r.payload for r in ds.records("test", "answer")] == ["2", "dog"]
    everything = load_vqav2(str(tmp_path))
    assert sorted(everything.answers) == ["2", "dog", "yes"]
    train_ids = {r.group_id for s in ("train", "val") for r in everything.records(s, "question")}
    assert train_ids == {"10", "11", "20"}


def test_vqav2_question_without_its_image_is_named_or_skipped(tmp_path):
    from m3jepa.data.vqav2 import load_vqav2

    root = _vqav2_tree(tmp_path)
    (root / "val2014" / f"COCO_val2014_{3:012d}.jpg").unlink()
    with pytest.raises(DatasetError, match="question 30: its image file .*_000000000003.jpg is missing"):
        load_vqav2(str(root))
    ds = load_vqav2(str(root), skip_bad=True)
    assert [s for s, _ in ds.skipped] == ["30", "31"] and ds.kept_questions("test") == []


def _nlvr2_tree(root: Path) -> Path:
    rows = {
        "train": [("train-1-0-0", "Both images show a dog.", "True", "7"),
                  ("train-1-0-1", "The left image has two dogs.", "False", "7")],
        "dev": [("dev-5-1-0", "There is a cat.", "False", None)],
        "test1": [("test1-9-0-0", "Exactly one animal.", "True", None)],
    }
    for stem, items in rows.items():
        lines = [json.dumps({"identifier": i, "sentence": s, "label": lab, **({"directory": d} if d else {})})
                 for i, s, lab, d in items]
        (root / f"{stem}.json").write_text("\n".join(lines) + "\n")
    _copy_images(root / "train" / "7", ["train-1-0-img0.png", "train-1-0-img1.png"])
    _copy_images(root / "dev", ["dev-5-1-img0.png", "dev-5-1-img1.png"])
    _copy_images(root / "test1", ["test1-9-0-img0.png", "test1-9-0-img1.png"])
    return root


def test_nlvr2_pairs_two_images_with_each_statement(tmp_path):
    ds = get_dataset("nlvr2", str(_nlvr2_tree(tmp_path)))
    assert ds.modalities() == ["image", "image2", "question", "answer"]
    assert [r.group_id for r in ds.records("train", "image2")] == ["train-1-0-img1"]
    assert Path(ds.records("train", "image")[0].payload).parent.name == "7"
    table = ds.join_table("train")
    want = {"image": "train-1-0-img0", "image2": "train-1-0-img1", "answer": "false"}
    assert table.links["train-1-0-1"] == want
    assert [r.payload for r in ds.records("val", "question")] == ["There is a cat."]
    (tmp_path / "test1" / "test1-9-0-img1.png").unlink()
    with pytest.raises(DatasetError, match="question test1-9-0-0: its image2 file"):
        get_dataset("nlvr2", str(tmp_path))
    assert get_dataset("nlvr2", str(tmp_path), skip_bad=True).skipped[0][0] == "test1-9-0-0"
    assert DEFAULT_ENCODERS["nlvr2"]["image2"] == "dinov2-large"


def test_text_encoders_fill_question_and_answer_stores():
    from m3jepa.config import EncodeConfig
    from m3jepa.encode.jobs import encoder_spec as _spec

    ds = get_dataset("easy-vqa", limit=2)
    for modality in ("question", "answer"):
        assert _spec(EncodeConfig(dataset="easy-vqa"), modality, ds).name == "minilm-l6"
    with pytest.raises(Exception, match="encodes text, not image"):
        _spec(EncodeConfig(dataset="easy-vqa", image_encoder="minilm-l6"), "image", ds)


# ---------------------------------------------------------------- stage 2 and 3 on synthetic VQA stores

COLORS, SHAPES = ("red", "blue"), ("circle", "square")


def _write(root: Path, split: str, modality: str, records: list[Record], feats: np.ndarray,
           valid: set[int] | None = None) -> None:
    path = store_path(root, "synvqa", split, modality, ENC[modality])
    manifest = Manifest(dataset="synvqa", split=split, modality=modality,
                        membership=membership_fingerprint(records), rows=len(records), encoder=ENC[modality],
                        encoder_revision="r1", pooling="none", layers="none", dim=feats.shape[1],
                        dtype="float32", format="zarr", shard_size=256)
    bad = [] if valid is None else [r for r in records if r.row_id not in valid]
    skipped = [{"row_id": r.row_id, "sample_id": r.sample_id, "reason": "bad"} for r in bad]
    with StoreWriter(path, manifest) as w:
        for index, start, end in w.planned_shards():
            w.write_shard(index, feats[start:end])
        w.finalize(rows_from_records(records, {s["row_id"] for s in skipped}), skipped)


def make_vqa_split(root: Path, split: str, n_images: int, broken: bool = False) -> None:
    """Images with a colour and a shape; "what colour?" / "what shape?" questions: the answer needs both.

    Rows are written in a shuffled order, so only the join (by id) pairs them. With `broken`, one
    question's answer is outside the candidates and one image row is skipped.
    """
    rng = np.random.default_rng(len(split) + n_images)
    basis = np.random.default_rng(0).standard_normal((8, 24)).astype(np.float32)  # colour, shape, question
    answers = [*COLORS, *SHAPES]
    img_ids = [f"{split}-img{i}" for i in range(n_images)]
    attrs = {g: (rng.integers(2), rng.integers(2)) for g in img_ids}
    img_feats = np.stack([basis[c] + basis[2 + s] + 0.3 * rng.standard_normal(24) for c, s in attrs.values()])
    order = rng.permutation(n_images)
    img_records = [Record(r, img_ids[i], img_ids[i], "image", "x.png") for r, i in enumerate(order)]
    links, counts, q_records, q_feats = {}, {}, [], []
    for i, g in enumerate(img_ids):
        for kind in (0, 1):
            qid = f"{split}-q{2 * i + kind}"
            answer = COLORS[attrs[g][0]] if kind == 0 else SHAPES[attrs[g][1]]
            q_records.append(Record(len(q_records), qid, qid, "question", "what?"))
            q_feats.append(basis[4 + kind] + 0.3 * rng.standard_normal(24))
            links[qid], counts[qid] = {"image": g, "answer": answer}, {answer: 1}
    if broken:
        links[f"{split}-q0"]["answer"], counts[f"{split}-q0"] = None, {"triangle": 1}
    _write(root, split, "image", img_records, img_feats[order].astype(np.float32),
           valid=set(range(1, n_images)) if broken else None)
    _write(root, split, "question", q_records, np.asarray(q_feats, dtype=np.float32))
    a_records = [Record(k, a, a, "answer", a) for k, a in enumerate(answers)]
    a_feats = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)  # same in every split
    _write(root, split, "answer", a_records, a_feats)
    table = JoinTable(anchor="question", membership=membership_fingerprint(q_records), scoring="exact",
                      answers=answers, links=links, counts=counts)
    join_path(root, "synvqa", split).write_text(json.dumps(table.to_json()))


def _vqa_cfg(root: Path, run: Path, **extra):
    sets = {"encode.dataset": "synvqa", "train.directions": ["image+question->answer"],
            "encode.text_encoder": "syn-text", "train.max_steps": 150, "train.lr": 3e-3, **extra}
    return load_pipeline(None, overrides(root, run, **sets))


@pytest.fixture(scope="module")
def vqa_stores(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqa")
    make_vqa_split(root, "train", 96)
    make_vqa_split(root, "val", 24)
    make_vqa_split(root, "test", 24, broken=True)
    return root


def test_join_pairs_by_id_and_batches_are_dicts(vqa_stores, tmp_path):
    from m3jepa.train.loop import _batch

    cfg = _vqa_cfg(vqa_stores, tmp_path / "run")
    data = load_split(cfg, "test", cfg.train.directions)
    rows_s, rows_t = data.pairs["image+question->answer"]
    assert rows_s.shape == (45, 2)  # 48 questions - 2 of the skipped image - 1 answered outside the K
    img, q, ans = (data.modalities[m] for m in ("image", "question", "answer"))
    for (ri, rq), ra in zip(rows_s, rows_t, strict=True):
        qid = q.group_ids[rq]
        assert img.group_ids[ri] == data.join.links[qid]["image"]
        assert ans.group_ids[ra] == data.join.links[qid]["answer"]
    x, y = _batch(data, "image+question->answer", 8, 0, 0, DistInfo())
    assert set(x) == {"image", "question"} and x["image"].shape == (8, 24) and y.shape == (8, 16)
    assert read_join_table(vqa_stores, "synvqa", "nowhere") is None


def test_join_table_of_another_encode_is_refused(vqa_stores, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(vqa_stores, root)
    path = join_path(root, "synvqa", "val")
    table = json.loads(path.read_text())
    path.write_text(json.dumps({**table, "membership": "other"}))
    cfg = _vqa_cfg(root, tmp_path / "run")
    with pytest.raises(StoreDataError, match="re-run `m3jepa encode`"):
        load_split(cfg, "val", cfg.train.directions)


@pytest.mark.slow
def test_concatenated_input_trains_and_scores_vqa_accuracy(vqa_stores, tmp_path):
    from m3jepa.eval.evaluate import evaluate_run
    from m3jepa.train.loop import train

    torch.manual_seed(0)
    train(_vqa_cfg(vqa_stores, tmp_path / "run"))
    metrics = evaluate_run(tmp_path / "run")
    vqa = metrics.to_json()["vqa"]["image+question->answer"]
    # the answer needs both inputs: from either alone the best is 50%
    assert vqa["accuracy_in_k"] > 80.0, vqa
    assert vqa["n_questions"] == 46 and vqa["n_outside_k"] == 1 and vqa["n_unscored"] == 2
    assert vqa["n_answers"] == 4
    r1 = metrics.to_json()["directions"]["image+question->answer"]["R@1"]
    assert r1 == pytest.approx(vqa["accuracy_in_k"], abs=1e-6)  # exact scoring: R@1 = in-K top-1
    assert "VQA accuracy" in metrics.table()
    assert "VQA accuracy" in (tmp_path / "run" / "metrics.md").read_text()


def _easy_vqa_tree(root: Path) -> Path:
    """The package's layout in miniature: 2 training images, 1 test image, real PNGs."""
    for source, ids in (("train", [0, 1]), ("test", [0])):
        _copy_images(root / source / "images", [f"{i}.png" for i in ids])
        rows = [[f"what shape is image {i}?", "circle" if i else "square", i] for i in ids]
        rows += [[f"is image {i} red?", "yes", i] for i in ids]
        (root / source / "questions.json").write_text(json.dumps(rows))
    return root


@pytest.mark.slow
def test_stage_one_writes_text_stores_and_join_tables(tmp_path, monkeypatch):
    from m3jepa.config import EncodeConfig
    from m3jepa.encode.runner import run_encode

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = _easy_vqa_tree(tmp_path / "data")
    cfg = EncodeConfig(dataset="easy-vqa", root=str(root), splits=["train", "test"],
                       modalities=["image", "question", "answer"], store_root=str(tmp_path / "stores"),
                       workers=0, threads=1)
    summary = run_encode(cfg)
    encoders = {(s.split, s.modality): s.encoder for s in summary.stores}
    assert encoders[("test", "question")] == encoders[("test", "answer")] == "minilm-l6"
    assert encoders[("test", "image")] == "efficientnet-lite0"
    table = read_join_table(tmp_path / "stores", "easy-vqa", "test")
    assert table.links == {"test-q00000": {"image": "test-0", "answer": "square"},
                           "test-q00001": {"image": "test-0", "answer": "yes"}}
    pipeline = load_pipeline(None, [f'encode.store_root="{tmp_path / "stores"}"', 'encode.dataset="easy-vqa"',
                                    'train.directions=["image+question->answer"]'])
    data = load_split(pipeline, "test", pipeline.train.directions)
    assert data.dims() == {"image": 1280, "question": 384, "answer": 384}
    assert data.pairs["image+question->answer"][0].tolist() == [[0, 0], [0, 1]]
