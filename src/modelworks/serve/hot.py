"""The hot GET routes, answered in front of the web framework: the predictors' query routes (Predictor.query_routes,
e.g. GET /v1/models/NAME/recommend?user=42) skip Starlette's and FastAPI's middleware stack and router.

Why: a recommendation is a small answer asked for often, and under load (32 clients, 2 cores) the event loop is the
bottleneck. Profiled, about half of its time went to the layers a request crosses before and after the route
(FastAPI's and Starlette's middleware, each wrapping `send`; the router trying every route's pattern; the Request
and Response objects) rather than to the answer. A thinner middleware hook was tried and gave nothing measurable:
only skipping the whole stack does.

What a production route must keep, it keeps, through the same functions as the full route:
- the answer: ModelServer.run_prediction (history from the event store, A/B choice, decoding, the batch, the
  online hit record, the envelope), so the body is the full route's, byte for byte apart from ids and latency;
- the request id (X-Request-Id, the client's when valid), the X-Caller-Id check, the Prometheus request counters
  and latency histogram, and every access log line (app.open_request and app.record_request, as RequestContext);
- errors in the house shape with the same statuses and codes (ApiError), and a 500 for anything unexpected, logged.

Everything else goes to the app unchanged: other paths and methods (HEAD included), and a GET carrying a body (the
app reads it within its limits). `modelworks serve --no-hot-routes` (ServeSettings.hot_routes) turns this off.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

from .app import (CALLER_HEADER, CALLER_HEADER_BYTES, MAX_CALLER_ID, ApiError, ModelServer, open_request,
                  record_request, unexpected_error)
from .error_formats import error_body


@dataclass(frozen=True)
class HotRoute:
    model: str  # the served model's name
    read: Callable[[bytes], tuple]  # the URL's query string -> (typed request, None); raises ApiError


def json_bytes(content: dict) -> bytes:
    """As Starlette's JSONResponse renders it, so an error reads the same on either path."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def content_type(media_type: str) -> bytes:
    # Starlette's Response adds the charset to text types only.
    return (f"{media_type}; charset=utf-8" if media_type.startswith("text/") else media_type).encode("latin-1")


class HotRoutes:
    """Pure ASGI, outermost: answers the GET paths in `server.hot_routes`, passes everything else to `app`."""

    def __init__(self, app, server: ModelServer):
        self.app = app
        self.server = server
        self.routes: dict[str, HotRoute] = server.hot_routes

    async def __call__(self, scope, receive, send):
        route = self.routes.get(scope.get("path")) if scope["type"] == "http" and scope["method"] == "GET" else None
        if route is None:
            return await self.app(scope, receive, send)
        arrival = time.perf_counter()
        headers = dict(scope["headers"])
        state = open_request(scope, headers, arrival)
        if not state["body_done"]:
            return await self.app(scope, receive, send)
        status = 500  # until an answer is sent
        try:
            status, body, response_headers = await self.answer(route, scope, headers, state)
            response_headers.append((b"x-request-id", state["request_id"].encode()))
            await send({"type": "http.response.start", "status": status, "headers": response_headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            record_request(self.server, scope, state, status, time.perf_counter() - arrival)

    async def answer(self, route: HotRoute, scope, headers: dict[bytes, bytes], state: dict
                     ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """(status, body, headers) of the prediction, or of the error in the house shape."""
        try:
            caller = headers.get(CALLER_HEADER_BYTES)
            if caller is not None and len(caller) > MAX_CALLER_ID:
                raise ApiError(400, "invalid_header", f"{CALLER_HEADER}: longer than {MAX_CALLER_ID} characters "
                               f"(got {len(caller)}); send a user or session id")
            accept = headers.get(b"accept")
            version, body, media_type = await self.server.run_prediction(
                route.model, state, lambda: route.read(scope["query_string"]),
                accept.decode("latin-1") if accept is not None else None)
            return 200, body, [(b"content-type", content_type(media_type)),
                               (b"content-length", b"%d" % len(body)), (b"x-model-version", version.encode())]
        except ApiError as exc:
            error = exc
        except Exception as exc:  # as the app's handler of unexpected errors: logged, answered 500, still serving
            error = unexpected_error(exc, state["request_id"])
        state["error"] = error.code
        body = json_bytes(error_body(error.code, error.message, error.field, state["request_id"]))
        extra = [(key.lower().encode("latin-1"), str(value).encode("latin-1"))
                 for key, value in (error.headers or {}).items()]
        return error.status, body, [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                    *extra]
