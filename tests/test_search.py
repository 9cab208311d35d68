"""m3jepa.search: embed a gallery store, index it, search it (Python API and CLI), checked against numpy."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_stores import DATASET, overrides
from typer.testing import CliRunner

from m3jepa.api import load
from m3jepa.config import load_pipeline
from m3jepa.data.records import Record, membership_fingerprint
from m3jepa.search import Searcher, SearchError, SearchIndex, choose, embed_run, embed_store, index_store
from m3jepa.search.build import build, perturbed_queries
from m3jepa.search.index import manifest_digest, write_index
from m3jepa.search.plan import parse_bytes
from m3jepa.store import Manifest, StoreWriter, open_store, rows_from_records, store_path
from m3jepa.train.loop import train

IMAGE_DIM, TEXT_DIM = 48, 384


def _write(root: Path, split: str, modality: str, encoder: str, revision: str, records: list[Record],
           feats: np.ndarray, skipped: set[int] = frozenset()) -> Path:
    path = store_path(root, DATASET, split, modality, encoder)
    manifest = Manifest(dataset=DATASET, split=split, modality=modality,
                        membership=membership_fingerprint(records), rows=len(records), encoder=encoder,
                        encoder_revision=revision, pooling="none",
                        layers="none", dim=feats.shape[1], dtype="float32", format="zarr", shard_size=16)
    feats = feats.copy()
    feats[sorted(skipped)] = 0  # a skipped row's features are zeros, as encode writes them
    with StoreWriter(path, manifest) as w:
        for index, start, end in w.planned_shards():
            w.write_shard(index, feats[start:end])
        w.finalize(rows_from_records(records, skipped), [
            {"row_id": i, "sample_id": records[i].sample_id, "reason": "unreadable"} for i in skipped])
    return path


def _stores(root: Path) -> Path:
    """Random image latents; text rows in MiniLM's width under MiniLM's name, so a raw caption query runs
    the real MiniLM encoder (the latents themselves are a linear map of the image plus noise)."""
    from m3jepa.encoders import get_encoder_spec

    revision = get_encoder_spec("minilm-l6").revision
    mapping = np.random.default_rng(1).standard_normal((IMAGE_DIM, TEXT_DIM)).astype(np.float32) / 6
    for split, n in (("train", 96), ("val", 24), ("test", 24)):
        rng = np.random.default_rng(zlib.crc32(split.encode()))
        images = rng.standard_normal((n, IMAGE_DIM)).astype(np.float32)
        groups = [f"{split}-g{i:03d}" for i in range(n)]
        _write(root, split, "image", "syn-image", "r1",
               [Record(i, g, g, "image", f"/media/{g}.png") for i, g in enumerate(groups)], images)
        texts = images @ mapping + 0.3 * rng.standard_normal((n, TEXT_DIM)).astype(np.float32)
        _write(root, split, "text", "minilm-l6", revision,
               [Record(i, g, g, "text", f"a picture of thing {i} in {split}") for i, g in enumerate(groups)],
               texts)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = _stores(tmp_path_factory.mktemp("stores"))
    path = tmp_path_factory.mktemp("runs") / "run"
    sets = {"runtime.device": "cpu", "train.max_steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
            "encode.text_encoder": "minilm-l6"}
    train(load_pipeline(None, overrides(root, path, **sets)))
    return path


@pytest.fixture(scope="module")
def model(run):
    return load(run, device="cpu")


@pytest.fixture(scope="module")
def image_index(run, model, tmp_path_factory) -> Path:
    embedded = embed_run(model, "test", "image").path
    out, cached = index_store(embedded, tmp_path_factory.mktemp("idx") / "image.index", model)
    assert not cached
    return out


def _source(model, split: str, modality: str):
    from m3jepa.core.paired import modality_store

    return open_store(modality_store(model.cfg, split, modality))


def _exact(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) positions of the k largest inner products, by a float64 numpy sort."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T  # (Q, G)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


# ---------------------------------------------------------------- embed


def test_embed_writes_embed_target_with_the_source_rows(run, model):
    done = embed_run(model, "test", "image")
    assert done.path == run / "embedded" / "test" / "image" and not done.cached
    src, out = _source(model, "test", "image"), open_store(done.path)
    assert np.array_equal(out.read_all(), model.embed_target(modality="image", latents=src.read_all()))
    assert (out.rows.sample_ids, out.rows.group_ids, out.rows.texts) == (
        src.rows.sample_ids, src.rows.group_ids, src.rows.texts)
    m = out.manifest
    assert m.encoder == f"m3jepa:{run.resolve()}@best" and m.dim == 32 and m.dtype == "float32"
    assert m.encoder_revision == __import__("hashlib").sha256(
        (run / "checkpoints" / "best" / "model.safetensors").read_bytes()).hexdigest()
    assert [s.sha256 for s in m.shards] and m.membership == src.manifest.membership
    sidecar = json.loads((done.path / "embedding.json").read_text())
    assert sidecar["source"]["path"] == str(src.path.resolve())
    assert embed_run(model, "test", "image").cached  # the same model and store: a no-op


def test_embed_with_another_model_is_refused_unless_forced(run, model, tmp_path):
    out = tmp_path / "emb"
    embed_store(model, _source(model, "test", "image").path, out)
    other = load(run, checkpoint="latest", device="cpu")
    with pytest.raises(SearchError, match=r"embedded from another model; pass --force"):
        embed_store(other, _source(model, "test", "image").path, out)
    assert not embed_store(other, _source(model, "test", "image").path, out, force=True).cached
    assert open_store(out).manifest.encoder.endswith("@latest")


def test_invalid_rows_stay_invalid_and_zero(model, tmp_path):
    src = _source(model, "test", "image")
    records = [Record(i, s, g, "image", "x.png") for i, (s, g) in
               enumerate(zip(src.rows.sample_ids, src.rows.group_ids, strict=True))]
    path = _write(tmp_path / "stores", "test", "image", "syn-image", "r1", records, src.read_all(), {3, 17})
    out = open_store(embed_store(model, path, tmp_path / "emb").path)
    got, valid = out.read_all(), out.rows.valid
    assert valid.tolist() == [i not in (3, 17) for i in range(len(records))]
    assert not got[~valid].any()
    assert np.array_equal(got[valid], model.embed_target(modality="image", latents=src.read_all()[valid]))


def test_embedding_a_source_only_modality_names_the_directions(tmp_path):
    root = _stores(tmp_path / "stores")
    run = tmp_path / "one-way"
    sets = {"runtime.device": "cpu", "train.max_steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
            "encode.text_encoder": "minilm-l6", "train.directions": ["image->text"]}
    train(load_pipeline(None, overrides(root, run, **sets)))
    with pytest.raises(SearchError, match=r"^the model only uses image as a source \(its directions are "
                                          r"image->text\); embed a modality it targets$"):
        embed_run(load(run, device="cpu"), "test", "image")


# ---------------------------------------------------------------- index


def test_flat_index_returns_the_exact_top_k(model, image_index):
    index = SearchIndex.open(image_index)
    assert (index.modality, index.dim, index.rows, index.manifest["kind"]) == ("image", 32, 24, "flat")
    gallery = open_store(index.manifest["store"]["path"]).read_all()  # (24, 32)
    text = _source(model, "test", "text").read_all()  # (24, 384)
    queries = model.embed_query(source="text", target="image", latents=text)  # (24, 32)
    hits = index.search(queries, k=5)
    assert [[h.row_id for h in q] for q in hits] == _exact(queries, gallery, 5).tolist()
    first = hits[0][0]
    assert first.rank == 1
    assert first.score == pytest.approx(float(queries[0] @ gallery[first.row_id]), abs=1e-5)
    row = index.row(first.row_id)
    assert row["media"] is None  # the synthetic dataset has no records to join
    assert row["caption"] == f"a picture of thing {first.row_id} in test"  # its group's caption
    assert index.manifest["recall"]["query_source"].startswith("24 text->image embed_query rows")


def test_index_is_cached_then_refused_without_force(model, image_index):
    embedded = Path(SearchIndex.open(image_index).manifest["store"]["path"])
    assert index_store(embedded, image_index, model) == (image_index, True)
    with pytest.raises(SearchError, match=r"exists and holds another index .*pass --force"):
        index_store(embedded, image_index, model, kind="flat")


def _clustered(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # (n, d) unit rows


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-sq8", "hnsw"])
def test_approximate_recall_is_recomputed_independently(kind, tmp_path):
    vectors = _clustered(6000, 32, 50)
    queries = perturbed_queries(vectors, 300, seed=1)
    plan = choose(len(vectors), 32, kind)
    built = build(vectors, plan, queries, "perturbed")
    rows = [{"row_id": i, "sample_id": str(i), "group_id": str(i), "caption": None, "media": None}
            for i in range(len(vectors))]
    index = SearchIndex.open(write_index(tmp_path / "idx", built, rows, {"modality": "image"}))
    found = np.array([[h.row_id for h in q] for q in index.search(queries, 10)])  # (300, 10)
    exact = _exact(queries, vectors, 10)
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert index.manifest["recall@10"] == pytest.approx(recall, abs=1e-9)
    assert recall >= 0.95
    (name, chosen), = index.manifest["search_params"].items()
    tried = dict(map(tuple, index.manifest["recall"]["tuning"]))
    assert tried[chosen] >= 0.95 and all(r < 0.95 for p, r in tried.items() if p < chosen)


def test_the_choice_rule():
    assert choose(20_000, 512).kind == "flat"
    assert choose(1_000_000, 512, budget=parse_bytes("4GB")).factory == "IVF4096,Flat"
    assert choose(1_000_000, 512, budget=parse_bytes("1GB")).factory == "IVF4096,SQ8"
    assert choose(1_000_000, 512, budget=parse_bytes("200MB")).factory == "IVF4096,PQ64x8"
    with pytest.raises(SearchError, match=r"no index of 1000000 x 512 fits a memory budget of 10,000,000 "):
        choose(1_000_000, 512, budget=parse_bytes("10MB"))
    assert parse_bytes("2GiB") == 2 * 2**30
    with pytest.raises(SearchError, match="is not a size"):
        parse_bytes("lots")


# ---------------------------------------------------------------- damaged indexes


def test_a_corrupt_manifest_is_one_line_naming_it(image_index, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(image_index, bad)
    (bad / "manifest.json").write_text("{ not json")
    with pytest.raises(SearchError) as e:
        SearchIndex.open(bad)
    assert str(e.value) == f"{bad / 'manifest.json'} is corrupt (JSONDecodeError); rebuild with " \
                           "`m3jepa index --force`"
    with pytest.raises(SearchError, match=r"is not an index folder"):
        SearchIndex.open(tmp_path / "nowhere")


def test_a_row_count_mismatch_is_one_line(image_index, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(image_index, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["rows"] = 23
    m["manifest_sha256"] = manifest_digest(m)  # re-signed: the count check itself is under test
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SearchError) as e:
        SearchIndex.open(bad)
    assert str(e.value) == (f"{bad}: the index holds 24 vectors, rows.jsonl 24 lines, the manifest says 23; "
                            "rebuild with `m3jepa index --force`")


@pytest.mark.parametrize(("field", "value"), [
    ("modality", "text"),  # image vectors ranked as captions
    ("model", {"path": "/elsewhere", "kind": "run", "checkpoint": "best", "weights_sha256": "0" * 64}),
    ("media_roots", ["/"]),  # every file on the machine servable
    ("metric", "l2"),
    ("recall@10", 0.5),
])
def test_every_manifest_field_is_covered_by_its_sha256(image_index, tmp_path, field, value):
    bad = tmp_path / "bad"
    shutil.copytree(image_index, bad)
    m = json.loads((bad / "manifest.json").read_text())
    assert field in m
    m[field] = value
    (bad / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(SearchError) as e:
        Searcher.open(bad, device="cpu")
    assert str(e.value) == (f"{bad / 'manifest.json'} was changed after the index was built (it no "
                            "longer matches its manifest_sha256: a field such as its modality, model or "
                            "stores would change what a search means); rebuild with `m3jepa index --force`")
    m = json.loads((image_index / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(m, indent=4, sort_keys=False))  # reformatted: still fine
    assert SearchIndex.open(bad).modality == "image"


def test_a_link_out_of_an_image_folder_is_left_out(tmp_path):
    from m3jepa.search.folder import scan_images

    photos, private = tmp_path / "photos", tmp_path / "private.png"
    photos.mkdir()
    Image.new("RGB", (4, 4)).save(photos / "a.png")
    Image.new("RGB", (4, 4)).save(private)
    (photos / "b.png").symlink_to(private)  # out of the folder: never indexed, never served
    (photos / "c.png").symlink_to(photos / "a.png")  # inside it: indexed, as the file it names
    items, others = scan_images(photos)
    assert [(i.key, i.payload) for i in items] == [("a.png", str(photos / "a.png")),
                                                   ("c.png", str(photos / "a.png"))]
    assert others == 1


def test_edited_rows_are_refused(image_index, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(image_index, bad)
    (bad / "rows.jsonl").write_text((bad / "rows.jsonl").read_text().replace("test-g000", "test-g999"))
    with pytest.raises(SearchError, match=r"rows.jsonl does not match its sha256 in the manifest"):
        SearchIndex.open(bad)


# ---------------------------------------------------------------- search


def test_searcher_and_cli_print_the_exact_hits(model, image_index):
    caption = "a picture of thing 3 in test"
    searcher = Searcher(SearchIndex.open(image_index), model)
    assert searcher.sources == ["text"]
    query = model.embed_query([caption], source="text", target="image")  # (1, 32), through MiniLM
    gallery = open_store(searcher.index.manifest["store"]["path"]).read_all()
    want = _exact(query, gallery, 4)[0].tolist()
    assert [h.row_id for h in searcher.query("text", caption, k=4)] == want

    from m3jepa.cli import app

    res = CliRunner().invoke(app, ["search", "--index", str(image_index), "--text", caption, "--k", "4",
                                   "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert [h["row_id"] for h in out["hits"]] == want and [h["rank"] for h in out["hits"]] == [1, 2, 3, 4]
    res = CliRunner().invoke(app, ["search", "--index", str(image_index), "--text", caption, "--k", "2",
                                   "--device", "cpu"])
    table = [line.split() for line in res.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [(int(t[0]), int(t[2])) for t in table] == [(1, want[0]), (2, want[1])]
    assert res.stdout.splitlines()[0] == f"image gallery {image_index}: top 2 of 24 rows"  # its size
    assert (out["gallery"], out["gallery_size"]) == ("image", 24)


def test_threads_reach_torch_and_faiss_and_keep_the_hits(model, image_index):
    import faiss
    import torch

    from m3jepa.cli import app

    caption = "a picture of thing 3 in test"
    args = ["search", "--index", str(image_index), "--text", caption, "--k", "4", "--json", "--device", "cpu"]
    before = (torch.get_num_threads(), faiss.omp_get_max_threads())
    try:
        torch.set_num_threads(2)  # so that 1 is a change, whatever this machine's default
        faiss.omp_set_num_threads(2)
        want = json.loads(CliRunner().invoke(app, args).stdout)["hits"]
        res = CliRunner().invoke(app, [*args, "--threads", "1"])
        assert res.exit_code == 0, res.output
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
        assert [h["row_id"] for h in json.loads(res.stdout)["hits"]] == [h["row_id"] for h in want]
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
    res = CliRunner().invoke(app, [*args, "--threads", "0"])
    assert res.exit_code == 2 and res.stderr.strip() == (
        "error: --threads 0 must be at least 1 (or left out for torch's and faiss's own)")


def test_an_untrained_direction_is_one_line(model, image_index, tmp_path):
    from m3jepa.cli import app

    wav = tmp_path / "a.wav"
    wav.write_bytes(b"RIFF")
    res = CliRunner().invoke(app, ["search", "--index", str(image_index), "--audio", str(wav),
                                   "--device", "cpu"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        "error: the model was not trained for audio->image; its directions are image->text, text->image"]
    res = CliRunner().invoke(app, ["search", "--index", str(tmp_path / "missing"), "--text", "x"])
    assert res.exit_code == 2 and res.stderr.strip() == (
        f"error: {tmp_path / 'missing'} is not an index folder; build one with `m3jepa index`")


# ---------------------------------------------------------------- real data


@pytest.mark.slow
def test_tuxpaint_images_are_found_by_caption(tmp_path):
    if not Path("/usr/share/tuxpaint/stamps").is_dir():
        pytest.skip("tuxpaint-stamps-default is not installed")
    from m3jepa.pipelines import resolve
    from m3jepa.runner import run_all

    cfg = load_pipeline(resolve("tuxpaint"), ["train.epochs=5"])
    run_all(cfg, workdir=tmp_path)
    run = next((tmp_path / "runs").iterdir())
    model = load(run, device="cpu")
    idx, _ = index_store(embed_run(model, "test", "image").path, tmp_path / "img.index", model)
    searcher = Searcher(SearchIndex.open(idx), model)
    hits = searcher.query("text", "Tux—the Linux mascot!", k=10)
    assert all(h.media and Path(h.media).is_file() for h in hits)
    assert len(hits) == 10 and [h.rank for h in hits] == list(range(1, 11))


# ---------------------------------------------------------------- your own galleries


class _Counting:
    """The real model, with every input embed_target is given recorded (a spy, not a stand-in)."""

    def __init__(self, model) -> None:
        self._model, self.embedded = model, []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def embed_target(self, inputs=None, **kwargs):
        self.embedded += list(inputs or [])
        return self._model.embed_target(inputs, **kwargs)


def test_a_caption_file_is_indexed_then_updated_incrementally(model, tmp_path):
    from m3jepa.search import index_folder

    texts = tmp_path / "captions.txt"
    lines = [f"a picture of thing {i} in test" for i in range(6)]
    texts.write_text("\n".join(lines) + "\n\n")  # a blank line is no caption
    spy, out = _Counting(model), tmp_path / "captions.index"
    _, first = index_folder(spy, "texts", texts, out)
    assert (first.embedded, first.reused, first.removed, spy.embedded) == (6, 0, 0, lines)
    # an edited file: one caption changed, one removed, one added, and two lines swapped
    new = [lines[1], lines[0], "a picture of thing 2, edited", lines[3], lines[5], "a brand new caption"]
    texts.write_text("\n".join(new) + "\n")
    spy.embedded.clear()
    _, second = index_folder(spy, "texts", texts, out)
    assert spy.embedded == ["a picture of thing 2, edited", "a brand new caption"]  # only these ran
    assert (second.embedded, second.reused, second.removed) == (2, 4, 2)
    index = SearchIndex.open(out)
    assert [index.row(i)["caption"] for i in range(index.rows)] == new
    assert index.manifest["modality"] == "text"
    stored = np.load(out / "embeddings.npy")  # (6, d): the reused vectors and the new ones, in row order
    np.testing.assert_allclose(stored, model.embed_target(new, modality="text"), atol=1e-5)
    searcher = Searcher(index, model)
    assert searcher.size == 6 and searcher.gallery == "text"
    hits = searcher.search(model.embed_target(["a brand new caption"], modality="text"), 1)[0]
    assert (hits[0].row_id, hits[0].caption) == (5, "a brand new caption")
    # vectors that do not match their sha256 in the manifest are never reused: everything again
    data = bytearray((out / "embeddings.npy").read_bytes())
    data[-1] ^= 0x01
    (out / "embeddings.npy").write_bytes(bytes(data))
    spy.embedded.clear()
    _, third = index_folder(spy, "texts", texts, out)
    assert spy.embedded == new and (third.embedded, third.reused) == (6, 0)
    other = tmp_path / "other.txt"
    other.write_text("x\n")
    with pytest.raises(SearchError, match="holds another index"):
        index_folder(model, "texts", other, out)


def test_a_run_split_all_indexes_every_split_together(run, model, tmp_path):
    from m3jepa.cli import app

    out = tmp_path / "all.index"
    res = CliRunner().invoke(app, ["index", "--run", str(run), "--split", "all", "--modality", "image",
                                   "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    index = SearchIndex.open(out)
    stores = [open_store(json.loads((out / "manifest.json").read_text())["stores"][i]["path"])
              for i in range(3)]
    assert [s.manifest.split for s in stores] == ["train", "val", "test"]
    assert index.rows == 96 + 24 + 24 == len({index.row(i)["row_id"] for i in range(index.rows)})
    gallery = np.concatenate([s.read_all() for s in stores])  # (144, d): row_id = offset + store row
    caption = "a picture of thing 5 in val"
    query = model.embed_query([caption], source="text", target="image")
    want = _exact(query, gallery, 5)[0].tolist()
    assert [h.row_id for h in Searcher(index, model).query("text", caption, k=5)] == want
    hits = Searcher(index, model).query("text", caption, k=144)
    assert {h.sample_id for h in hits if h.row_id >= 96 + 24} == {f"test-g{i:03d}" for i in range(24)}


def test_indexing_an_export_writes_beside_it_never_into_it(run, model, tmp_path):
    from m3jepa.api.export import export_run
    from m3jepa.cli import app

    export = export_run(run, tmp_path / "model")
    files = sorted(p.relative_to(export) for p in export.rglob("*"))
    res = CliRunner().invoke(app, ["index", "--run", str(export), "--split", "test", "--modality", "image",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.relative_to(export) for p in export.rglob("*")) == files  # the export is untouched
    beside = tmp_path / "model.embedded" / "test" / "image.index"
    assert res.stdout.startswith(f"{beside}:") and SearchIndex.open(beside).rows == 24
