"""`m3jepa serve` under load: text queries from N concurrent loopback clients for a bounded time.

    python -m bench.serve --index IMAGE_IDX [--index TEXT_IDX] [--clients 1,2,4,8] [--seconds 20] [--stages]
                          [--batch-window-ms 0,4] [--query-encoder-precision fp32,int8]

Starts the real server (`python -m m3jepa serve`) on a free 127.0.0.1 port, waits for /health, then runs
two bounded phases of `--seconds` each against it for each client count, one keep-alive HTTP connection
per client thread, each client sending POST /api/search {"text": ..., "k": 10} back to back:
- `repeated`: the gallery's own captions (rows.jsonl of a text index, or 64 fixed phrases), each sent once
  before the clock starts, so every timed query is answered from the server's embedding cache;
- `distinct`: every query text is new (a caption plus a counter), so every query runs MiniLM and the
  predictor.
Reported per phase: queries/s, latency p50/p90/p99/max (client side, ms), errors, the server's own
`took_ms` p50 (embedding + search inside the process), and the 1-minute load average before and after.
`--stages` first times, in this process and one query at a time, MiniLM alone, the predictor from a
MiniLM latent, and the faiss search (where a cold query's time goes), then one call on batches of
1-32 new captions (what the server's batcher pays). `--batch-window-ms 0,4` starts one server per
batch window (`m3jepa serve --batch-window-ms`) and runs every phase against each, one after another;
each run records its window, and `server_stats` the encoder calls and queries of each server (the
mean batch). `--query-encoder-precision fp32,int8` likewise starts one server per precision (`m3jepa
serve --query-encoder-precision`; int8: MiniLM's Linear layers in int8), for every window.
Only 127.0.0.1 is ever contacted.
The clients run in this process on the same cores as the server: their own CPU time is in the latencies.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# as `m3jepa` itself does (cli.main): spinning OpenMP threads starve each other on shared cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from bench import _common as C  # noqa: E402  (imports torch, which reads OMP_WAIT_POLICY once)

MAX_SECONDS, MAX_CLIENTS = 120, 64
PHRASES = [f"a {colour} {thing}" for colour in ("red", "blue", "green", "yellow", "black", "white", "pink",
                                                 "brown") for thing in ("animal", "flower", "car", "hat",
                                                                         "fruit", "house", "tree", "ball")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(indexes: list[Path], port: int, device: str, log: Path, window_ms: float | None = None,
                 precision: str | None = None, threads: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "m3jepa", "serve", "--port", str(port), "--device", device]
    if window_ms is not None:
        cmd += ["--batch-window-ms", str(window_ms)]
    if precision is not None:
        cmd += ["--query-encoder-precision", precision]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    for idx in indexes:
        cmd += ["--index", str(idx)]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            body = json.loads(conn.getresponse().read())
            conn.close()
            return body
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"no /health answer on 127.0.0.1:{port} within {timeout} s")


def client(port: int, index: str, next_text: Callable[[], str], deadline: float,
           out: list[tuple[float, float, bool]]) -> None:
    """Send queries back to back until `deadline`: (latency ms, server took_ms, ok) per query."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.monotonic() < deadline:
        body = json.dumps({"text": next_text(), "k": 10, "index": index})
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/api/search", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            ok = resp.status == 200
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            ok, data = False, b"{}"
        ms = (time.perf_counter() - t0) * 1e3
        out.append((ms, json.loads(data).get("took_ms", float("nan")) if ok else float("nan"), ok))
    conn.close()


def phase(port: int, index: str, next_text: Callable[[], str], clients: int, seconds: float) -> dict:
    results: list[list[tuple[float, float, bool]]] = [[] for _ in range(clients)]
    load_before = C.load_average()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(port, index, next_text, deadline, results[c]))
               for c in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    rows = [r for rs in results for r in rs]
    lat = np.array([r[0] for r in rows if r[2]])
    took = np.array([r[1] for r in rows if r[2]])
    pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if lat.size else (lambda q: None)
    return {"queries": len(rows), "errors": sum(not r[2] for r in rows), "seconds": round(wall, 2),
            "qps": round(lat.size / wall, 1), "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": round(float(lat.max()), 2) if lat.size else None,
            "server_took_p50_ms": round(float(np.median(took)), 3) if took.size else None,
            "load_before": load_before, "load_after": C.load_average()}


