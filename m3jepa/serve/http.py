"""The HTTP layer of `m3jepa serve`: uvicorn's h11 protocol, with its own refusals answered as the app's are.

h11 refuses a request it cannot frame (two different Content-Length headers, a negative or non-numeric
length, a malformed request or header line, headers past h11's size limit) before any application code
runs; uvicorn then answers a text/plain 400 and logs "Invalid HTTP request received.". `JsonErrorsH11`
answers it in JSON instead ({"error": ..., "code": "bad_http"}, with the security headers) and logs one line
naming the client. What h11 found wrong is not passed on by uvicorn, so the message is general.

Not controllable here (docs/serve.md says so): uvicorn has no timeout for a request's headers or body (a
client that sends them slowly holds its connection until it stops), and a connection dropped before any
request line gets no answer at all.
"""

from __future__ import annotations

import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from m3jepa.serve.guard import SECURITY_HEADERS, error_body

log = logging.getLogger(__name__)

UVICORN_400_LINE = "Invalid HTTP request received."  # what uvicorn logs before send_400_response
BAD_HTTP = ("the request is not valid HTTP/1.1 (a malformed request line or header, a negative or "
            "non-numeric Content-Length, or two that differ); it was refused before it was read")


class JsonErrorsH11(H11Protocol):
    """uvicorn's h11 protocol answering a request h11 refuses with the app's JSON error."""

    def send_400_response(self, msg: str) -> None:
        body = error_body("bad_http", BAD_HTTP)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *SECURITY_HEADERS]
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.warning("refused a request from %s: 400 bad_http: %s", client, BAD_HTTP)
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had already begun: nothing more can be framed
            pass
        self.transport.close()


class _DropUvicorn400(logging.Filter):
    """uvicorn's own line for the refusal JsonErrorsH11 logs (one line per refused request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != UVICORN_400_LINE


def server_config(app: Any, host: str, port: int, **options: Any) -> Any:
    """The uvicorn.Config `m3jepa serve` runs (tests start the same one): the h11 protocol above, warnings
    only, no access log."""
    import uvicorn

    error_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropUvicorn400) for f in error_log.filters):
        error_log.addFilter(_DropUvicorn400())
    settings = {"log_level": "warning", "access_log": False, **options}
    return uvicorn.Config(app, host=host, port=port, http=JsonErrorsH11, **settings)
