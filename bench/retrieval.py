"""Evaluation and retrieval latency: COCO-5K-sized exact search, and one query through the predictor.

    python -m bench.retrieval

1. COCO 5K, multi-caption protocol: 25,000 captions × 5,000 images, d = 2048, R@1/5/10 both ways,
   on an easy (cosine 0.55, all recalls 100%) and a hard (R@1 ≈ 9–19%) synthetic set.
   reference  `retrieval_metrics(use_faiss=False)` (float32 matmul top-k) once per direction
   fast       `cross_retrieval_metrics`: ONE product for both directions (int8 where it decides,
              bf16 otherwise), exact ranks of the correct items (search.exact_ranks); the recalls
              must be identical; also with the int8 stage off (M3JEPA_INT8=0)
   also       the bf16 product alone (the floor of the fast path)
2. Memory bandwidth; one text query → paper-preset predictor (bf16 / float32) → exact search of a
   100,000-item gallery.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import numpy as np
import torch

from bench import _common as C
from m3jepa.accel.search import exact_ranks
from m3jepa.eval.retrieval import cross_retrieval_metrics, retrieval_metrics
from m3jepa.model.predictor import PAPER_DIMS, M3JepaPredictor, paper_preset


def _unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _coco_data(noise: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """5,000 images and 5 captions each, caption = image + noise·(random unit vector), normalised."""
    images = _unit(5000, 2048, rng)
    captions = np.repeat(images, 5, axis=0) + noise * _unit(25000, 2048, rng)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    return captions, images, np.repeat(np.arange(5000), 5), np.arange(5000)


def coco(args, rng: np.random.Generator) -> dict:
    # easy: caption–image cosine ≈ 0.55, every recall 100%, nothing near the correct item's score.
    # hard: cosine ≈ 0.05 in a bulk of σ ≈ 0.022, R@1 ≈ 9–19%: the worst case for the bf16 band.
    return {
        name: _coco_case(args, name, *_coco_data(noise, rng))
        for name, noise in (("easy", 1.5), ("hard", 20.0))
    }


def _coco_case(args, name: str, captions, images, cap_g, img_g) -> dict:
    state: dict = {}

    def reference() -> None:
        state["ref"] = (
            retrieval_metrics(captions, images, cap_g, img_g, use_faiss=False).recalls,
            retrieval_metrics(images, captions, img_g, cap_g, use_faiss=False).recalls,
        )

    def fast() -> None:
        # the CPU fast path's search (runtime.precision = "bf16" on a CPU): int8 first where it decides
        both = cross_retrieval_metrics(captions, images, cap_g, img_g, fast_path=True)
        state["fast"] = tuple(r.recalls for r in both)

    def fast_bf16() -> None:
        # The same with the int8 first stage off: the bf16 product decides every block.
        with _env("M3JEPA_INT8", "0"):
            state["bf16"] = tuple(r.recalls for r in cross_retrieval_metrics(captions, images, cap_g, img_g))

    def plain_bf16() -> None:
        # As exact_ranks multiplies: (d, C) contiguous, one reused output (fresh pages cost ~1/3 more).
        ct, it = torch.from_numpy(captions).bfloat16(), torch.from_numpy(images).bfloat16().T.contiguous()
        out = torch.empty((4096, len(images)), dtype=torch.bfloat16)
        for lo in range(0, len(ct), 4096):
            hi = min(lo + 4096, len(ct))
            torch.matmul(ct[lo:hi], it, out=out[: hi - lo])  # (4096, 5000) bf16

    fns = {"reference": reference, "fast": fast, "fast_bf16_only": fast_bf16, "bf16": plain_bf16}
    times = C.interleaved(fns, args.rounds, {})
    ranks = exact_ranks(captions, images, cap_g, img_g, 10, ks=[1, 5, 10])  # one more run: its phases
    stats, phases = ranks.stats, {k: round(v, 3) for k, v in ranks.seconds.items()}
    same = state["ref"] == state["fast"] == state["bf16"]
    print(f"  COCO-5K {name}, both directions, s: reference {times['reference']}  fast {times['fast']}")
    print(f"    fast with int8 off {times['fast_bf16_only']}; bf16 product alone {times['bf16']}")
    print(f"    speed-up {C.ratio(times['reference'], times['fast'])}")
    print(f"    recalls identical: {same}; {stats}; t2i {state['fast'][0]} i2t {state['fast'][1]}")
    print(f"    phases of one exact_ranks run, s: {phases}")
    return {
        "seconds": {k: v.to_json() for k, v in times.items()},
        "recalls_identical": same,
        "recalls": state["fast"],
        "stats": stats,
        "phases_s": phases,
    }


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def bandwidth() -> float:
    """GB/s of one read pass over 820 MB (torch sum, all threads): the floor of any brute-force search."""
    x = torch.randn(100_000, 2048)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-query", action="store_true", help="skip part 2 (one query + 100k gallery)")
    args = p.parse_args()
    C.setup(args)
    record = C.header("retrieval: COCO-5K exact search and one-query latency", C.measure_peak())
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    record["coco5k"] = coco(args, rng)
    record["bandwidth_gbs"] = round(bandwidth(), 1)
    print(f"  read bandwidth {record['bandwidth_gbs']} GB/s")
    if not args.no_query:
        record["one_query"] = one_query(args, rng)
    record["seconds_total"] = time.perf_counter() - t0
    record["load_1min_after"] = round(C.load_average(), 2)
    print(f"  load after: {record['load_1min_after']}")
    C.write_json(args.json, record)


if __name__ == "__main__":
    main()