def stages(index: Path, n: int = 100) -> dict:
    """Per cold text query, one at a time in this process: MiniLM, the predictor, the faiss search."""
    from m3jepa.search import Searcher

    s = Searcher.open(index, device="cpu")
    texts = [f"{p} number {i}" for i, p in enumerate(PHRASES * (n // len(PHRASES) + 1))][:n]
    s.query("text", "warm up", k=10)

    def timed(fn) -> float:
        t = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(i)
            t.append(time.perf_counter() - t0)
        return round(float(np.median(t)) * 1e3, 3)

    latent = s.model.encode("text", texts[:1])  # (1, 384)
    query = s.embed("text", texts[0])
    target = s.index.modality
    return {"queries": n, "load_before": C.load_average(),
            "encoder_p50_ms": timed(lambda i: s.model.encode("text", [texts[i]])),
            "predictor_p50_ms": timed(lambda i: s.model.embed_query(None, source="text", target=target,
                                                                    latents=latent)),
            "faiss_p50_ms": timed(lambda i: s.index.search(query, 10)),
            "query_p50_ms": timed(lambda i: s.query("text", texts[i], k=10)),
            "batch_p50_ms": {b: batch_time(s, texts, b) for b in (1, 4, 8, 16, 32)},
            "load_after": C.load_average()}


def batch_time(s: Any, texts: list[str], size: int, rounds: int = 8) -> float:
    """Median ms of one embed_query call on `size` new captions (MiniLM + predictor), as the batcher pays."""
    t = []
    for r in range(rounds):
        batch = [f"{x} round {r}" for x in texts[:size]]
        t0 = time.perf_counter()
        s.model.embed_query(batch, source="text", target=s.index.modality)
        t.append(time.perf_counter() - t0)
    return round(float(np.median(t)) * 1e3, 2)


def cycling(texts: list[str], counter: itertools.count) -> Callable[[], str]:
    """The texts in turn, shared by the client threads (next() on a count is atomic under the GIL)."""
    return lambda: texts[next(counter) % len(texts)]


def numbered(texts: list[str], counter: itertools.count) -> Callable[[], str]:
    """A text never sent before: a caption with the next number of `counter` appended."""
    def text() -> str:
        n = next(counter)
        return f"{texts[n % len(texts)]} #{n}"

    return text


def captions(indexes: list[Path]) -> list[str]:
    for idx in indexes:
        rows = [json.loads(line) for line in (idx / "rows.jsonl").read_text().splitlines()]
        texts = [r["caption"] for r in rows if r.get("caption")]
        if texts and json.loads((idx / "manifest.json").read_text()).get("modality") == "text":
            return texts
    return PHRASES


def serve_runs(args: Any, counts: list[int], window: float | None, fresh: itertools.count,
               runs: list[dict], precision: str | None = None, server_threads: int | None = None) -> dict:
    """Start one server (batch window `window` ms, query encoder `precision`, `server_threads`), run
    every phase and client count against it, append the runs; returns its /health stats (encoder calls
    and the queries they embedded)."""
    port, log = free_port(), Path(f"/tmp/bench-serve-{os.getpid()}.log")
    proc = start_server(args.index, port, args.device, log, window, precision, server_threads)
    try:
        health = wait_healthy(port, proc)
        name = next(i["name"] for i in health["indexes"] if "text" in i["sources"])
        texts = captions(args.index)
        for mode in args.phases.split(","):
            if mode == "repeated":
                for t in texts:  # untimed: puts every caption in the server's cache
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    conn.request("POST", "/api/search", json.dumps({"text": t, "index": name}),
                                 {"Content-Type": "application/json"})
                    conn.getresponse().read()
                    conn.close()
                next_text = cycling(texts, itertools.count())
            elif mode == "distinct":
                next_text = numbered(texts, fresh)
            else:
                raise SystemExit(f"unknown phase {mode!r}: repeated, distinct")
            for clients in counts:
                timed = phase(port, name, next_text, clients, args.seconds)
                run = {"phase": mode, "clients": clients, "batch_window_ms": window,
                       "query_encoder_precision": precision or "fp32", "server_threads": server_threads,
                       **timed}
                runs.append(run)
                print(json.dumps(run), flush=True)
        stats = wait_healthy(port, proc)["stats"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log.unlink()  # kept only when the run failed, to read why
    return stats


def main() -> None:
    p = C.parser(__doc__.split("\n")[0])
    p.add_argument("--index", type=Path, action="append", required=True, help="an index folder (repeat)")
    p.add_argument("--clients", default="1,2,4,8", help="client counts, one run of each phase per count")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stages", action="store_true", help="first time a cold query's parts in-process")
    p.add_argument("--phases", default="repeated,distinct")
    p.add_argument("--batch-window-ms", default=None,
                   help="comma-separated batch windows, one server each (e.g. 0,4); default: the server's")
    p.add_argument("--query-encoder-precision", default=None,
                   help="comma-separated query encoder precisions, one server each (e.g. fp32,int8)")
    p.add_argument("--server-threads", default=None,
                   help="comma-separated `m3jepa serve --threads` values, one server each (e.g. 2,1); "
                        "default: the server's own")
    args = p.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if not (0 < args.seconds <= MAX_SECONDS and all(0 < c <= MAX_CLIENTS for c in counts)):
        raise SystemExit(f"--seconds must be in (0, {MAX_SECONDS}] and --clients in [1, {MAX_CLIENTS}]")
    gallery = {i: json.loads((i / "manifest.json").read_text())["modality"] for i in args.index}
    image = next((i for i, m in gallery.items() if m != "text"), args.index[0])
    out: dict = {"machine": {"cpu": C.cpu_name(), "cores": os.cpu_count(), "git": C.git_sha()},
                 "seconds": args.seconds, "runs": []}
    if args.stages:
        out["stages"] = stages(image)
    windows = [float(w) for w in args.batch_window_ms.split(",")] if args.batch_window_ms else [None]
    fresh = itertools.count()  # shared by every distinct run: no text is ever sent twice
    precisions = args.query_encoder_precision.split(",") if args.query_encoder_precision else [None]
    threads = [int(t) for t in args.server_threads.split(",")] if args.server_threads else [None]
    out["server_stats"] = []
    # one server per batch window, precision and thread count, measured alike, one after another
    for window, precision, n in itertools.product(windows, precisions, threads):
        stats = serve_runs(args, counts, window, fresh, out["runs"], precision, n)
        out["server_stats"].append({"batch_window_ms": window, "query_encoder_precision": precision or "fp32",
                                    "server_threads": n, **stats})
    text = json.dumps(out, indent=2)
    print(text)
    C.write_json(args.json, out)


if __name__ == "__main__":
    main()
