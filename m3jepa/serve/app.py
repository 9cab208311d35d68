"""The FastAPI application of `m3jepa serve`: the page, /health, the search API and the media files."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from m3jepa.search.media import MediaRefused
from m3jepa.search.searcher import FILE_MODALITIES, is_blank
from m3jepa.serve.engine import Answer, Engine
from m3jepa.serve.errors import RequestError
from m3jepa.serve.guard import LOOPBACK_HOSTS, Guard, error_body, log_refusal
from m3jepa.serve.limits import Limits
from m3jepa.serve.uploads import UploadFolder, checked_suffix

log = logging.getLogger(__name__)

JSON_FIELDS = ("text", "modality", "value", "k", "index")
MAX_DIGITS = 18  # the most digits a number of a search may have (k, a row id): int() of more is refused
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
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


# ---------------------------------------------------------------- errors: {"error": line, "code": name}


def _error(request: Request, status: int, code: str, message: str) -> Response:
    """The JSON refusal, logged in one line."""
    log_refusal(request.scope, status, code, message)
    return Response(error_body(code, message), status_code=status, media_type="application/json")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> Response:
        return _error(request, e.status, e.code, e.message)

    @app.exception_handler(MediaRefused)
    async def media_refused(request: Request, e: MediaRefused) -> Response:
        return _error(request, e.status, e.code, str(e))

    @app.exception_handler(ValueError)  # m3jepa.api.ApiError and the search package's own refusals
    async def value_error(request: Request, e: ValueError) -> Response:
        return _error(request, 400, "search_refused", str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:
        return _error(request, e.status_code, HTTP_CODES.get(e.status_code, "bad_request"), str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(request, 422, "invalid_request", f"{where}: {first.get('msg')}")

    @app.exception_handler(Exception)  # a bug: JSON to the client, the traceback to the log (by Starlette)
    async def internal_error(request: Request, e: Exception) -> Response:
        return _error(request, 500, "internal", f"the server failed on this request ({type(e).__name__}); "
                                                 "the server log has the details")


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
            raise RequestError(404, f"no static file {name!r}"[:200], "not_found")
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
                                    "with the file in a multipart field named file", "file_query")
        answer = await run_in_threadpool(engine.search, name, modality, value, k)
        return _answer_json(answer, {"modality": modality, "text": value}, k)

    @app.post("/api/search/{modality}")
    async def search_upload(modality: str, request: Request) -> dict[str, Any]:
        """A multipart form: file (the query image or sound), k, index."""
        if modality not in FILE_MODALITIES:
            uploads_are = ", ".join(FILE_MODALITIES)
            raise RequestError(404, f"no upload search for {modality!r}: uploads are {uploads_are}; text "
                                    "goes to POST /api/search as JSON"[:300], "no_upload_route")
        _check_complete_form(request.headers.get("content-type", ""), await request.body())
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=4096)
        except HTTPException as e:  # Starlette's limits on a form (parts, fields, a field over 4 KB)
            raise RequestError(400, f"the form cannot be read: {e.detail}", "bad_form") from None
        try:
            k = _k(form.get("k", str(limits.default_k)), limits)
            name = engine.route(modality, _index_name(form.get("index")))
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise RequestError(400, "no file: send the query file in a multipart field named file",
                                   "no_file")
            data = await upload.read()
        finally:
            await form.close()
        answer = await run_in_threadpool(_search_file, engine, uploads, limits, name, modality, data, k)
        return _answer_json(answer, {"modality": modality, "filename": upload.filename}, k)

    @app.get("/media/{index}/{row_id}")
    def media(index: str, row_id: str) -> Response:
        return _media_file(engine, index, row_id)


def _search_file(engine: Engine, uploads: UploadFolder, limits: Limits, name: str, modality: str,
                 data: bytes, k: int) -> Answer:
    suffix = checked_suffix(modality, data, limits)
    with uploads.holding(data, suffix) as path:  # removed as soon as the query is answered
        return engine.search(name, modality, str(path), k)


def _check_complete_form(content_type: str, body: bytes) -> None:
    """Refuse a multipart body cut before its closing boundary (a client that stopped sending, a proxy that
    cut it): its last part would be dropped, and the answer would be a misleading "no file"."""
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        return  # not a multipart form: the form reader finds no file in it, and says so
    found = BOUNDARY.search(content_type)
    if found is None:
        raise RequestError(400, "the multipart Content-Type names no boundary; send the form as a browser or "
                                "curl -F does", "bad_form")
    if b"--" + found.group(1).encode("latin-1") + b"--" not in body:
        raise RequestError(400, f"the multipart body ({len(body):,} bytes) ends before its closing boundary: "
                                "the upload was cut; send the whole form", "truncated_body")


def _parse_int(text: str) -> int:
    """json.loads' integers, refused past MAX_DIGITS digits (int() of thousands of digits is slow, and
    Python refuses past 4,300 with advice meant for programmers)."""
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise RequestError(400, f"the body holds a {len(text.lstrip('-')):,}-digit number; a search's "
                                f"numbers have at most {MAX_DIGITS} digits", "bad_json")
    return int(text)


def _json_object(content_type: str, raw: bytes) -> dict[str, Any]:
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, "send the search as JSON (Content-Type: application/json)", "not_json")
    try:
        body = json.loads(raw, parse_int=_parse_int)
    except RecursionError:  # thousands of nested brackets: the C decoder recurses once per level
        raise RequestError(400, "the body is not a search: its JSON nests too deeply", "bad_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}", "bad_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object, e.g. {\"text\": \"a red apple\", \"k\": 10}",
                           "not_object")
    unknown = sorted(set(body) - set(JSON_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; a search takes "
                                f"{', '.join(JSON_FIELDS)}"[:300], "unknown_field")
    return body


def _query_of(body: dict[str, Any], limits: Limits) -> tuple[str, str]:
    """(modality, value) of a JSON search: {"text": ...} or {"modality": ..., "value": ...}."""
    if "text" in body and ("modality" in body or "value" in body):
        raise RequestError(400, "give either text, or modality and value, not both", "bad_query")
    if "text" in body:
        modality, value = "text", body["text"]
    else:
        modality, value = body.get("modality"), body.get("value")
        if not isinstance(modality, str) or not modality:
            raise RequestError(400, "no query: give {\"text\": \"...\"} (or modality and value)", "bad_query")
    if modality in FILE_MODALITIES:
        return modality, ""  # routed first (so an unknown direction says so), then sent to the upload route
    if not isinstance(value, str):
        raise RequestError(400, f"the query must be a string; got {type(value).__name__}", "bad_query")
    if is_blank(value):  # nothing visible: whitespace, zero-width and format characters, lone combining marks
        raise RequestError(400, "the query is empty; give some text", "empty_query")
    if len(value) > limits.max_query_chars:
        raise RequestError(400, f"the query is {len(value):,} characters; the limit is "
                                f"{limits.max_query_chars:,}", "query_too_long")
    return modality, value


def _k(raw: Any, limits: Limits) -> int:
    refused = f"k must be a whole number from 1 to {limits.max_k}"
    if isinstance(raw, str):
        digits = raw.strip().lstrip("-")
        if digits.isascii() and digits.isdigit():
            if len(digits) > MAX_DIGITS:
                raise RequestError(400, f"{refused}; got a {len(digits):,}-digit number", "bad_k")
            raw = int(raw)
    if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= limits.max_k:
        raise RequestError(400, f"{refused}; got {raw!r}"[:200], "bad_k")
    return raw


def _index_name(raw: Any) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise RequestError(400, f"index must be the name of a served index; got {raw!r}"[:200], "bad_index")
    return raw


def _answer_json(answer: Answer, query: dict[str, Any], k: int) -> dict[str, Any]:
    hits = [{"rank": h.rank, "score": h.score, "row_id": h.row_id, "id": h.sample_id,
             "group_id": h.group_id, "caption": h.caption,
             "media": f"/media/{answer.index}/{h.row_id}" if h.media else None} for h in answer.hits]
    return {"index": answer.index, "gallery": answer.gallery, "gallery_size": answer.gallery_size,
            "direction": answer.direction,
            "query": query, "k": k, "took_ms": round(answer.took_ms, 3), "cached": answer.cached,
            "hits": hits}


def _media_file(engine: Engine, index: str, row_id: str) -> Response:
    """The media file a row of a served index records, only while it is the file indexed (a regular file
    inside the gallery's roots, reached without a link, with the size and sha256 recorded at index time:
    m3jepa/search/media.py); a JSON 404 or 403 for anything else."""
    if index not in engine.searchers:
        raise RequestError(404, f"no index named {index!r}"[:200], "no_index")
    number = row_id.isascii() and row_id.isdigit() and len(row_id) <= MAX_DIGITS
    row = engine.row(index, int(row_id)) if number else None
    if row is None:
        raise RequestError(404, f"index {index!r} has no row {row_id!r}"[:200], "no_row")
    recorded = row.get("media")
    if not recorded:
        raise RequestError(404, f"row {row_id} of {index!r} has no media file", "no_media")
    path = Path(recorded)
    kind = MEDIA_TYPES.get(path.suffix.lower())
    if kind is None:
        raise RequestError(404, f"row {row_id} of {index!r}: {path.suffix or 'suffix-less'} files are not "
                                "served", "media_type")
    data = engine.media(index, int(row_id), f"row {row_id} of {index!r}")  # MediaRefused: 404/403
    return Response(data, media_type=kind)
