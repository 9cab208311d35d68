"""Open the indexes named on the command line with one model, warm it up, and run uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import re
import tempfile
from pathlib import Path

from PIL import Image

from m3jepa.serve.batcher import WINDOW_S
from m3jepa.serve.engine import Engine
from m3jepa.serve.limits import Limits

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def index_specs(specs: list[str]) -> dict[str, Path]:
    """name -> folder from `--index` values: NAME=PATH, or PATH (named after its folder)."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        if not NAME.match(name):
            raise ValueError(f"--index {spec}: the name {name!r} must be 1-64 letters, digits, '_', '.' or "
                             "'-'; give one as NAME=PATH")
        if name in named:
            raise ValueError(f"--index {spec}: two indexes are named {name!r}; name them as NAME=PATH")
        named[name] = Path(path)
    if not named:
        raise ValueError("give at least one --index")
    return named


def open_engine(specs: list[str], device: str = "auto", batch_window_s: float = WINDOW_S,
                query_encoder_precision: str = "fp32") -> Engine:
    """The engine over the indexes of `specs`, which must all come from one model (loaded once); text
    queries under load wait up to `batch_window_s` to share an encoder call (m3jepa/serve/batcher.py);
    `query_encoder_precision="int8"` embeds them with the int8 MiniLM (opt-in, CPU only)."""
    from m3jepa.search import Searcher

    # one model, loaded once; a Searcher refuses an index built with other weights
    searchers = Searcher.open_all(index_specs(specs), device, query_encoder_precision)
    if query_encoder_precision == "int8":  # never silent: the answers differ from the float32 ones
        log.warning("text queries use MiniLM with int8 Linear layers: their embeddings are close to, not "
                    "equal to, the float32 ones (docs/serve.md, 'The int8 query encoder')")
    engine = Engine(searchers, batch_window_s=batch_window_s)
    warm_up(engine)
    return engine


def warm_up(engine: Engine) -> None:
    """One query per source of each index (a caption; a small grey PNG), so the encoders are built and
    their first-call costs paid before the first request."""
    with tempfile.TemporaryDirectory(prefix="m3jepa-warm-") as tmp:
        png = Path(tmp) / "warm.png"
        Image.new("RGB", (64, 64), (128, 128, 128)).save(png)
        for name in engine.searchers:
            for source in engine.sources(name):
                if source == "text":
                    engine.search(name, "text", "warm up", 1)
                elif source == "image":
                    engine.search(name, "image", str(png), 1)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(specs: list[str], host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          limits: Limits | None = None, batch_window_s: float = WINDOW_S,
          query_encoder_precision: str = "fp32") -> None:
    """Serve the indexes on host:port until interrupted."""
    import uvicorn

    from m3jepa.serve.app import create_app
    from m3jepa.serve.http import server_config

    engine = open_engine(specs, device, batch_window_s, query_encoder_precision)
    app = create_app(engine, limits, loopback_only=is_loopback(host))
    if not is_loopback(host):
        log.warning("serving on %s: anyone who can reach it can query the model and read the indexed media",
                    host)
    log.info("serving %s on http://%s:%d", ", ".join(engine.searchers), host, port)
    uvicorn.Server(server_config(app, host, port)).run()  # its h11 refusals answered in JSON (serve/http.py)
