"""img2dataset → `m3jepa encode --dataset webdataset`, on shards written by the real producer.

A few Tux Paint stamps are served by Python's http.server on 127.0.0.1 (a free port, started here and
stopped by its PID); img2dataset (in its own venv, made by scripts/setup.sh: its pins clash with ours)
downloads them into WebDataset shards; m3jepa encodes those shards, and the same images and captions
through `--dataset jsonl`. The features must be equal, bit for bit. Why they can be:
- img2dataset runs with `--disable_all_reencoding True --encode_format png`: each `{key}.png` member holds
  the very bytes the server sent (checked below against the files, and against img2dataset's own sha256),
  so both datasets hand the image preprocessor the same bytes, hence the same pixels;
- its captions come from the url list's caption column, the same strings pairs.jsonl holds;
- both encodes run with one thread and batches of one row, so a row's features depend on its own input
  alone, not on which rows share its batch (the two datasets order rows differently: img2dataset writes a
  shard's samples in the order their downloads finish).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from m3jepa.store import open_store, store_path

VENV = Path(os.environ.get("M3JEPA_IMG2DATASET_VENV", Path.home() / ".cache" / "m3jepa-img2dataset"))
SPLITS = ("train", "val")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # 127.0.0.1 directly
    # no update check from albumentations (img2dataset imports it): nothing beyond 127.0.0.1 is reached
    return dict(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_PROXY="127.0.0.1",
                NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")


def _serve(folder: Path) -> tuple[subprocess.Popen, int]:
    """python -m http.server on 127.0.0.1, port 0 (the kernel picks a free one), and the port it got."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                             "--directory", str(folder)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=_env())
    line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
    try:
        return proc, int(line.split(" port ")[1].split()[0])
    except (IndexError, ValueError):
        proc.kill()
        raise RuntimeError(f"http.server did not say its port: {line!r}") from None


@pytest.fixture(scope="session")
def img2dataset_shards(tmp_path_factory, real_pngs) -> tuple[Path, Path, list[dict]]:
    """(shard folder, folder of the served images, url-list rows) after one img2dataset run."""
    exe = VENV / "bin" / "img2dataset"
    if not exe.is_file():
        pytest.skip(f"needs img2dataset in {VENV}: run scripts/setup.sh")
    tmp = tmp_path_factory.mktemp("img2dataset")
    www = tmp / "www"
    www.mkdir()
    rows = []
    for k, png in enumerate(real_pngs[:6]):
        name = f"stamp{k}.png"
        (www / name).write_bytes(png.read_bytes())
        rows.append({"name": name, "caption": f"A {png.stem.replace('_', ' ')}, stamp {k}.",
                     "split": SPLITS[k % 2]})
    server, port = _serve(www)
    try:
        urls = tmp / "urls.csv"
        with urls.open("w", newline="") as f:  # csv quotes the captions' commas
            table = csv.writer(f)
            table.writerow(["url", "caption", "split"])
            table.writerows([f"http://127.0.0.1:{port}/{r['name']}", r["caption"], r["split"]] for r in rows)
        out = tmp / "shards"
        done = subprocess.run(
            [str(exe), "--url_list", str(urls), "--input_format", "csv", "--url_col", "url",
             "--caption_col", "caption", "--save_additional_columns", '["split"]', "--output_format",
             "webdataset", "--output_folder", str(out), "--number_sample_per_shard", "4",
             "--processes_count", "1", "--thread_count", "4", "--resize_mode", "no",
             "--disable_all_reencoding", "True", "--encode_format", "png", "--encode_quality", "9",
             "--enable_wandb", "False"],
            capture_output=True, text=True, env=_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return out, www, rows


def _m3jepa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m3jepa", *args], capture_output=True, text=True,
                          env=_env(), timeout=600)


@pytest.mark.slow
def test_img2dataset_shards_encode_as_the_same_images_through_jsonl(img2dataset_shards, tmp_path):
    shards, www, rows = img2dataset_shards
    # img2dataset's layout: two shards of up to 4 samples, each with a parquet and a stats file beside it
    assert sorted(p.name for p in shards.iterdir() if p.suffix in (".tar", ".parquet")) == [
        "00000.parquet", "00000.tar", "00001.parquet", "00001.tar"]
    assert (shards / "00000_stats.json").is_file()
    by_key = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t if m.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                key = name[: -len(".json")]
                png = members[f"{key}.png"]
                source = www / meta["url"].rsplit("/", 1)[1]
                assert png == source.read_bytes()  # not re-encoded: the server's bytes
                assert meta["sha256"] == hashlib.sha256(png).hexdigest()
                by_key[key] = (source, meta)
    assert len(by_key) == len(rows) == 6

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    shutil.copytree(www, pairs / "img")  # the very files the server sent
    lines = [json.dumps({"id": key, "image": f"img/{source.name}", "caption": meta["caption"],
                         "split": meta["split"]}) for key, (source, meta) in sorted(by_key.items())]
    (pairs / "pairs.jsonl").write_text("\n".join(lines) + "\n")

    common = ["--split", ",".join(SPLITS), "--modality", "image,text", "--threads", "1", "--workers", "1",
              "--set", "encode.batch_size=1", "--shard-size", "2"]
    stores = tmp_path / "stores"
    a = _m3jepa("encode", "--dataset", "webdataset", "--root", str(shards), "--split-field", "split",
                "--store-root", str(stores), *common)
    assert a.returncode == 0, a.stderr[-3000:]
    b = _m3jepa("encode", "--dataset", "jsonl", "--root", str(pairs), "--store-root", str(stores), *common)
    assert b.returncode == 0, b.stderr[-3000:]
    for split in SPLITS:
        for modality, encoder in (("image", "efficientnet-lite0"), ("text", "minilm-l6")):
            got = open_store(store_path(stores, "webdataset", split, modality, encoder, data_root=shards))
            want = open_store(store_path(stores, "jsonl", split, modality, encoder, data_root=pairs))
            assert len(got) == len(want) == 3
            order = {g: i for i, g in enumerate(want.rows.group_ids)}
            rows_in_want_order = [order[g] for g in got.rows.group_ids]  # keys in the shards' order
            assert sorted(rows_in_want_order) == [0, 1, 2]
            assert np.array_equal(got.read_all(np.float32), want.read_all(np.float32)[rows_in_want_order])
