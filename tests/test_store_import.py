"""`m3jepa stores import`: clip-retrieval's layout (and .npy + .parquet pairs) into normal stores.

End to end: Tux Paint stores encoded by `m3jepa encode` are exported in clip-retrieval's layout, imported
back through the CLI and compared with the originals (features bit for bit, rows), trained on and
evaluated. Bad input (row counts, NaN, ndim, pickles, columns, shard numbering, repeated keys) is one line
naming the file and the fix; a killed import resumes to the same stores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m3jepa.data.wds import hash_split
from m3jepa.encode.import_source import SourceError
from m3jepa.encode.importer import ImportOptions, run_import
from m3jepa.store import open_store, store_path
from m3jepa.store.manifest import StoreError, load_manifest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ENCODERS = {"image": "efficientnet-lite0", "text": "minilm-l6"}


def m3jepa(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "m3jepa", *args], env=ENV, capture_output=True, text=True)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def write_clip_retrieval(folder: Path, shards: list[dict], pad: int = 1) -> Path:
    """clip-retrieval's inference output: img_emb/img_emb_N.npy, text_emb/text_emb_N.npy and
    metadata/metadata_N.parquet (N zero-padded to `pad`), one per entry of `shards`."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for n, shard in enumerate(shards):
        tag = str(n).zfill(pad)
        if shard.get("image") is not None:
            np.save(folder / f"img_emb/img_emb_{tag}.npy", shard["image"])
        if shard.get("text") is not None:
            np.save(folder / f"text_emb/text_emb_{tag}.npy", shard["text"])
        pq.write_table(pa.table(shard["metadata"]), folder / f"metadata/metadata_{tag}.parquet")
    return folder


def random_shards(n_shards: int = 2, rows: int = 50, dims=(12, 8), seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.standard_normal((rows, dims[0])).astype(np.float32),
             "text": rng.standard_normal((rows, dims[1])).astype(np.float32),
             "metadata": {"image_path": [f"imgs/{n}/{i}.jpg" for i in range(rows)],
                          "caption": [f"caption {n}-{i}" for i in range(rows)]}}
            for n in range(n_shards)]


