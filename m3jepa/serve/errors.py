"""The one error a request can get back: an HTTP status and one clear message, sent as {"error": ...}."""

from __future__ import annotations


class RequestError(Exception):
    """A request the service refuses: `status` is a 4xx code, `message` says what was wrong and the fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
