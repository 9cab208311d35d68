"""The FastAPI application of `m3jepa serve`: the page, /health, the search API and the media files."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from m3jepa.search.searcher import FILE_MODALITIES
from m3jepa.serve.engine import Answer, Engine
from m3jepa.serve.errors import RequestError
from m3jepa.serve.guard import LOOPBACK_HOSTS, Guard
from m3jepa.serve.limits import Limits
from m3jepa.serve.uploads import UploadFolder, checked_suffix

JSON_FIELDS = ("text", "modality", "value", "k", "index")
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
# What /media serves, by suffix; a row whose file has another suffix is not served.
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp", ".svg": "image/svg+xml", ".wav": "audio/wav",
               ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}


def create_app(engine: Engine, limits: Limits | None = None, *, loopback_only: bool = True) -> FastAPI:
    """The service over `engine`; with `loopback_only`, requests must name a loopback Host."""
    limits = limits or Limits()
    uploads = UploadFolder()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        uploads.close()
        engine.close()

    # no /docs: FastAPI's pages load their scripts from a CDN
    app = FastAPI(title="m3jepa serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.limits, app.state.uploads = engine, limits, uploads
    _add_error_handlers(app)
    _add_page_routes(app)
    _add_api_routes(app, engine, limits, uploads)
    app.add_middleware(Guard, limits=limits, allowed_hosts=LOOPBACK_HOSTS if loopback_only else None)
    return app


# ---------------------------------------------------------------- errors: always {"error": message}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError) -> JSONResponse:
        return _error(e.status, e.message)

    @app.exception_handler(ValueError)  # m3jepa.api.ApiError and the search package's own refusals
    async def value_error(_: Request, e: ValueError) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg')}")


# ---------------------------------------------------------------- the page


def _asset(name: str) -> bytes:
    return resources.files("m3jepa.serve").joinpath("static", name).read_bytes()


def _add_page_routes(app: FastAPI) -> None:
    page = _asset("index.html")
    assets = {name: (_asset(name), kind) for name, kind in STATIC.items()}

    @app.get("/")
    def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in assets:
            raise RequestError(404, f"no static file {name!r}")
        body, kind = assets[name]
        return Response(body, media_type=f"{kind}; charset=utf-8")


# ---------------------------------------------------------------- the API


def _add_api_routes(app: FastAPI, engine: Engine, limits: Limits, uploads: UploadFolder) -> None:
    served = {"ok": True, **engine.describe(), "limits": limits.as_json()}

    @app.get("/health")
    def get_health() -> dict[str, Any]:
        return {**served, "stats": engine.stats()}

    @app.post("/api/search")
    async def search_json(request: Request) -> dict[str, Any]:
        """{"text": "...", "k": 10, "index": "name"}, or {"modality": "text", "value": "..."}."""
        body = _json_object(request.headers.get("content-type", ""), await request.body())
        modality, value = _query_of(body, limits)
        k = _k(body.get("k", limits.default_k), limits)
        name = engine.route(modality, _index_name(body.get("index")))
        if modality in FILE_MODALITIES:
            raise RequestError(400, f"{modality} queries are file uploads: POST /api/search/{modality} "
                                    "with the file in a multipart field named file")
        answer = await run_in_threadpool(engine.search, name, modality, value, k)
        return _answer_json(answer, {"modality": modality, "text": value}, k)

    @app.post("/api/search/{modality}")
    async def search_upload(modality: str, request: Request) -> dict[str, Any]:
        """A multipart form: file (the query image or sound), k, index."""
        if modality not in FILE_MODALITIES:
            raise RequestError(404, f"no upload search for {modality!r}: uploads are "
                                    f"{', '.join(FILE_MODALITIES)}; text goes to POST /api/search as JSON")
        async with request.form(max_files=1, max_fields=4, max_part_size=4096) as form:
            k = _k(form.get("k", str(limits.default_k)), limits)
            name = engine.route(modality, _index_name(form.get("index")))
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise RequestError(400, "no file: send the query file in a multipart field named file")
            data = await upload.read()
        answer = await run_in_threadpool(_search_file, engine, uploads, limits, name, modality, data, k)
        return _answer_json(answer, {"modality": modality, "filename": upload.filename}, k)

    @app.get("/media/{index}/{row_id}")
    def media(index: str, row_id: str) -> FileResponse:
        return _media_file(engine, index, row_id)


def _search_file(engine: Engine, uploads: UploadFolder, limits: Limits, name: str, modality: str,
                 data: bytes, k: int) -> Answer:
    suffix = checked_suffix(modality, data, limits)
    with uploads.holding(data, suffix) as path:  # removed as soon as the query is answered
        return engine.search(name, modality, str(path), k)


def _json_object(content_type: str, raw: bytes) -> dict[str, Any]:
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, "send the search as JSON (Content-Type: application/json)")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object, e.g. {\"text\": \"a red apple\", \"k\": 10}")
    unknown = sorted(set(body) - set(JSON_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; a search takes "
                                f"{', '.join(JSON_FIELDS)}")
    return body


def _query_of(body: dict[str, Any], limits: Limits) -> tuple[str, str]:
    """(modality, value) of a JSON search: {"text": ...} or {"modality": ..., "value": ...}."""
    if "text" in body and ("modality" in body or "value" in body):
        raise RequestError(400, "give either text, or modality and value, not both")
    if "text" in body:
        modality, value = "text", body["text"]
    else:
        modality, value = body.get("modality"), body.get("value")
        if not isinstance(modality, str) or not modality:
            raise RequestError(400, "no query: give {\"text\": \"...\"} (or modality and value)")
    if modality in FILE_MODALITIES:
        return modality, ""  # routed first (so an unknown direction says so), then sent to the upload route
    if not isinstance(value, str):
        raise RequestError(400, f"the query must be a string; got {type(value).__name__}")
    if not value.strip():
        raise RequestError(400, "the query is empty; give some text")
    if len(value) > limits.max_query_chars:
        raise RequestError(400, f"the query is {len(value):,} characters; the limit is "
                                f"{limits.max_query_chars:,}")
    return modality, value


def _k(raw: Any, limits: Limits) -> int:
    if isinstance(raw, str) and raw.strip().lstrip("-").isascii() and raw.strip().lstrip("-").isdigit():
        raw = int(raw)
    if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= limits.max_k:
        raise RequestError(400, f"k must be a whole number from 1 to {limits.max_k}; got {raw!r}"[:200])
    return raw


def _index_name(raw: Any) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise RequestError(400, f"index must be the name of a served index; got {raw!r}"[:200])
    return raw


def _answer_json(answer: Answer, query: dict[str, Any], k: int) -> dict[str, Any]:
    hits = [{"rank": h.rank, "score": h.score, "row_id": h.row_id, "id": h.sample_id,
             "group_id": h.group_id, "caption": h.caption,
             "media": f"/media/{answer.index}/{h.row_id}" if h.media else None} for h in answer.hits]
    return {"index": answer.index, "gallery": answer.gallery, "gallery_size": answer.gallery_size,
            "direction": answer.direction,
            "query": query, "k": k, "took_ms": round(answer.took_ms, 3), "cached": answer.cached,
            "hits": hits}


def _media_file(engine: Engine, index: str, row_id: str) -> FileResponse:
    """The media file a row of a served index records; 404 for anything else."""
    if index not in engine.searchers:
        raise RequestError(404, f"no index named {index!r}")
    row = engine.row(index, int(row_id)) if row_id.isascii() and row_id.isdigit() else None
    if row is None:
        raise RequestError(404, f"index {index!r} has no row {row_id!r}"[:200])
    recorded = row.get("media")
    if not recorded:
        raise RequestError(404, f"row {row_id} of {index!r} has no media file")
    path = Path(recorded)
    kind = MEDIA_TYPES.get(path.suffix.lower())
    if kind is None:
        raise RequestError(404, f"row {row_id} of {index!r}: {path.suffix or 'suffix-less'} files are not "
                                "served")
    if not path.is_file():
        raise RequestError(404, f"the media file of row {row_id} of {index!r} is missing")
    return FileResponse(path, media_type=kind)
