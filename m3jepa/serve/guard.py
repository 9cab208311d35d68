"""ASGI middleware in front of every route: the Host and Origin checks, the request-body limit, security
headers, one log line per refused request, and a client that hangs up mid-request dropped quietly."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from m3jepa.serve.errors import one_line
from m3jepa.serve.limits import Limits

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})

# The page runs only its own script and style, reads only its own origin, and cannot be framed; a media
# file (an SVG, say) opened on its own gets the same rules, so it cannot run script either.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; media-src 'self' "
     b"blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


# Methods a page of another site may not make us run: a browser sends a cross-origin "simple" POST (a
# multipart form, say) without asking first, so its Origin header is checked before any work.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def client_of(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def log_refusal(scope: Scope, status: int, code: str, message: str) -> None:
    """The one log line of a refused request."""
    what = "failed" if status >= 500 else "refused"
    log.warning("%s %s %s from %s: %d %s: %s", what, scope.get("method", "?"), scope.get("path", "?"),
                client_of(scope), status, code, one_line(message, 300))


def same_origin(origin: str, host: str) -> bool:
    """Whether an Origin header names this server (http or https at the Host the request was sent to)."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower() \
        and not parts.path


class Guard:
    """Refuses a request whose Host is not served (DNS rebinding), a state-changing request from another
    origin, or a body over its limit, before any route runs; adds SECURITY_HEADERS to every response; logs
    one line per refusal; drops a request whose client hung up. Plain ASGI: no per-request task or copy."""

    def __init__(self, app: Any, limits: Limits, allowed_hosts: frozenset[str] | None) -> None:
        self.app = app
        self.limits = limits
        self.allowed_hosts = allowed_hosts  # None: any Host (the server was bound to a public address)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._refusal(scope["method"], scope["path"], headers)
        if refusal is not None:
            log_refusal(scope, *refusal)
            await _send_json(send, *refusal)
            return
        limit = self.body_limit(scope["path"])
        try:
            await self.app(scope, _bounded(receive, limit), _with_headers(send))
        except ClientDisconnect:  # nobody to answer: one line, not a traceback
            log.warning("dropped %s %s from %s: the client hung up before its request was read",
                        scope["method"], scope["path"], client_of(scope))

    def body_limit(self, path: str) -> int:
        return self.limits.max_upload_bytes if path.startswith("/api/search/") else self.limits.max_json_bytes

    def _refusal(self, method: str, path: str, headers: dict[bytes, bytes]) -> tuple[int, str, str] | None:
        """(status, code, message) of a request refused from its headers alone; None to go on."""
        host = headers.get(b"host", b"").decode("latin-1")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.allowed_hosts is not None and name not in self.allowed_hosts:
            return 400, "host_not_served", (f"Host {host[:100]!r} is not served: this server answers "
                                            f"{', '.join(sorted(self.allowed_hosts))} only (a guard against "
                                            "DNS rebinding)")
        if method not in SAFE_METHODS:
            origin = headers.get(b"origin")
            site = headers.get(b"sec-fetch-site", b"").lower()
            foreign = origin is not None and not same_origin(origin.decode("latin-1"), host)
            if foreign or site == b"cross-site":
                shown = origin.decode("latin-1")[:100] if origin is not None else "another site"
                return 403, "cross_origin", (f"a {method} from {shown!r} is refused: only pages of this "
                                             f"server ({host[:100]}) may send searches to it")
        length = headers.get(b"content-length")
        if length is None:
            return None
        if not (length.isascii() and length.isdigit()):
            return 400, "bad_content_length", "Content-Length is not a number"
        limit = self.body_limit(path)
        if int(length) > limit:
            return 413, "body_too_large", (f"the request body is {int(length):,} bytes; the limit here is "
                                           f"{limit:,} bytes")
        return None


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive` that stops a chunked body (no Content-Length) once it passes `limit` bytes."""
    seen = 0

    async def bounded() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:  # an HTTPException: the route's error handler answers 413 as JSON
                raise HTTPException(413, f"the request body passed the limit here of {limit:,} bytes")
        return message

    return bounded


def _with_headers(send: Send) -> Send:
    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
        await send(message)

    return sending


def error_body(code: str, message: str) -> bytes:
    """The JSON of every refusal: {"error": one line, "code": a stable name}."""
    return json.dumps({"error": one_line(message), "code": code}).encode()


async def _send_json(send: Send, status: int, code: str, message: str) -> None:
    body = error_body(code, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + SECURITY_HEADERS})
    await send({"type": "http.response.body", "body": body})
