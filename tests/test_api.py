"""The Python API: m3jepa.load of runs and exports, embeddings equal to evaluate's, refusals, and every
example of docs/api.md run on real small runs."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import numpy as np
import pytest
from synthetic_stores import make_label_split, make_stores, overrides

import m3jepa
from m3jepa.api import ApiError
from m3jepa.api.export import export_run
from m3jepa.config import load_pipeline
from m3jepa.core.paired import load_split, modality_store
from m3jepa.eval.embed import embed_direction
from m3jepa.eval.evaluate import evaluate_run
from m3jepa.store import open_store
from m3jepa.train.loop import train

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    stores = make_stores(root / "stores", n_train=96, n_val=24, n_test=24)
    run = root / "run"
    train(load_pipeline(None, overrides(stores, run, **{"train.max_steps": 20, "train.eval_every": 10})))
    evaluate_run(run)
    return run


def _store_rows(model, split: str, modality: str) -> np.ndarray:
    return open_store(modality_store(model.cfg, split, modality)).read_all()  # (N, D) float32


def test_embeddings_equal_what_evaluate_scores(run):
    model = m3jepa.load(run)
    assert model.directions == ["image->text", "text->image"] and model.modalities == ["image", "text"]
    data = load_split(model.cfg, "test", model.directions)
    for direction, (src, tgt) in {"image->text": ("image", "text"), "text->image": ("text", "image")}.items():
        for space in ("cl", "pred"):
            emb = embed_direction(model.objective.predictor, data, direction, space)
            x = _store_rows(model, "test", src)
            q = model.embed_query(source=src, target=tgt, latents=x, space=space)
            g = model.embed_target(modality=tgt, latents=_store_rows(model, "test", tgt), space=space)
            np.testing.assert_array_equal(q[emb.query_rows], emb.queries)
            np.testing.assert_array_equal(g[emb.gallery_rows], emb.gallery)


def test_a_single_query_takes_the_query_path_and_equals_the_plain_forward(run):
    """embed_query on one or two rows (the search and serve case) runs `M3JepaPredictor.query` (the cl
    task alone, the MoE's per-row expert loop): the plain forward's cl_query to float32 rounding."""
    import torch

    model = m3jepa.load(run)
    x = _store_rows(model, "test", "image")  # (24, D_image)
    predictor = model.objective.predictor
    calls = []
    handle = predictor.pred_head["text"].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = np.concatenate([model.embed_query(source="image", target="text", latents=x[i:i + b])
                              for i, b in ((0, 1), (1, 2), (3, 1))])  # (4, d)
    finally:
        handle.remove()
    with torch.no_grad():
        want = predictor("image", torch.as_tensor(x[:4]), "text").cl_query  # (4, d) normalised
    assert not calls  # the prediction head never ran
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    assert predictor.mixer.__class__.__name__ == "MultiGateMoE"  # the loop, not the MLP, was tested


def test_an_export_loads_to_the_same_outputs_bit_for_bit(run, tmp_path):
    out = export_run(run, tmp_path / "model")
    files = ("config.json", "model.safetensors", "README.md", "checksums.json")
    assert {p.name for p in out.iterdir()} == set(files)
    # made to be shared: world-readable like any file, whatever mode the checkpoint's weights had
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()} == {
        name: "0o644" for name in files}
    card = (out / "README.md").read_text()
    assert "| image->text |" in card and f"m3jepa export --run {run}" in card
    a, b = m3jepa.load(run), m3jepa.load(out)
    assert b.source.kind == "export" and b.directions == a.directions
    x = _store_rows(a, "test", "image")
    for space in ("cl", "pred"):
        assert np.array_equal(a.embed_query(source="image", target="text", latents=x, space=space),
                              b.embed_query(source="image", target="text", latents=x, space=space))
    t = _store_rows(a, "test", "text")
    assert np.array_equal(a.embed_target(modality="text", latents=t),
                          b.embed_target(modality="text", latents=t))
    with pytest.raises(ApiError, match="not empty; choose another --out or pass --force"):
        export_run(run, out)


def test_refusals_are_one_line_naming_the_fix(run, tmp_path):
    model = m3jepa.load(run)
    x = _store_rows(model, "test", "image")
    cases = [
        (lambda: model.embed_query(source="text", target="audio", latents=x), "not trained for text->audio"),
        (lambda: model.embed_query(source="image", target="text", latents=x[:, :5]), r"must be \(N, 48\)"),
        (lambda: model.embed_query(source="image", target="text"), "either image inputs or image latents"),
        (lambda: model.embed_query(source="image", target="text", latents=x * np.nan), "NaN or infinite"),
        (lambda: model.embed_target(modality="text", latents=x, space="both"), "space='both'"),
        (lambda: model.vocabulary("label"), "no label vocabulary"),
        (lambda: m3jepa.load(tmp_path), "neither a run directory"),
        (lambda: m3jepa.load(run, checkpoint="newest"), "not one of best, latest"),
    ]
    for call, message in cases:
        with pytest.raises(ApiError, match=message):
            call()


def test_classify_equals_the_nearest_class_evaluate_uses(tmp_path):
    stores = tmp_path / "stores"
    for split in ("train", "val", "test"):
        make_label_split(stores, split)
    run = tmp_path / "run"
    sets = {"train.directions": ["image->label"], "train.max_steps": 30, "train.batch_size": 20,
            "encode.label_encoder": "syn-label", "train.eval_every": 10}
    train(load_pipeline(None, overrides(stores, run, **sets)))
    model = m3jepa.load(run)
    assert model.vocabulary("label") == [f"class{c}" for c in range(5)]
    x = _store_rows(model, "test", "image")
    got = model.classify(latents=x)
    q = model.embed_query(source="image", target="label", latents=x)
    g = model.embed_target(modality="label", latents=_store_rows(model, "train", "label"))
    want = [f"class{c}" for c in (q @ g.T).argmax(axis=1)]
    assert got == want
    truth = [r.split("/")[1] for r in open_store(modality_store(model.cfg, "test", "image")).rows.sample_ids]
    assert np.mean([a == b for a, b in zip(got, truth, strict=True)]) > 0.6  # 5 classes: chance is 0.2
    assert set(model.classify(latents=x, labels=["class1", "class3"])) <= {"class1", "class3"}
    with pytest.raises(ApiError, match="choose among the trained labels"):
        model.classify(latents=x, labels=["class9"])
    folder = export_run(run, tmp_path / "model")
    assert (folder / "vocabularies.safetensors").is_file()  # only a model with a vocabulary has one
    exported = m3jepa.load(folder)  # the vocabulary's latents travel along
    assert exported.classify(latents=x) == got


# ---------------------------------------------------------------- docs/api.md, run for real


@pytest.mark.slow
def test_every_example_in_docs_api_runs(docs_work, monkeypatch):
    pytest.importorskip("easy_vqa", reason="needs easy-vqa (pip install '.[offline]')")
    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("needs `apt-get install dataset-fashion-mnist`")
    # the page starts from these three runs; the docs work folder makes each once (tests/docs_runner.py)
    for command in ("m3jepa run tuxpaint", "m3jepa run fashion_mnist", "m3jepa run easy_vqa"):
        got = docs_work.ensure(command)
        assert got.rc == 0, got.out[-3000:]
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 7
    monkeypatch.chdir(docs_work.root)
    scope: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/api.md block {i + 1}", "exec"), scope)  # noqa: S102
        except Exception as e:  # name the block that failed
            raise AssertionError(f"docs/api.md python block {i + 1} failed: {e!r}\n{block}") from e
