"""`stores import` at scale: import, train-from-store, index and search against rows (issue 18 part 6).

    python -m bench.import_scale --rows 10000,100000,1000000 --workdir /tmp/m3jepa-scale

For each row count: synthetic embeddings at the offline encoders' dims (EfficientNet-Lite0 1280-d image,
MiniLM-L6 384-d text; float16, as clip-retrieval writes them) in clip-retrieval's layout (shards of
250,000 rows; a split column: 5,000 val and 5,000 test rows, a tenth each below 50,000, the rest train),
then each stage as its own `m3jepa` process, timed, with its peak RSS (ru_maxrss of RUSAGE_CHILDREN,
taken in a fresh helper process per stage, so it is that stage's own high-water mark):
- `m3jepa stores import` (float16 stores, shards of 2048 rows, local disk);
- `m3jepa train-predictor` for a fixed number of steps with train.feed = "store" (rows read from the store
  shards per batch, never all in RAM), the tuxpaint pipeline's predictor (d 256, h 512, 12 experts, top-4);
- `m3jepa index --run --split train --modality image` (every train image row through the predictor, then
  faiss);
- search (`measure_search`): `m3jepa search --latents` with 1 and 100 of the test split's caption
  embeddings (queries embedded by the tool that made the store, as a user of imported embeddings does;
  `--text` rightly refuses to embed a raw caption with the installed minilm-l6 for a model trained on
  imported embeddings, whose encoder_revision is "import:..."), each process timed with its own peak RSS,
  then the Searcher in process: 200 single queries (median, p90) and one batch of 1,000.
The stores live on local disk (WORK/rowsN/stores), or with `--store-root s3://BUCKET/PREFIX` in a bucket
(PREFIX/rowsN per size): import writes them there and train-predictor and index read them from there.
Without AWS_ENDPOINT_URL in the environment the bench starts moto's S3 server on 127.0.0.1 itself
(bench/s3server.py), makes the bucket, and reports the server's peak RSS (moto keeps objects under 5 MB
in memory and spools larger ones to temporary files). `--store-cache DIR` trains through fsspec's file cache
in front of the bucket (encode.store_cache) instead of a ranged GET per row.
The work folder (and the stores in the bucket) of each size is removed after it is measured unless --keep.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from m3jepa.location import listing, location, remove_tree

DIMS = {"image": 1280, "text": 384}  # EfficientNet-Lite0 pooled, MiniLM-L6 mean-pooled
ENCODERS = {"image": "efficientnet-lite0", "text": "minilm-l6"}
SHARD_ROWS = 250_000
HELD_OUT = 5_000  # val rows and test rows each (a tenth of the rows each, when fewer)


def write_source(folder: Path, rows: int, seed: int = 0) -> None:
    """clip-retrieval's layout with `rows` synthetic pairs (a caption's embedding: its image's, mapped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    mapping = rng.standard_normal((DIMS["image"], DIMS["text"])).astype(np.float32) / 36
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, rows, SHARD_ROWS)):
        end = min(start + SHARD_ROWS, rows)
        img = np.lib.format.open_memmap(folder / f"img_emb/img_emb_{n}.npy", "w+", np.float16,
                                        (end - start, DIMS["image"]))
        txt = np.lib.format.open_memmap(folder / f"text_emb/text_emb_{n}.npy", "w+", np.float16,
                                        (end - start, DIMS["text"]))
        for a in range(0, end - start, 16384):
            b = min(a + 16384, end - start)
            x = rng.standard_normal((b - a, DIMS["image"]), dtype=np.float32)
            img[a:b] = x
            txt[a:b] = x @ mapping + 0.5 * rng.standard_normal((b - a, DIMS["text"]), dtype=np.float32)
        img.flush()
        txt.flush()
        del img, txt
        ids, held = np.arange(start, end), min(HELD_OUT, rows // 10)
        split = np.where(ids >= rows - held, "test", np.where(ids >= rows - 2 * held, "val", "train"))
        table = {"key": [f"s{i:08d}" for i in ids], "caption": [f"synthetic {i}" for i in ids],
                 "split": split.tolist()}
        pq.write_table(pa.table(table), folder / f"metadata/metadata_{n}.parquet")


def timed(args: list[str]) -> dict:
    """Run `m3jepa ARGS` at low priority; seconds and the process's peak RSS (wait4)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(["nice", sys.executable, "-m", "m3jepa", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"m3jepa {' '.join(args[:2])} failed:\n{err[-3000:]}")
    # communicate() reaped the child; RUSAGE_CHILDREN holds the largest peak of any child waited for so
    # far, so each stage runs in a fresh interpreter of its own (see main)
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak), "stdout": out[-2000:]}


def stores_of(work: Path, rows: int, store_root: str | None) -> str:
    """Where one size's stores live: WORK/stores, or STORE_ROOT/rowsN (a URL: s3://bucket/prefix)."""
    return str(work / "stores") if store_root is None else f"{store_root.rstrip('/')}/rows{rows}"


def stores_mb(stores: str) -> int:
    """The stores' bytes, from one listing (a folder's lstat sizes, or the bucket's object sizes)."""
    return round(sum(e.size for e in listing(location(stores)).values()) / 2**20)


def bucket_server(store_root: str | None):  # -> S3Server | None
    """moto's S3 server on 127.0.0.1 with the bucket of an s3:// STORE_ROOT, its endpoint and test
    credentials in this process's environment (so in every stage's); None for a local root, or where
    AWS_ENDPOINT_URL already names a server."""
    if store_root is None or not store_root.startswith("s3://") or os.environ.get("AWS_ENDPOINT_URL"):
        return None
    from bench.s3server import S3Server

    server = S3Server().start()
    atexit.register(server.stop)  # by its PID, also when a stage fails (SystemExit)
    os.environ.update(server.env())
    server.make_bucket(store_root.removeprefix("s3://").split("/", 1)[0])
    return server


def peak_rss_mb(pid: int) -> int | None:
    """A live process's peak RSS (VmHWM), in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(round(int(x.split()[1]) / 1024) for x in f if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def measure_one(stage: str, rows: int, work: Path, steps: int, store_root: str | None = None,
                store_cache: str | None = None) -> dict:
    """One stage at one size, in this (fresh) process."""
    src, stores, run = work / "source", stores_of(work, rows, store_root), work / "run"
    encoders = ["--image-encoder", ENCODERS["image"], "--text-encoder", ENCODERS["text"]]
    if stage == "import":
        return timed(["stores", "import", str(src), "--dataset", "synthetic-scale", "--store-root",
                      str(stores), *encoders, "--split-column", "split"])
    if stage == "train":
        sets = {"encode.dataset": '"synthetic-scale"', "encode.store_root": f'"{stores}"',
                "encode.image_encoder": f'"{ENCODERS["image"]}"',
                "encode.text_encoder": f'"{ENCODERS["text"]}"',
                "train.feed": '"store"', "train.max_steps": steps, "train.epochs": 1000,
                "train.eval_every": steps, "train.checkpoint_every": steps, "train.batch_size": 128,
                "train.num_threads": 1}
        if store_cache:  # fsspec's whole-file cache in front of the bucket (encode.store_cache)
            sets["encode.store_cache"] = f'"{store_cache}"'
        args = ["train-predictor", "--pipeline", "tuxpaint", "--run", str(run)]
        for k, v in sets.items():
            args += ["--set", f"{k}={v}"]
        return timed(args)
    if stage == "index":
        return timed(["index", "--run", str(run), "--split", "train", "--modality", "image", "--out",
                      str(work / "train.index")])
    if stage == "search":
        return measure_search(rows, work)
    raise ValueError(stage)


# ---------------------------------------------------------------- the search stage

SEARCH_SINGLE = 200  # single queries timed in process
SEARCH_BATCH = 1_000  # rows of the one batch timed in process
SEARCH_CLI = (1, 100)  # query rows of each timed `m3jepa search --latents` process


def held_out_text_rows(source: Path, rows: int, n: int) -> np.ndarray:
    """(n, 384) float16: the first n test-split caption embeddings of the synthetic source (the test split
    is the last rows; see write_source), as a user's own tool would have embedded the queries."""
    held = min(HELD_OUT, rows // 10)
    first = rows - held
    n = min(n, held)
    shard, offset = divmod(first, SHARD_ROWS)
    out = []
    while sum(len(x) for x in out) < n:
        emb = np.load(source / f"text_emb/text_emb_{shard}.npy", mmap_mode="r")
        out.append(np.array(emb[offset:offset + n - sum(len(x) for x in out)]))
        shard, offset = shard + 1, 0
    return np.concatenate(out)


def timed_own(args: list[str]) -> dict:
    """`m3jepa ARGS` at low priority: wall seconds and that process's own peak RSS (wait4's rusage, so
    several runs in one process each report their own)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["nice", sys.executable, "-m", "m3jepa", *args], env=env, stdout=out,
                                stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"m3jepa {' '.join(args[:2])} failed (exit {proc.returncode}):\n{errors[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024), "stdout": text}


def measure_search(rows: int, work: Path, k: int = 10) -> dict:
    """After `index`: `m3jepa search --latents` as a whole process (1 and 100 query rows), then the
    Searcher in this process: SEARCH_SINGLE single queries (median, p90) and one batch of SEARCH_BATCH,
    torch and faiss on one thread (`--threads 1`, the fastest for single queries here), and this
    process's peak RSS."""
    import resource

    index = work / "train.index"
    queries = held_out_text_rows(work / "source", rows, max(SEARCH_BATCH, SEARCH_SINGLE, *SEARCH_CLI))
    result: dict = {"k": k}
    for n in SEARCH_CLI:
        path = work / f"queries{n}.npy"
        np.save(path, queries[:n])
        r = timed_own(["search", "--index", str(index), "--latents", str(path), "--source", "text", "--k",
                       str(k), "--threads", "1", "--device", "cpu"])
        result[f"cli_{n}"] = {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"]}
        if n == 1:
            # main prints the top lines: the gallery line, the table's header, the first hit
            result["stdout"] = "\n".join(line for line in r["stdout"].splitlines()
                                         if line.strip() and not line.startswith("query "))
    import faiss
    import torch

    from m3jepa.search import Searcher

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    searcher = Searcher.open(index, device="cpu")
    result["open_seconds"] = round(time.perf_counter() - t0, 2)
    m = searcher.index.manifest
    result["index"] = {key: m.get(key) for key in ("kind", "factory", "search_params", "rows", "dim")}
    searcher.query_latents("text", queries[:1], k=k)  # warm: first-call allocations are not a query's
    single = []
    for row in queries[:SEARCH_SINGLE]:
        t0 = time.perf_counter()
        searcher.query_latents("text", row[None], k=k)  # (1, 384)
        single.append((time.perf_counter() - t0) * 1e3)
    result["single_ms"] = {"n": len(single), "median": round(float(np.median(single)), 2),
                           "p90": round(float(np.percentile(single, 90)), 2)}
    batch = queries[:SEARCH_BATCH]
    t0 = time.perf_counter()
    searcher.query_latents("text", batch, k=k)  # (n, 384)
    seconds = time.perf_counter() - t0
    result[f"batch_{len(batch)}"] = {"seconds": round(seconds, 3),
                                     "ms_per_query": round(seconds * 1e3 / len(batch), 3)}
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="10000,100000,1000000")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--workdir", default="/tmp/m3jepa-import-scale")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--store-root", metavar="URL", help="The stores' root: s3://BUCKET/PREFIX puts them in a "
                    "bucket (moto's server on 127.0.0.1, started here, unless AWS_ENDPOINT_URL names one); "
                    "default: WORK/rowsN/stores on local disk.")
    ap.add_argument("--store-cache", metavar="DIR", help="With a URL --store-root: train through this local "
                    "read cache (encode.store_cache; emptied before each size, then left). Default: none.")
    ap.add_argument("--stages", default="import,train,index,search",
                    help="Which stages to measure, in order.")
    ap.add_argument("--write-source", metavar="DIR", help="Only write a synthetic clip-retrieval folder "
                    "of the first --rows rows at DIR (docs/feature-store.md's example) and stop.")
    ap.add_argument("--one", nargs=3, metavar=("STAGE", "ROWS", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # a child measuring one stage, so RUSAGE_CHILDREN is that stage's alone
        stage, rows, work = args.one
        print(json.dumps(measure_one(stage, int(rows), Path(work), args.steps, args.store_root,
                                     args.store_cache)))
        return
    sizes = [int(r) for r in args.rows.split(",")]
    if args.write_source:
        write_source(Path(args.write_source), sizes[0])
        return
    print(f"# load before: {os.getloadavg()}", flush=True)
    server = bucket_server(args.store_root)  # stopped at exit
    for rows in sizes:
        work = Path(args.workdir) / f"rows{rows}"
        shutil.rmtree(work, ignore_errors=True)
        if args.store_cache:
            shutil.rmtree(args.store_cache, ignore_errors=True)  # each size starts with an empty cache
        t0 = time.perf_counter()
        write_source(work / "source", rows)
        result = {"rows": rows, "source_seconds": round(time.perf_counter() - t0, 1)}
        stages = args.stages.split(",")
        for stage in stages:
            root = ["--store-root", args.store_root] if args.store_root else []
            root += ["--store-cache", args.store_cache] if args.store_cache else []
            child = subprocess.run([sys.executable, "-m", "bench.import_scale", "--steps", str(args.steps),
                                    *root, "--one", stage, str(rows), str(work)],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                raise SystemExit(child.stderr[-3000:])
            r = json.loads(child.stdout.strip().splitlines()[-1])
            result[stage] = {k: v for k, v in r.items() if k != "stdout"}
            if stage == "search":
                result["search"]["hits"] = r["stdout"].strip().splitlines()[:3]
        stores = stores_of(work, rows, args.store_root)
        result["store_mb"], result["stores"] = stores_mb(stores), stores
        if server is not None:
            result["moto_peak_rss_mb"] = peak_rss_mb(server.proc.pid)
        result["load"] = os.getloadavg()
        print(json.dumps(result), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            remove_tree(location(stores))  # a bucket's objects too: moto holds them in memory and /tmp


if __name__ == "__main__":
    main()
