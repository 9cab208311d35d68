"""The one error a request can get back: an HTTP status, a stable code and one clear line, sent as
{"error": message, "code": code} (docs/serve.md lists the codes)."""

from __future__ import annotations


class RequestError(Exception):
    """A request the service refuses: `status` is a 4xx code, `code` a stable name of the refusal (clients
    branch on it; the message may be reworded), `message` says what was wrong and the fix."""

    def __init__(self, status: int, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def one_line(message: str, limit: int = 500) -> str:
    """The first line of `message`, cut to `limit` characters: an error is one line."""
    first = (message.splitlines() or [""])[0]
    return first if len(first) <= limit else first[: limit - 1] + "…"
