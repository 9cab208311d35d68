"""ASGI middleware in front of every route: the Host check, the request-body limit, security headers."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException

from m3jepa.serve.limits import Limits

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


class Guard:
    """Refuses a request whose Host is not served (DNS rebinding) or whose body is over its limit, before
    any route runs; adds SECURITY_HEADERS to every response. Plain ASGI: no per-request task or copy."""

    def __init__(self, app: Any, limits: Limits, allowed_hosts: frozenset[str] | None) -> None:
        self.app = app
        self.limits = limits
        self.allowed_hosts = allowed_hosts  # None: any Host (the server was bound to a public address)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            await _send_json(send, *refusal)
            return
        limit = self.body_limit(scope["path"])
        await self.app(scope, _bounded(receive, limit), _with_headers(send))

    def body_limit(self, path: str) -> int:
        return self.limits.max_upload_bytes if path.startswith("/api/search/") else self.limits.max_json_bytes

    def _refusal(self, path: str, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        host = headers.get(b"host", b"").decode("latin-1")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.allowed_hosts is not None and name not in self.allowed_hosts:
            return 400, (f"Host {host!r} is not served: this server answers "
                         f"{', '.join(sorted(self.allowed_hosts))} only (a guard against DNS rebinding)")
        length = headers.get(b"content-length")
        if length is None:
            return None
        if not length.isdigit():
            return 400, "Content-Length is not a number"
        limit = self.body_limit(path)
        if int(length) > limit:
            return 413, f"the request body is {int(length):,} bytes; the limit here is {limit:,} bytes"
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


async def _send_json(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + SECURITY_HEADERS})
    await send({"type": "http.response.body", "body": body})
