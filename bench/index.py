"""Search indexes: a 1M-item gallery built and queried, and one Tux Paint query through the predictor.

    python -m bench.index [--rows 1000000] [--dim 512] [--run runs/tuxpaint] [--json out.json]

1. Synthetic gallery (`clustered`): 1,000 centres drawn from N(0, I_d) and normalised; each of `rows`
   items is a random centre plus N(0, 0.8^2 / d · I_d) noise, normalised (cosine to its centre ~0.78).
   `m3jepa.search.choose(rows, dim, "auto", 4GB)` picks the index, `build` trains it and tunes nprobe on
   1,000 perturbed gallery rows to recall@10 >= 0.95 against exact search (faiss.knn). Reported: build
   seconds, peak resident memory, index bytes, recall@10, and single-query latency (p50/p95) of the
   index next to exact search (IndexFlatIP) over the same gallery.
2. With --run (a Tux Paint run, `m3jepa run tuxpaint`): the real stamp images of all splits (785 in the
   default run) through `embed_target`, hidden among synthetic 128-d distractors made the same way (to
   `rows` in all); the test split's captions through `embed_query` are the queries. nprobe (efSearch)
   is tuned on the train and val captions, so the recall@10 against exact search reported on the test
   captions is held out (`heldout_curve`: that recall at each setting the tuning tried).
   Per query, measured one at a time: the predictor from the stored MiniLM latent + search, and the raw
   caption (MiniLM + predictor) + search, each with the approximate index and with exact search; the
   query path (`embed_query`: `M3JepaPredictor.query`, the cl task alone) next to the plain forward it
   replaced (`plain_query`), at 1-32 rows too; faiss with its default threads and with one. `--also
   IVF1024,Flat` (or HNSW32) builds and measures another index the same way.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import faiss
import numpy as np

from bench import _common as C
from m3jepa.search.build import build, perturbed_queries, recall_at_k
from m3jepa.search.plan import IndexPlan, choose, parse_bytes

CLUSTERS = 1000
SPREAD = 0.8


def clustered(rows: int, dim: int, seed: int = 0, block: int = 100_000) -> np.ndarray:
    """(rows, dim) float32 unit rows around CLUSTERS random unit centres (the generator in the docstring)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((rows, dim), np.float32)
    for s in range(0, rows, block):
        n = min(block, rows - s)
        x = centres[rng.integers(0, CLUSTERS, n)] + rng.standard_normal((n, dim), np.float32) * (
            SPREAD / np.sqrt(dim))
        out[s:s + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def latencies_ms(fn, n: int) -> dict[str, float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"p50": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))], "n": n}


def synthetic(rows: int, dim: int, budget: str) -> dict:
    t0 = time.perf_counter()
    x = clustered(rows, dim)
    gen_s = time.perf_counter() - t0
    rss0 = peak_rss_gb()
    plan = choose(rows, dim, "auto", parse_bytes(budget))
    queries = perturbed_queries(x, 1000, seed=1)
    built = build(x, plan, queries, "perturbed gallery rows")
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    q = queries[:200]
    approx_lat = latencies_ms(lambda i: built.index.search(q[i:i + 1], 10), 200)
    exact_lat = latencies_ms(lambda i: exact.search(q[i:i + 1], 10), 20)
    return {"rows": rows, "dim": dim, "generate_s": round(gen_s, 1), "factory": plan.factory,
            "search_params": built.search_params, "build_s": round(built.seconds, 1),
            "recall@10": built.recall["value"], "tuning": built.recall["tuning"],
            "peak_rss_gb_before_build": round(rss0, 2), "peak_rss_gb": round(peak_rss_gb(), 2),
            "index_bytes_est": plan.est_bytes, "query_ms_index": approx_lat, "query_ms_exact": exact_lat}


def plain_query(model, latents: np.ndarray) -> np.ndarray:
    """The query path before `M3JepaPredictor.query`: the whole forward (both tasks, the prediction head,
    sparse dispatch for one row), its cl_query normalised, as `embed_query` computed it (reference)."""
    import torch

    with torch.no_grad(), model.runtime.autocast():
        out = model.objective.predictor("text", torch.as_tensor(latents).to(model.device), "image")
    return torch.nn.functional.normalize(out.cl_query.float(), dim=-1).cpu().numpy()  # (N, d)


def one_thread(fn):
    """`fn` with faiss on one OpenMP thread (one query gains nothing from a parallel region)."""
    def run(i):
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return fn(i)
        finally:
            faiss.omp_set_num_threads(before)
    return run


def by_rows(model, latents: np.ndarray, b: int) -> dict[str, float]:
    """p50 ms of the query path and of the plain forward on b latent rows at a time."""
    n = len(latents)

    def rows(i):
        return latents[i % (n - b):i % (n - b) + b]

    return {"query": latencies_ms(lambda i: model.embed_query(source="text", target="image",
                                                              latents=rows(i)), n)["p50"],
            "plain": latencies_ms(lambda i: plain_query(model, rows(i)), n)["p50"]}


