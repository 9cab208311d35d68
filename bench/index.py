"""Search indexes: a 1M-item gallery built and queried, and one Tux Paint query through the predictor.

    python -m bench.index [--rows 1000000] [--dim 512] [--run runs/tuxpaint] [--json out.json]

1. Synthetic gallery (`clustered`): 1,000 centres drawn from N(0, I_d) and normalised; each of `rows`
   items is a random centre plus N(0, 0.8^2 / d · I_d) noise, normalised (cosine to its centre ~0.78).
   `m3jepa.search.choose(rows, dim, "auto", 4GB)` picks the index, `build` trains it and tunes nprobe on
   1,000 perturbed gallery rows to recall@10 >= 0.95 against exact search (faiss.knn). Reported: build
   seconds, peak resident memory, index bytes, recall@10, and single-query latency (p50/p95) of the
   index next to exact search (IndexFlatIP) over the same gallery.
2. With --run (a Tux Paint run, `m3jepa run tuxpaint`): the 785 real stamp images of all splits through
   `embed_target`, hidden in `rows - 785` synthetic 128-d distractors made the same way; the test split's
   79 captions through `embed_query` are the queries (recall@10 of the index vs exact search on them).
   Per query, measured one at a time: the predictor from the stored MiniLM latent + search, and the raw
   caption (MiniLM + predictor) + search, each with the approximate index and with exact search.
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
from m3jepa.search.plan import choose, parse_bytes

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


def tuxpaint(run: Path, rows: int) -> dict:
    from m3jepa.api import load
    from m3jepa.core.paired import modality_store
    from m3jepa.store import open_store

    model = load(run, device="cpu")
    real = np.concatenate([model.embed_target(modality="image", latents=open_store(
        modality_store(model.cfg, s, "image")).read_all()) for s in ("train", "val", "test")])  # (785, 128)
    dim = real.shape[1]
    gallery = np.concatenate([real, clustered(rows - len(real), dim, seed=2)])  # (rows, 128)
    text = open_store(modality_store(model.cfg, "test", "text"))
    latents, captions = text.read_all(), list(text.rows.texts)  # (79, 384)
    queries = model.embed_query(source="text", target="image", latents=latents)  # (79, 128)
    plan = choose(len(gallery), dim, "auto", parse_bytes("4GB"))
    built = build(gallery, plan, queries, f"{len(queries)} real test captions (text->image embed_query)")
    exact = faiss.IndexFlatIP(dim)
    exact.add(gallery)
    exact_top = exact.search(queries, 10)[1]
    found = built.index.search(queries, 10)[1]
    model.embed_query([captions[0]], source="text", target="image")  # load MiniLM before timing
    n = len(queries)

    def from_latent(index):
        return lambda i: index.search(model.embed_query(source="text", target="image",
                                                        latents=latents[i:i + 1]), 10)

    def from_caption(index):
        return lambda i: index.search(model.embed_query([captions[i]], source="text", target="image"), 10)

    return {"gallery": f"{len(real)} real image embeddings + {len(gallery) - len(real)} synthetic, d={dim}",
            "factory": plan.factory, "search_params": built.search_params, "build_s": round(built.seconds, 1),
            "recall@10": recall_at_k(found, exact_top), "queries": n,
            "latent_ms_index": latencies_ms(from_latent(built.index), n),
            "latent_ms_exact": latencies_ms(from_latent(exact), n),
            "caption_ms_index": latencies_ms(from_caption(built.index), n),
            "caption_ms_exact": latencies_ms(from_caption(exact), n),
            "predictor_only_latent_ms": latencies_ms(lambda i: model.embed_query(
                source="text", target="image", latents=latents[i:i + 1]), n)}


def main() -> None:
    p = C.parser(__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--memory-budget", default="4GB")
    p.add_argument("--run", type=Path, default=None, help="a Tux Paint run for part 2")
    p.add_argument("--skip-synthetic", action="store_true")
    args = p.parse_args()
    C.setup(args)
    out = {"load_before": C.load_average(), "faiss_threads": faiss.omp_get_max_threads()}
    if not args.skip_synthetic:
        out["synthetic"] = synthetic(args.rows, args.dim, args.memory_budget)
        out["load_after_synthetic"] = C.load_average()
    if args.run:
        out["tuxpaint"] = tuxpaint(args.run, args.rows)
        out["load_after_tuxpaint"] = C.load_average()
    import json

    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
