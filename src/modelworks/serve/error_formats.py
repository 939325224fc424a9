"""The shape of an error answered before any route runs: 413 (body too large) and 408 (body too slow) from the
middleware, 431 (headers too large) and 408 (headers too slow) from the HTTP protocol.

Routes answer their own errors in their own shape; these are produced where no route has run yet, so a path
prefix whose API has another error shape (/v1/completions: OpenAI's) registers a formatter here, and the
middleware and the protocol look the request's path up. Everything else gets the house shape
`{"error": {"code", "message", "field"}, "request_id"}`.
"""

from __future__ import annotations

from typing import Callable

Formatter = Callable[[int, str, str, "str | None"], dict]  # (status, code, message, request_id) -> body


def error_body(code: str, message: str, field: str | None, request_id: str | None) -> dict:
    """The house error shape, answered by routes and middleware alike."""
    return {"error": {"code": code, "message": message, "field": field}, "request_id": request_id}


def house_error_body(status: int, code: str, message: str, request_id: str | None) -> dict:
    return error_body(code, message, None, request_id)


class ErrorFormats:
    """Path prefix -> formatter; the longest registered prefix of a path wins."""

    def __init__(self):
        self.formatters: dict[str, Formatter] = {}

    def register(self, prefix: str, formatter: Formatter) -> None:
        self.formatters[prefix.rstrip("/")] = formatter

    def formatter_for(self, path: str) -> Formatter:
        path = path.split("?", 1)[0]
        matching = [p for p in self.formatters if path == p or path.startswith(p + "/")]
        return self.formatters[max(matching, key=len)] if matching else house_error_body

    def body(self, path: str, status: int, code: str, message: str, request_id: str | None = None) -> dict:
        return self.formatter_for(path)(status, code, message, request_id)
