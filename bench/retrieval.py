"""Evaluation and retrieval latency: COCO-5K-sized exact search, and one query through the predictor.

    python -m bench.retrieval

1. COCO 5K, multi-caption protocol: 25,000 captions × 5,000 images, d = 2048, top-10 both ways.
   reference  `topk_search` (float32 matmul + argpartition) once per direction
   fast       `coco_topk`: ONE bf16 product shared by both directions, float32 re-ranking of the
              candidates, certified by an error bound (identical output to the reference)
   also       plain bf16 top-k (no re-ranking): how often its ranking differs from float32
2. One text query → paper-preset predictor (bf16 / float32) → exact search of a 100,000-item gallery.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench import _common as C
from m3jepa.eval.fast_search import coco_topk, top_m
from m3jepa.eval.retrieval import topk_search
from m3jepa.model.predictor import PAPER_DIMS, M3JepaPredictor, paper_preset


def _unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _compare(refs, fasts, queries, galleries) -> tuple[int, bool]:
    """Rows where fast and reference rankings differ, and whether each such row only swaps items
    whose exact (float64) scores are within 1e-6: two float32 kernels may order those either way."""
    n_diff, all_ties = 0, True
    for ref, fast, q, g in zip(refs, fasts, queries, galleries, strict=True):
        for row in np.flatnonzero((ref != fast).any(axis=1)):
            n_diff += 1
            s_ref = g[ref[row]].astype(np.float64) @ q[row].astype(np.float64)  # (k,)
            s_fast = g[fast[row]].astype(np.float64) @ q[row].astype(np.float64)
            all_ties &= bool(np.abs(s_ref - s_fast).max() < 1e-6)
    return n_diff, all_ties


def coco(args, rng: np.random.Generator) -> dict:
    # Captions near their image (cosine ~0.5), as trained embeddings are, plus unrelated structure.
    images = _unit(5000, 2048, rng)
    captions = np.repeat(images, 5, axis=0) + 1.5 * _unit(25000, 2048, rng)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    stats: dict = {}
    state: dict = {}

    def reference() -> None:
        state["ref"] = (topk_search(captions, images, 10), topk_search(images, captions, 10))

    def fast() -> None:
        stats.clear()
        state["fast"] = coco_topk(captions, images, 10, stats=stats)

    def plain_bf16() -> None:
        s = torch.from_numpy(captions).bfloat16() @ torch.from_numpy(images).bfloat16().T  # (C, I)
        state["bf16"] = (top_m(s, 10)[1].numpy(), top_m(s.T.contiguous(), 10)[1].numpy())

    times = C.interleaved({"reference": reference, "fast": fast, "bf16": plain_bf16}, args.rounds, {})
    same, near_ties = _compare(state["ref"], state["fast"], (captions, images), (images, captions))
    bf16_rows = [float((a == b).all(1).mean()) for a, b in zip(state["ref"], state["bf16"], strict=True)]
    print(
        f"  COCO-5K both directions, seconds: reference {times['reference']}  fast {times['fast']}"
        f"  plain bf16 {times['bf16']}"
    )
    print(
        f"  speed-up fast/reference {C.ratio(times['reference'], times['fast'])};"
        f" rows ranked differently from the reference: {same}"
        f" (all float32 near-ties, gap < 1e-6: {near_ties}); rows re-searched exactly {stats}"
    )
    print(
        f"  plain bf16: rows ranked exactly as float32: t2i {100 * bf16_rows[0]:.1f}%,"
        f" i2t {100 * bf16_rows[1]:.1f}%"
    )
    return {
        "seconds": {k: v.to_json() for k, v in times.items()},
        "rows_differing": same,
        "differing_rows_are_near_ties": near_ties,
        "redone": dict(stats),
        "bf16_rows_identical": bf16_rows,
    }


def one_query(args, rng: np.random.Generator) -> dict:
    torch.manual_seed(0)
    model = M3JepaPredictor(paper_preset(), PAPER_DIMS).eval()
    gallery = torch.from_numpy(_unit(100_000, paper_preset().cl_dim, rng))  # (G, d_cl) image keys
    gallery_bf16 = gallery.bfloat16()
    text = torch.randn(1, PAPER_DIMS["text"])
    model_bf16 = M3JepaPredictor(paper_preset(), PAPER_DIMS).eval().bfloat16()
    model_bf16.load_state_dict({k: v.bfloat16() for k, v in model.state_dict().items()})

    @torch.inference_mode()
    def float32() -> None:
        q = model("text", text, "image").cl_query  # (1, d_cl)
        (gallery @ q[0]).topk(10)

    @torch.inference_mode()
    def bf16() -> None:
        q = model_bf16("text", text.bfloat16(), "image").cl_query  # (1, d_cl)
        (gallery_bf16 @ q[0]).topk(10)

    @torch.inference_mode()
    def search_only() -> None:
        (gallery_bf16 @ gallery_bf16[0]).topk(10)

    for f in (float32, bf16, search_only):
        f()
    times = C.interleaved(
        {"float32": float32, "bf16": bf16, "bf16_search_only": search_only},
        args.rounds,
        {"float32": 10, "bf16": 10, "bf16_search_only": 10},
    )
    ms = {k: C.Spread([1000 * x for x in v.values]) for k, v in times.items()}
    print(
        f"  one text query + 100k search, ms: float32 {ms['float32']}  bf16 {ms['bf16']}"
        f"  (bf16 search alone {ms['bf16_search_only']})"
    )
    return {"ms": {k: v.to_json() for k, v in ms.items()}}


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    C.setup(args)
    record = C.header("retrieval: COCO-5K exact search and one-query latency", C.measure_peak())
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    record["coco5k"] = coco(args, rng)
    record["one_query"] = one_query(args, rng)
    record["seconds_total"] = time.perf_counter() - t0
    record["load_1min_after"] = round(C.load_average(), 2)
    print(f"  load after: {record['load_1min_after']}")
    C.write_json(args.json, record)


if __name__ == "__main__":
    main()