def options(src: Path, root: Path, **kw) -> ImportOptions:
    return ImportOptions(source=src, dataset="cc-test", encoders={"image": "img-x", "text": "txt-y"},
                         store_root=root, shard_size=16, **kw)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def exported(lora_stores: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The Tux Paint stores of `m3jepa encode` (their pooled `features`) in clip-retrieval's layout, one
    shard per split, with a split column and each sample's group id as its key."""
    folder = tmp_path_factory.mktemp("clipret") / "embeddings"
    shards = []
    for split in ("train", "val", "test"):
        img = open_store(store_path(lora_stores, "tuxpaint", split, "image", ENCODERS["image"], "prefix3"))
        txt = open_store(store_path(lora_stores, "tuxpaint", split, "text", ENCODERS["text"], "prefix3"))
        assert list(img.rows.group_ids) == list(txt.rows.group_ids)  # one caption per stamp
        shards.append({"image": img.read_all(np.float16), "text": txt.read_all(np.float16),
                       "metadata": {"key": [str(g) for g in img.rows.group_ids],
                                    "caption": list(txt.rows.texts), "split": [split] * len(img)}})
    return write_clip_retrieval(folder, shards, pad=2), lora_stores


def test_an_encoded_store_exported_and_imported_is_the_same_store_and_trains(exported, tmp_path):
    folder, original = exported
    root, run = tmp_path / "stores", tmp_path / "run"
    res = m3jepa("stores", "import", str(folder), "--dataset", "tuxpaint-imported", "--store-root",
                 str(root), "--image-encoder", ENCODERS["image"], "--text-encoder", ENCODERS["text"],
                 "--split-column", "split", "--shard-size", "16")
    assert "next: m3jepa train-predictor --dataset tuxpaint-imported" in res.stdout
    for split in ("train", "val", "test"):
        for modality, enc in ENCODERS.items():
            a = open_store(store_path(original, "tuxpaint", split, modality, enc, "prefix3"))
            b = open_store(store_path(root, "tuxpaint-imported", split, modality, enc))
            assert np.array_equal(a.read_all(np.float16), b.read_all(np.float16)), (split, modality)
            assert list(a.rows.group_ids) == list(b.rows.group_ids)
            assert list(b.rows.sample_ids) == list(b.rows.group_ids)
            if modality == "text":
                assert list(a.rows.texts) == list(b.rows.texts)
            m = b.manifest
            assert (m.dim, m.dtype, m.kind, m.encoder) == (a.dim, "float16", "pooled", enc)
            assert m.encoder_revision.startswith("import:") and m.data_root == str(folder.resolve())
    assert m3jepa("stores", "verify", str(store_path(root, "tuxpaint-imported", "train", "text",
                                                     ENCODERS["text"]))).returncode == 0
    again = m3jepa("stores", "import", str(folder), "--dataset", "tuxpaint-imported", "--store-root",
                   str(root), "--image-encoder", ENCODERS["image"], "--text-encoder", ENCODERS["text"],
                   "--split-column", "split", "--shard-size", "16")
    assert again.stdout.count("(cached)") == 6
    sets = ["--set", "train.max_steps=6", "--set", "train.batch_size=16", "--set", "train.eval_every=3",
            "--set", "train.checkpoint_every=3", "--set", "model.dim=32", "--set", "model.hidden=32",
            "--set", "model.num_experts=2", "--set", "model.top_k=1", "--set", "model.cl_dim=16",
            "--set", f"encode.image_encoder=\"{ENCODERS['image']}\"",
            "--set", f"encode.text_encoder=\"{ENCODERS['text']}\"", "--set", "train.feed=\"store\""]
    m3jepa("train-predictor", "--dataset", "tuxpaint-imported", "--store-root", str(root), "--run",
           str(run), *sets)
    metrics = json.loads(m3jepa("evaluate", "--run", str(run), "--split", "test", "--json").stdout)
    assert json.dumps(metrics).count("R@1") >= 2
    # the source changes: the stores are refused until --force, and then the run refuses the new stores
    os.utime(folder / "metadata" / "metadata_00.parquet", ns=(1, 1))
    res = m3jepa("stores", "import", str(folder), "--dataset", "tuxpaint-imported", "--store-root",
                 str(root), "--image-encoder", ENCODERS["image"], "--text-encoder", ENCODERS["text"],
                 "--split-column", "split", "--shard-size", "16", check=False)
    assert res.returncode == 2 and "source files (or the import's options) changed" in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--force" in errors[0] and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- rules


def test_hash_split_rows_and_groups_follow_the_source(tmp_path):
    shards = random_shards()
    src = write_clip_retrieval(tmp_path / "src", shards)
    result = run_import(options(src, tmp_path / "st"))
    keys = shards[0]["metadata"]["image_path"] + shards[1]["metadata"]["image_path"]
    feats = {m: np.concatenate([s[m] for s in shards]) for m in ("image", "text")}
    for split in ("train", "val", "test"):
        want = [i for i, k in enumerate(keys) if hash_split(k, 0) == split]  # the webdataset rule
        assert result.counts[split] == len(want)
        for modality, enc in (("image", "img-x"), ("text", "txt-y")):
            store = open_store(store_path(tmp_path / "st", "cc-test", split, modality, enc))
            assert list(store.rows.sample_ids) == [keys[i] for i in want]
            np.testing.assert_array_equal(store.read_all(np.float32),
                                          feats[modality][want].astype(np.float16).astype(np.float32))
    text = open_store(store_path(tmp_path / "st", "cc-test", "train", "text", "txt-y"))
    assert text.rows.texts[0].startswith("caption ")


def test_plain_pairs_with_named_globs_and_one_split(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "pairs"
    src.mkdir()
    np.save(src / "image.npy", rng.standard_normal((30, 6)).astype(np.float64))
    np.save(src / "text.npy", rng.standard_normal((30, 4)).astype(np.float32))
    pq.write_table(pa.table({"id": list(range(30))}), src / "meta.parquet")
    opts = options(src, tmp_path / "st", key_column="id", split="val", dtype="float32",
                   globs={"image": "image.npy", "text": "text.npy", "metadata": "meta.parquet"})
    result = run_import(opts)
    assert result.counts == {"train": 0, "val": 30, "test": 0}
    store = open_store(store_path(tmp_path / "st", "cc-test", "val", "image", "img-x"))
    assert store.manifest.dtype == "float32" and list(store.rows.sample_ids) == [str(i) for i in range(30)]


def test_nan_rows_are_an_error_or_invalid_rows_with_skip_bad(tmp_path):
    shards = random_shards(n_shards=1, rows=40)
    shards[0]["text"][7, 2] = np.nan
    src = write_clip_retrieval(tmp_path / "src", shards)
    with pytest.raises(SourceError, match=r"text_emb_0\.npy row 7 holds NaN or inf.*--skip-bad"):
        run_import(options(src, tmp_path / "a"))
    result = run_import(options(src, tmp_path / "b", skip_bad=True))
    assert result.skipped == 1
    split = hash_split("imgs/0/7.jpg", 0)
    for modality, enc in (("image", "img-x"), ("text", "txt-y")):
        store = open_store(store_path(tmp_path / "b", "cc-test", split, modality, enc))
        row = list(store.rows.sample_ids).index("imgs/0/7.jpg")
        assert not store.rows.valid[row] and store.manifest.skipped[0]["sample_id"] == "imgs/0/7.jpg"


BAD = {
    "rows": (lambda s: s[1].update(text=s[1]["text"][:-1]),
             r"text_emb_1\.npy has 49 rows but .*metadata_1\.parquet has 50"),
    "ndim": (lambda s: s[0].update(image=s[0]["image"][:, :, None]), r"img_emb_0\.npy has shape .*ndim 3"),
    "pickle": (lambda s: s[0].update(image=np.array([{"a": 1}] * 50, dtype=object)),
               r"img_emb_0\.npy holds Python objects \(a pickle\)"),
    "ints": (lambda s: s[0].update(image=np.zeros((50, 12), dtype=np.int64)), r"holds int64, not float"),
    "key": (lambda s: [d["metadata"].pop("image_path") for d in s], r"none of the key columns.*--key-column"),
    "dims": (lambda s: s[1].update(image=s[1]["image"][:, :5]), r"img_emb_1\.npy is 5-d but .* is 12-d"),
    "repeat": (lambda s: s[1]["metadata"].update(image_path=s[0]["metadata"]["image_path"]),
               r"key 'imgs/0/0\.jpg' .* is used by two rows"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_naming_the_file_and_the_fix(tmp_path, case):
    shards = random_shards()
    BAD[case][0](shards)
    src = write_clip_retrieval(tmp_path / "src", shards)
    with pytest.raises(SourceError, match=BAD[case][1]) as e:
        run_import(options(src, tmp_path / "st"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "st").exists()  # nothing written before the whole source is checked


def test_shard_numbering(tmp_path):
    src = write_clip_retrieval(tmp_path / "src", random_shards(3))
    (src / "text_emb" / "text_emb_2.npy").unlink()
    with pytest.raises(SourceError, match=r"img_emb_2\.npy has no text file of shard 2 .*move img_emb_2"):
        run_import(options(src, tmp_path / "st"))
    for sub, name in (("img_emb", "img_emb_1.npy"), ("metadata", "metadata_1.parquet")):
        (src / sub / name).unlink()
    (src / "text_emb" / "text_emb_1.npy").rename(src / "text_emb" / "text_emb_2.npy")
    np.save(src / "img_emb" / "img_emb_2.npy", np.zeros((50, 12), np.float32))
    pq.write_table(pa.table({"image_path": [f"x{i}" for i in range(50)], "caption": ["c"] * 50}),
                   src / "metadata" / "metadata_2.parquet")
    with pytest.raises(SourceError, match=r"shard 1 is missing between 0 and 2.*--allow-gaps"):
        run_import(options(src, tmp_path / "st"))
    assert run_import(options(src, tmp_path / "st", allow_gaps=True)).counts["train"] > 0
    np.save(src / "img_emb" / "img_emb_02.npy", np.zeros((50, 12), np.float32))
    with pytest.raises(SourceError, match=r"are both shard 2"):
        run_import(options(src, tmp_path / "st2"))


def test_names_and_splits_that_are_refused(tmp_path):
    shards = random_shards()
    shards[0]["metadata"]["split"] = ["train"] * 49 + ["training"]
    shards[1]["metadata"]["split"] = ["val"] * 50
    src = write_clip_retrieval(tmp_path / "src", shards)
    with pytest.raises(SourceError, match=r"metadata_0\.parquet row 49: column 'split' is 'training'"):
        run_import(options(src, tmp_path / "st", split_column="split"))
    with pytest.raises(SourceError, match=r"'tuxpaint' is a dataset m3jepa encodes itself"):
        run_import(ImportOptions(source=src, dataset="tuxpaint", encoders={"image": "a", "text": "b"}))
    with pytest.raises(SourceError, match=r"--text-encoder NAME"):
        run_import(ImportOptions(source=src, dataset="x", encoders={"image": "a"}, store_root=tmp_path))
    run_import(options(src, tmp_path / "st", key_column="caption"))
    with pytest.raises(StoreError, match=r"changed since it was imported; pass --force"):
        run_import(options(src, tmp_path / "st", key_column="caption", seed=1))
    assert run_import(options(src, tmp_path / "st", key_column="caption", seed=1, force=True)).cached == []


def test_a_killed_import_resumes_to_the_same_stores(tmp_path):
    rng = np.random.default_rng(3)
    shards = [{"image": rng.standard_normal((10000, 16)).astype(np.float16),
               "text": rng.standard_normal((10000, 8)).astype(np.float16),
               "metadata": {"key": [f"k{n}-{i}" for i in range(10000)]}} for n in range(2)]
    src = write_clip_retrieval(tmp_path / "src", shards)
    args = [str(src), "--dataset", "killed", "--image-encoder", "a", "--text-encoder", "b",
            "--shard-size", "64"]
    store = store_path(tmp_path / "killed", "killed", "train", "image", "a")
    proc = subprocess.Popen([sys.executable, "-m", "m3jepa", "stores", "import", *args, "--store-root",
                             str(tmp_path / "killed")], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (store / "shards" / "00003.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not load_manifest(store).complete  # killed part way, not after the end
    m3jepa("stores", "import", *args, "--store-root", str(tmp_path / "killed"))
    m3jepa("stores", "import", *args, "--store-root", str(tmp_path / "clean"))
    for split in ("train", "val", "test"):
        for modality, enc in (("image", "a"), ("text", "b")):
            a = load_manifest(store_path(tmp_path / "killed", "killed", split, modality, enc))
            b = load_manifest(store_path(tmp_path / "clean", "killed", split, modality, enc))
            assert a.complete and a.shards == b.shards and a.rows_sha256 == b.rows_sha256