def index_latencies(index, model, queries: np.ndarray, latents: np.ndarray, captions: list[str]) -> dict:
    """Per-query latencies through `index`: the search alone, from the stored latent (query path and
    plain forward), from the raw caption; faiss with its default threads and with one."""
    n = len(queries)

    def search(i):
        return index.search(queries[i:i + 1], 10)

    def latent(i):
        return index.search(model.embed_query(source="text", target="image", latents=latents[i:i + 1]), 10)

    def plain(i):
        return index.search(plain_query(model, latents[i:i + 1]), 10)

    def caption(i):
        return index.search(model.embed_query([captions[i]], source="text", target="image"), 10)

    return {"search_ms": latencies_ms(search, n),
            "search_ms_faiss_1_thread": latencies_ms(one_thread(search), n),
            "latent_ms": latencies_ms(latent, n),
            "latent_ms_faiss_1_thread": latencies_ms(one_thread(latent), n),
            "latent_ms_plain_predictor": latencies_ms(plain, n),
            "caption_ms": latencies_ms(caption, n),
            "caption_ms_faiss_1_thread": latencies_ms(one_thread(caption), n)}


def extra_plan(factory: str) -> IndexPlan:
    """An IndexPlan for `--also FACTORY` (IVF<nlist>,Flat or HNSW<M>)."""
    if factory.startswith("IVF"):
        return IndexPlan("ivf-flat", factory, {"nlist": int(factory[3:].split(",")[0])})
    return IndexPlan("hnsw", factory, {})


def heldout_curve(built, queries: np.ndarray, exact_top: np.ndarray) -> list[list[float]]:
    """[setting, recall@10 on the held-out `queries`] at each search setting the tuning tried; the index
    is left at its tuned setting."""
    from m3jepa.search.build import set_search_params

    name = next(iter(built.search_params), None)
    curve = []
    for value, _ in built.recall["tuning"]:
        set_search_params(built.index, {name: value})
        curve.append([value, recall_at_k(built.index.search(queries, 10)[1], exact_top)])
    set_search_params(built.index, built.search_params)
    return curve


def tuxpaint(run: Path, rows: int, factories: list[str]) -> dict:
    from m3jepa.api import load
    from m3jepa.core.paired import modality_store
    from m3jepa.store import open_store

    model = load(run, device="cpu")

    def split_latents(split: str, modality: str) -> np.ndarray:
        return open_store(modality_store(model.cfg, split, modality)).read_all()

    real = np.concatenate([model.embed_target(modality="image", latents=split_latents(s, "image"))
                           for s in ("train", "val", "test")])  # (R, 128): R real images
    dim = real.shape[1]
    gallery = np.concatenate([real, clustered(rows - len(real), dim, seed=2)])  # (rows, 128)
    text = open_store(modality_store(model.cfg, "test", "text"))
    latents, captions = text.read_all(), list(text.rows.texts)  # (79, 384)
    queries = model.embed_query(source="text", target="image", latents=latents)  # (79, 128)
    # nprobe is tuned on the train and val captions; recall is reported on the held-out test captions
    tune = model.embed_query(source="text", target="image", latents=np.concatenate(
        [split_latents(s, "text") for s in ("train", "val")]))  # (706, 128)
    exact = faiss.IndexFlatIP(dim)
    exact.add(gallery)
    exact_top = exact.search(queries, 10)[1]
    model.embed_query([captions[0]], source="text", target="image")  # load MiniLM before timing
    n = len(queries)
    out = {"gallery": f"{len(real)} real image embeddings + {len(gallery) - len(real)} synthetic, d={dim}",
           "queries": n, "tuning_queries": f"{len(tune)} train+val captions (text->image embed_query)",
           "query_vs_plain_max_abs_diff_one_row": max(float(np.abs(model.embed_query(
               source="text", target="image", latents=latents[i:i + 1]) - plain_query(
               model, latents[i:i + 1])).max()) for i in range(n)),
           "predictor_only_latent_ms": latencies_ms(lambda i: model.embed_query(
               source="text", target="image", latents=latents[i:i + 1]), n),
           "predictor_plain_latent_ms": latencies_ms(lambda i: plain_query(model, latents[i:i + 1]), n),
           "predictor_by_rows_ms": {b: by_rows(model, latents, b) for b in (1, 2, 4, 8, 32)},
           "latent_ms_exact": latencies_ms(lambda i: exact.search(model.embed_query(
               source="text", target="image", latents=latents[i:i + 1]), 10), n),
           "caption_ms_exact": latencies_ms(lambda i: exact.search(model.embed_query(
               [captions[i]], source="text", target="image"), 10), n),
           "indexes": []}
    for plan in [choose(len(gallery), dim, "auto", parse_bytes("4GB"))] + [extra_plan(f) for f in factories]:
        built = build(gallery, plan, tune, out["tuning_queries"])
        row = {"factory": plan.factory, "search_params": built.search_params,
               "build_s": round(built.seconds, 1), "recall@10_tuning": built.recall["value"],
               "tuning": built.recall["tuning"],
               "recall@10": recall_at_k(built.index.search(queries, 10)[1], exact_top),
               "heldout_curve": heldout_curve(built, queries, exact_top)}
        row.update(index_latencies(built.index, model, queries, latents, captions))
        out["indexes"].append(row)
        del built
    return out


def main() -> None:
    p = C.parser(__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--memory-budget", default="4GB")
    p.add_argument("--run", type=Path, default=None, help="a Tux Paint run for part 2")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--also", action="append", default=[], metavar="FACTORY",
                   help="part 2: also build this faiss factory (IVF1024,Flat, HNSW32), tuned the same way")
    args = p.parse_args()
    C.setup(args)
    out = {"load_before": C.load_average(), "faiss_threads": faiss.omp_get_max_threads()}
    if not args.skip_synthetic:
        out["synthetic"] = synthetic(args.rows, args.dim, args.memory_budget)
        out["load_after_synthetic"] = C.load_average()
    if args.run:
        out["tuxpaint"] = tuxpaint(args.run, args.rows, args.also)
        out["load_after_tuxpaint"] = C.load_average()
    import json

    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
