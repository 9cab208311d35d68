"""MiniLM-L6 for text queries: float32 against dynamic int8 Linear layers, speed and agreement.

    taskset -c 1 python -m bench.text_encoder --index runs/tuxpaint/embedded/test/image.index --threads 1

In one process and on the same captions (the Tux Paint captions of every split):
- speed: one encoder call (tokenize + MiniLM + pooling) on 1, 8 and 32 new captions, float32 and int8
  timed in alternating rounds, so a slow patch of the shared cores hits both; the per-round ratio is
  the speed-up;
- agreement of the stage-1 latents: the cosine of each caption's int8 latent with its float32 one
  (min, mean);
- agreement of the search: each caption's query goes through the real predictor (`embed_query`) and
  the index, and the int8 top-10 is compared with the float32 top-10 (overlap@10 mean/min, top-1 equal),
  for the test captions and for all captions; and the retrieval recall (the caption's own image within
  the top 1 / 10) of both, on the test captions.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

# as `m3jepa` itself does (cli.main): spinning OpenMP threads starve each other on shared cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from bench import _common as C  # noqa: E402  (imports torch, which reads OMP_WAIT_POLICY once)

BATCHES = (1, 8, 32)


def tuxpaint_captions() -> tuple[list[str], list[tuple[str, str]]]:
    """(every caption of every split, the test split's (caption, group id) pairs)."""
    from m3jepa.data.tuxpaint import load_tuxpaint

    ds = load_tuxpaint()
    every = [r.payload for split in ds.splits() for r in ds.records(split, "text")]
    test = [(r.payload, r.group_id) for r in ds.records("test", "text")]
    return every, test


def latents(model: Any, encoder: Any, texts: list[str], batch: int = 32) -> torch.Tensor:
    """(N, 384) float32 stage-1 latents as `M3Model.encode` gives them (rounded through the store dtype)."""
    pre = encoder.preprocessor
    out = []
    with torch.inference_mode():
        for lo in range(0, len(texts), batch):
            b = pre.collate([pre(t) for t in texts[lo : lo + batch]])
            out.append(encoder.encode(b, "pooled").pooled.float())
    x = torch.cat(out)
    return x.half().float() if model.raw.store_dtype is np.float16 else x


def timings(encoders: dict[str, Any], texts: list[str], rounds: int) -> dict:
    """Median ms per call on `b` captions for each encoder (alternating rounds) and the per-round ratio."""
    out = {}
    for b in BATCHES:
        fresh = {name: itertools.count() for name in encoders}

        def call(name: str, b: int = b, fresh: dict = fresh) -> None:
            n = next(fresh[name])
            batch = [f"{texts[(n * b + i) % len(texts)]} {n}" for i in range(b)]  # never the same text twice
            pre = encoders[name].preprocessor
            with torch.inference_mode():
                encoders[name].encode(pre.collate([pre(t) for t in batch]), "pooled")

        for name in encoders:  # warm up each once at this shape
            call(name)
        spread = C.interleaved({n: (lambda n=n: call(n)) for n in encoders}, rounds,
                               {n: max(1, 16 // b) for n in encoders})
        row = {n: round(s.median * 1e3, 2) for n, s in spread.items()}
        row["ms_range"] = {n: [round(min(s.values) * 1e3, 2), round(max(s.values) * 1e3, 2)]
                           for n, s in spread.items()}
        r = C.ratio(spread["fp32"], spread["int8"])
        row["speedup"] = round(r.median, 2)
        row["speedup_range"] = [round(min(r.values), 2), round(max(r.values), 2)]
        out[b] = row
        print(f"  batch {b:2d}: " + json.dumps(row), flush=True)
    return out


def top10(searcher: Any, x: torch.Tensor, k: int = 10) -> np.ndarray:
    """(N, k) gallery positions of each stage-1 latent's query through the predictor and the index."""
    q = searcher.model.embed_query(None, source="text", target=searcher.index.modality, latents=x)
    hits = searcher.index.search(q, k)
    return np.array([[h.row_id for h in row] for row in hits])


def agreement(searcher: Any, a: torch.Tensor, b: torch.Tensor) -> dict:
    """Latent cosines and how the int8 top-10 (b) overlaps the float32 one (a)."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    ta, tb = top10(searcher, a), top10(searcher, b)
    overlap = np.array([len(set(x) & set(y)) / ta.shape[1] for x, y in zip(ta, tb, strict=True)])
    return {"captions": len(a), "latent_cos_min": round(float(cos.min()), 5),
            "latent_cos_mean": round(float(cos.mean()), 5),
            "top10_overlap_mean": round(float(overlap.mean()), 4),
            "top10_overlap_min": round(float(overlap.min()), 2),
            "top1_equal": round(float((ta[:, 0] == tb[:, 0]).mean()), 4)}


def recall(searcher: Any, x: torch.Tensor, groups: list[str]) -> dict:
    """R@1 / R@10 (%): the caption's own image (same group id) among its top 1 / 10."""
    t = top10(searcher, x)
    rows = [searcher.index.row(i) for i in range(searcher.index.rows)]
    gid = {r["row_id"]: r["group_id"] for r in rows}
    hit = np.array([[gid[r] == g for r in row] for row, g in zip(t, groups, strict=True)])
    return {"R@1": round(100 * float(hit[:, 0].mean()), 1), "R@10": round(100 * float(hit.any(1).mean()), 1)}


def main() -> None:
    p = C.parser(__doc__.split("\n")[0])
    p.add_argument("--index", type=Path, required=True, help="an index of a text->X model (e.g. image.index)")
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    C.setup(args)
    from m3jepa.accel.text import quantize_text_encoder
    from m3jepa.search import Searcher

    searcher = Searcher.open(args.index, device="cpu")
    model = searcher.model
    fp32 = model.raw._encoder("text")
    int8 = quantize_text_encoder(fp32, torch.device("cpu"))
    every, test = tuxpaint_captions()
    out: dict = {"machine": {"cpu": C.cpu_name(), "cores": os.cpu_count(), "git": C.git_sha(),
                             "threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0))},
                 "load_before": C.load_average()}
    print(json.dumps(out), flush=True)
    out["ms_per_call"] = timings({"fp32": fp32, "int8": int8}, every, args.rounds)
    a, b = latents(model, fp32, every), latents(model, int8, every)
    test_rows = [every.index(c) for c, _ in test]
    out["agreement_all"] = agreement(searcher, a, b)
    out["agreement_test"] = agreement(searcher, a[test_rows], b[test_rows])
    groups = [g for _, g in test]
    out["recall_test"] = {"fp32": recall(searcher, a[test_rows], groups),
                          "int8": recall(searcher, b[test_rows], groups)}
    out["load_after"] = C.load_average()
    print(json.dumps(out, indent=2))
    C.write_json(args.json, out)


if __name__ == "__main__":
    main()
