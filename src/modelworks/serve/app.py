"""The HTTP API: app factory, lifespan (warm-up, drain), routes, errors, and the uvicorn runner.

    GET  /                               demo page (static HTML + JS on the public API)
    GET  /healthz                        alive
    GET  /readyz                         models loaded and warmed up (503 while starting or draining)
    GET  /metrics                        Prometheus
    GET  /docs, /openapi.json            the API's documentation (Swagger UI served locally) and schema
    GET  /v1/models, /v1/models/{name}   what is served: versions, traffic split, inputs, labels, streams
    POST /v1/models/{name}/predict       JSON (file base64) or multipart upload; typed by the task's predictor
    GET  /v1/models/{name}/{route}?...   a predictor's own query routes (recommendation: /recommend?user=42)
    POST /v1/events                      what users did, into the event store (serve --events); see live.py
    POST /v1/completions                 OpenAI's completions API (streamed or not), for predictors that stream
    /v1/admin/models/{name}/...          load / split / promote / rollback / unload; needs MODELWORKS_ADMIN_TOKEN

Every error is a JSON body {"error": {"code", "message", "field"}, "request_id"} with a 4xx/5xx status; a bad
request never takes the server down (/v1/completions answers errors in OpenAI's shape instead). Inference runs in
per-version threads behind a dynamic batcher (batching.py), and for a predictor that generates step by step also
behind a continuous-batching scheduler (streaming.py); the event loop only parses, validates, decodes and routes.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import itertools
import json
import logging
import math
import os
import secrets
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Callable

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from ..errors import ConfigError, InputError, InputTooLarge, ModelworksError
from ..engine.memory import release_freed_memory
from ..export.package import NAME_PATTERN  # model names, versions and request ids: one character set
from ..events import AsyncEventStore, parse_url
from .batching import Batcher, Draining, InferenceFailed, Overloaded
from .completions import complete, openai_error_body
from .error_formats import ErrorFormats, error_body
from .http import httptools_protocol
from .logs import configure_logging, log, log_request
from .metrics import Metrics
from .online import OnlineMetrics
from .routing import ModelRoute, Version
from .screening import screen_upload
from .streaming import Scheduler, streams
from .media import negotiate

ADMIN_TOKEN_ENV = "MODELWORKS_ADMIN_TOKEN"
CALLER_HEADER = "x-caller-id"
CALLER_HEADER_BYTES = CALLER_HEADER.encode()
MAX_CALLER_ID = 256  # characters: a user or session id, hashed for A/B stickiness; anything longer is not an id
STATIC = Path(__file__).with_name("static")
SWAGGER_UI = files("fastapi_offline") / "static"  # swagger-ui-bundle.js, swagger-ui.css, favicon.png (Swagger UI 5)
SWITCH_INTERVAL_S = 1e-4  # see run_server
QUIET_PATHS = {"/healthz", "/readyz", "/metrics"}  # probed constantly: logged at debug level only


@dataclass
class ServeSettings:
    max_batch_size: int = 32  # 1 turns dynamic batching off
    max_wait_ms: float = 2.0  # longest a batch waits for requests still arriving (its oldest's wait); 0: never
    max_queue: int = 256  # waiting requests per version before 503 (streaming: waiting sequences)
    # per request, arrival to answer (body read and decoding included); then 408 or 504. Streaming: arrival to the
    # first token, then the longest wait for each next token
    timeout_s: float = 10.0
    max_running: int = 32  # streaming predictors: sequences in the running decode batch (continuous batching)
    max_body_bytes: int = 4 * 1024 * 1024  # larger bodies get 413 before they are read
    max_header_bytes: int = 32 * 1024  # request line and headers together; larger get 431 while still arriving
    max_image_pixels: int | None = None  # width x height an image may declare; None: each predictor's default
    decode_threads: int = 2  # threads that decode requests' files, off the event loop
    drain_s: float = 15.0  # graceful shutdown: time in-flight requests get to finish
    admin_token: str | None = None  # None: read MODELWORKS_ADMIN_TOKEN; empty: admin API disabled
    # The event store (sqlite:PATH | postgresql://USER@HOST/DB): POST /v1/events writes it, and predictors that read
    # a user's history (Predictor.history_length) read it at request time. None: no store, no /v1/events.
    events: str | None = None
    # A/B online metrics (serve/online.py): an event for an item a version showed that user at most this long before
    # counts as a hit for that version.
    hit_window_s: float = 1800.0
    # Answer the predictors' GET query routes in front of the framework's middleware stack (serve/hot.py): the same
    # answers, errors, metrics and log lines, for less of the event loop's time. False: through the full stack.
    hot_routes: bool = True

    def __post_init__(self):
        problems = [f"{name}: must be > 0 (got {getattr(self, name)})"
                    for name in ("max_batch_size", "max_queue", "max_running", "timeout_s", "max_body_bytes", "max_header_bytes",
                                 "decode_threads", "drain_s", "hit_window_s")
                    if getattr(self, name) <= 0]
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            problems.append(f"max_image_pixels: must be > 0 (got {self.max_image_pixels})")
        if self.max_wait_ms < 0:
            problems.append(f"max_wait_ms: must be >= 0 (got {self.max_wait_ms})")
        if problems:
            raise ConfigError("serve: " + "; ".join(problems))
        if self.events is not None:
            parse_url(self.events)  # a bad URL fails here, before any model loads
        if self.admin_token is None:
            self.admin_token = os.environ.get(ADMIN_TOKEN_ENV, "")


class DeadlineExceeded(Exception):
    """A request's timeout_s passed before its batch answered."""


class BodyTimeout(Exception):
    """A request's body did not arrive within timeout_s of its headers."""


def expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded())


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def error_response(request: Request, status: int, code: str, message: str, field: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    state = request.scope.setdefault("state", {})
    state["error"] = code
    if not state.get("body_done", True):
        # Answered before the body was read (a file refused from its header): close the connection rather than
        # read and discard the rest of a body that may be megabytes long.
        headers = {**(headers or {}), "Connection": "close"}
    return JSONResponse(error_body(code, message, field, state.get("request_id")), status_code=status,
                        headers=headers)


def unexpected_error(exc: Exception, request_id: str | None) -> ApiError:
    """An exception no handler expected: logged with the request id, and answered as a 500 that names it."""
    log("unhandled error", logging.ERROR, request_id=request_id, error=f"{type(exc).__name__}: {exc}")
    return ApiError(500, "internal_error", f"unexpected {type(exc).__name__}; see the server log for this request id")


def describe_validation_error(exc: ValidationError | RequestValidationError, fields: list[str] | None = None
                              ) -> tuple[str, str | None]:
    """Pydantic's errors as one line per problem, `field: what (got value); fix`."""
    lines, first_field = [], None
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
        where = ".".join(loc) or "body"
        first_field = first_field or where
        if error.get("type") == "extra_forbidden":
            valid = f"; valid fields: {', '.join(fields)}" if fields else ""
            lines.append(f"{where}: unknown field{valid}")
        else:
            got = repr(error.get("input"))
            lines.append(f"{where}: {error.get('msg', 'invalid')} (got {got[:60]})")
    return "; ".join(lines), first_field


def form_value(model: type[BaseModel], key: str, text: str):
    """A multipart text field as the JSON value it spells (`3` -> 3, `true` -> True, `0.5` -> 0.5) unless the field
    is text, else the text itself: forms carry only text, and the request models are strict."""
    field = model.model_fields.get(key)
    if field is not None and field.annotation in (str, str | None):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---------------------------------------------------------------------------------------------- server state


class ModelServer:
    """What the app serves and how: routes by model name, settings, metrics, readiness."""

    def __init__(self, routes: dict[str, ModelRoute], settings: ServeSettings, loader: Callable | None):
        self.routes = routes
        self.settings = settings
        self.loader = loader  # path -> InferenceModel, for the admin API (the CLI passes one that knows tasks)
        self.metrics = Metrics()
        self.error_formats = ErrorFormats()  # the shape of errors answered before routing, by path prefix
        self.ready = False
        self.draining = False
        self.metrics.ready.set_function(lambda: float(self.ready and self.servable))
        self.metrics.queue_capacity.set(settings.max_queue)
        self.admin_lock = asyncio.Lock()
        self.retiring: set[asyncio.Task] = set()  # drains of replaced versions, kept referenced until done
        # Requests' files are decoded here, not on the event loop: a large image must not stall other requests'
        # reads, the probes or the answers. The pool's size also bounds how many decodes hold memory at once.
        self.decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.events: AsyncEventStore | None = None  # opened by the lifespan when settings.events is set
        self.online = OnlineMetrics(self.metrics, settings.hit_window_s)
        self.hot_routes: dict = {}  # path -> serve.hot.HotRoute, filled by the query routes (live.py)

    async def open_events(self) -> None:
        if self.settings.events and self.events is None:
            store = AsyncEventStore(self.settings.events)
            await store.open()
            self.events = store

    async def close_events(self) -> None:
        if self.events is not None:
            store, self.events = self.events, None
            await store.close()

    async def read_history(self, route: ModelRoute, request) -> list[str] | None:
        """The user's latest items from the event store, for a model whose predictor reads them
        (Predictor.history_length > 0, e.g. a sequential recommender); None when it does not, or the request brings
        its own history. Read in the store's thread pool: a lock wait or a network round trip never stalls the loop."""
        if self.events is None:
            return None
        predictors = [version.model.predictor for version in route.versions.values()]
        length = max(predictor.history_length for predictor in predictors)
        user = predictors[0].history_user(request) if length > 0 else None
        if user is None:
            return None
        try:
            return await self.events.latest(user, length)
        except Exception as exc:  # the store is down or locked past its timeout: this request fails, not the server
            log("event store read failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            raise ApiError(503, "event_store_unavailable", f"the event store cannot be read ({type(exc).__name__}); "
                           "retry later", headers={"Retry-After": "1"}) from None

    def new_version(self, name: str, model) -> Version:
        s = self.settings
        route = self.routes[name]
        model.predictor.limit_inputs(max_image_pixels=s.max_image_pixels)
        batcher = Batcher(model, s.max_batch_size, s.max_wait_ms, s.max_queue, self.metrics, (name, model.version),
                          arriving=route.arriving_now)
        scheduler = None
        if streams(model.predictor):
            scheduler = Scheduler(model, s.max_running, s.max_queue, self.metrics, (name, model.version))
        return Version(model, batcher, scheduler)

    @property
    def servable(self) -> bool:
        """Every model has a loaded version with traffic: what /readyz promises a load balancer."""
        return all(route.versions and sum(route.weights.values()) > 0 for route in self.routes.values())

    async def start_version(self, version: Version) -> None:
        """Start its batcher, whose worker first runs the example request at batch size 1 and the largest batch,
        so the first real requests do not pay for memory allocation and kernel selection."""
        predictor = version.model.predictor
        request, file = predictor.example_request()
        item = predictor.parse(request, file)
        await version.batcher.start([[item] * size for size in sorted({1, self.settings.max_batch_size})])
        if version.scheduler is not None:
            await version.scheduler.start()

    @staticmethod
    async def drain_version(version: Version) -> None:
        """Answer every accepted request and sequence, then stop the version's threads."""
        await version.batcher.drain()
        if version.scheduler is not None:
            await version.scheduler.drain()

    def update_weight_metrics(self, route: ModelRoute) -> None:
        total = sum(route.weights.values()) or 1.0
        for name in route.versions:
            self.metrics.traffic_weight.labels(route.name, name).set(route.weights.get(name, 0.0) / total)

    # ------------------------------------------------------------------------------------------ predict

    async def read_request(self, predictor, request: Request, screens: list | None = None):
        # `predictor` may be the class: only its Request model and file_field are read here.
        """(typed request, raw file or None) from a JSON or multipart body. `screens`: the predictors that judge
        the file by its first bytes before the rest of the body is read (Predictor.screen_file)."""
        screens = [p for p in screens or () if p.screen_bytes > 0]
        if predictor.file_field is not None and screens:
            try:
                request = await screen_upload(request, predictor.file_field, [p.screen_file for p in screens],
                                              max(p.screen_bytes for p in screens))
            except InputTooLarge as exc:
                raise ApiError(413, "input_too_large", str(exc), exc.field) from None
            except InputError as exc:
                raise ApiError(422, "invalid_input", str(exc), exc.field) from None
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields = list(predictor.Request.model_fields)
        if content_type == "multipart/form-data":
            if predictor.file_field is None:
                raise ApiError(415, "unsupported_media_type", "Content-Type: this model takes no file upload; "
                               "send application/json")
            try:
                form = await request.form(max_files=1, max_fields=len(fields) + 1)
            except StarletteHTTPException as exc:  # Starlette's report of a malformed form
                raise ApiError(400, "malformed_body", f"body: not a valid multipart form ({exc.detail})") from None
            file, values = None, {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != predictor.file_field:
                        raise ApiError(422, "invalid_input", f"{key}: unexpected file field; upload the file as "
                                       f"{predictor.file_field!r}", key)
                    file = await value.read()
                else:
                    values[key] = form_value(predictor.Request, key, value)
            if file is None and predictor.file_field not in values:
                raise ApiError(422, "invalid_input", f"{predictor.file_field}: missing; add the file as the "
                               f"multipart field {predictor.file_field!r}", predictor.file_field)
            try:
                return predictor.Request.model_validate(values), file
            except ValidationError as exc:
                message, field = describe_validation_error(exc, fields)
                raise ApiError(422, "invalid_input", message, field) from None
        if content_type not in ("application/json", ""):
            raise ApiError(415, "unsupported_media_type", f"Content-Type: {content_type!r} is not accepted; send "
                           "application/json (file base64-encoded) or multipart/form-data")
        body = await request.body()
        if not body.strip():
            example = f'{{"{predictor.file_field}": "<base64>"}}' if predictor.file_field else "a JSON object"
            raise ApiError(400, "empty_body", f"body: empty; send {example}"
                           + (f" or a multipart form with the file field {predictor.file_field!r}"
                              if predictor.file_field else ""))
        try:
            return predictor.Request.model_validate_json(body), None
        except ValidationError as exc:
            if any(e.get("type") == "json_invalid" for e in exc.errors()):
                reason = exc.errors()[0].get("msg", "")
                raise ApiError(400, "malformed_body", f"body: not valid JSON ({reason})") from None
            message, field = describe_validation_error(exc, fields)
            raise ApiError(422, "invalid_input", message, field) from None

    async def predict(self, name: str, request: Request, read_query: Callable | None = None) -> Response:
        """Answer one request through the model's batcher. `read_query() -> (typed request, None)` replaces reading
        the body, for the predictor's GET query routes (Predictor.query_routes)."""
        route = self.routes[name]
        if read_query is None:
            async def read_query():
                screens = [version.model.predictor for version in route.versions.values()]
                return await self.read_request(route.predictor_class, request, screens)
        version, body, media_type = await self.run_prediction(name, request.scope["state"], read_query,
                                                              request.headers.get("accept"))
        return Response(body, media_type=media_type, headers={"X-Model-Version": version})

    async def run_prediction(self, name: str, state: dict, read: Callable, accept: str | None
                             ) -> tuple[str, bytes, str]:
        """(version, body, media type) of one prediction: `read()` gives (typed request, file or None), awaitable or
        not; then history, decoding, the batch, the online record and the envelope. Independent of the framework, so
        the hot GET routes (serve/hot.py) answer through it without Starlette's Request."""
        route = self.routes[name]
        state["model"] = name
        if self.draining:
            raise ApiError(503, "draining", "the server is shutting down; retry on another replica",
                           headers={"Retry-After": "1"})
        timeout_s = self.settings.timeout_s
        remaining_s = lambda: timeout_s - (time.perf_counter() - state["arrival"])  # noqa: E731
        # The deadline runs from the request's arrival: reading the body, decoding and the batch all count.
        key = id(state)
        route.arriving[key] = state  # a batch about to run waits for arriving requests (up to max_wait_ms)
        try:
            async with asyncio.timeout(remaining_s()):
                read_result = read()
                parsed_request, file = await read_result if inspect.isawaitable(read_result) else read_result
                history = await self.read_history(route, parsed_request)
                item, version = await self.parse(route, state, parsed_request, file, history)
        except TimeoutError:
            if not state["body_done"]:
                raise BodyTimeout() from None  # answered 408 by the middleware, as for any route
            raise ApiError(504, "timeout", f"not decoded within {timeout_s} s (timeout_s) of arrival; the server is "
                           "overloaded, retry later") from None
        finally:
            route.arriving.pop(key, None)
        try:
            future = version.batcher.enqueue(item)
        except Overloaded as exc:
            raise ApiError(503, "overloaded", f"the model's queue is full ({self.settings.max_queue} requests "
                           f"waiting); retry after {exc.retry_after_s} s",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        except Draining:
            raise ApiError(503, "draining", "this model version is being unloaded; retry",
                           headers={"Retry-After": "1"}) from None
        # The deadline fails the future itself (cheaper than wait_for's extra future and callbacks); a batch skips a
        # failed future as it skips a cancelled one.
        deadline = asyncio.get_running_loop().call_later(max(0.0, remaining_s()), expire, future)
        try:
            answer = await future
        except DeadlineExceeded:
            raise ApiError(504, "timeout", f"no answer within {timeout_s} s (timeout_s); the server "
                           "is overloaded, retry later") from None
        except InferenceFailed as exc:
            raise ApiError(500, "inference_failed", f"the model failed on this input ({exc})") from None
        finally:
            deadline.cancel()
        predictor = version.model.predictor
        confidence = predictor.confidence(answer)
        if confidence is not None:
            self.metrics.confidence.labels(name, version.name).observe(confidence)
        subject = predictor.subject(parsed_request)
        if subject is not None:  # what this version showed the user, for the online hit rate (serve/online.py)
            self.online.record(name, version.name, subject, predictor.shown_items(answer))
        media = negotiate(version.model.predictor, answer, accept)
        if media is not None:  # the answer as a file the client asked for (serve/media.py)
            return version.name, media[0], media[1]
        envelope = json.dumps({"model": name, "version": version.name, "request_id": state.get("request_id"),
                               "latency_ms": round((time.perf_counter() - state["arrival"]) * 1000, 3)})
        # The prediction is serialised by pydantic directly (no dict in between) and spliced into the envelope.
        body = b"%s, \"prediction\": %s}" % (envelope[:-1].encode(), answer.model_dump_json().encode())
        return version.name, body, "application/json"

    async def parse(self, route: ModelRoute, state: dict, request, file: bytes | None,
                    history: list[str] | None = None) -> tuple[object, Version]:
        """(item, version): the request decoded by the predictor of the version it is routed to, on the event loop
        when the predictor says it is cheap (parse_inline), else in the decode pool. A version swapped out or
        unloaded while its request decoded in the pool is chosen again (an admin swap between the choice and the
        queue would otherwise answer 503). `history`: the user's items from the event store, given to that
        version's predictor (Predictor.with_history)."""
        original = request
        state["body_at"] = math.inf  # decoding: a batch about to run should wait for it
        # A/B stickiness: the X-Caller-Id header, else the user the request is for (Predictor.subject).
        caller = state.get("caller") or next(iter(route.versions.values())).model.predictor.subject(request)
        loop = asyncio.get_running_loop()
        for _ in range(2):
            version = route.choose(caller)
            state["version"] = version.name
            predictor = version.model.predictor
            if history is not None:
                request = predictor.with_history(original, history)
            try:
                item = predictor.parse_inline(request, file)
                if item is not None:
                    return item, version  # nothing awaited since the choice: the version is still the route's
                item = await loop.run_in_executor(self.decoder, predictor.parse, request, file)
            except InputTooLarge as exc:
                raise ApiError(413, "input_too_large", str(exc), exc.field) from None
            except InputError as exc:
                raise ApiError(422, "invalid_input", str(exc), exc.field) from None
            if route.versions.get(version.name) is version:
                break
        return item, version

    # ------------------------------------------------------------------------------------------ admin

    def check_admin(self, authorization: str | None) -> None:
        token = self.settings.admin_token
        if not token:
            raise ApiError(403, "admin_disabled", f"the admin API is disabled; start the server with "
                           f"{ADMIN_TOKEN_ENV} set to a secret to enable it")
        scheme, _, supplied = (authorization or "").partition(" ")
        # The scheme is required (RFC 6750; case-insensitive, as RFC 9110 says of schemes): a bare token is refused
        # like a wrong one, so a client that forgot the prefix learns it here and not behind a proxy that insists.
        if scheme.lower() != "bearer" or not secrets.compare_digest(supplied.strip().encode("utf-8", "replace"),
                                                                     token.encode()):
            raise ApiError(401, "unauthorized", f"Authorization: expected 'Bearer <token>' with the token in "
                           f"{ADMIN_TOKEN_ENV}", headers={"WWW-Authenticate": "Bearer"})

    def route_or_404(self, name: str) -> ModelRoute:
        if name not in self.routes:
            raise ApiError(404, "unknown_model", f"model: {name!r} is not served; served: "
                           f"{', '.join(self.routes)}", "model")
        return self.routes[name]

    async def load_version(self, route: ModelRoute, package: str, weight: float) -> dict:
        if self.loader is None:
            raise ApiError(501, "not_supported", "this server was created without a package loader")
        self.check_weights({**route.weights, "(new)": weight}, "weight")
        try:
            model = await asyncio.to_thread(self.loader, package)
        except ModelworksError as exc:
            raise ApiError(422, "invalid_package", str(exc), "package") from None
        except Exception as exc:  # a runtime refusing a graph (ONNX Runtime, TorchScript): still the package's fault
            raise ApiError(422, "invalid_package", f"package: {package} cannot be loaded ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); export it again", "package") from None
        if model.package.task != route.task or type(model.predictor) is not route.predictor_class:
            raise ApiError(422, "invalid_package", f"package: a {model.package.task!r} model cannot be a version "
                           f"of {route.name!r}, a {route.task!r} model", "package")
        version = self.new_version(route.name, model)
        try:
            await self.start_version(version)  # warmed up before it takes traffic
        except Exception as exc:
            if version.name not in route.versions:
                self.metrics.forget_version(route.name, version.name)
            raise ApiError(422, "invalid_package", f"package: {package} fails on the example request "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); export "
                           "it again", "package") from None
        old = route.versions.get(version.name)
        route.versions[version.name] = version  # the swap: one assignment, between two requests
        weights = dict(route.weights)
        if old is None or weight > 0:
            weights[version.name] = weight
        route.set_weights(weights, remember=old is None and weight > 0)
        self.update_weight_metrics(route)
        if old is not None:
            self.retire(old)
        log("version loaded", model=route.name, version=version.name, package=package, replaced=old is not None)
        return route.describe()

    def retire(self, version: Version) -> None:
        async def drain_and_release():
            await self.drain_version(version)
            release_freed_memory()

        task = asyncio.get_running_loop().create_task(drain_and_release())
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    @staticmethod
    def check_weights(weights: dict[str, float], field: str = "weights") -> None:
        """Before anything changes. NaN passes `w < 0` and json.dumps writes it: once applied, every route.choose()
        failed. Weights are summed, so an infinity, or a sum that overflows (1e308 + 1e308), would make the split
        meaningless."""
        total = sum(weights.values())
        if not all(math.isfinite(w) and w >= 0 for w in weights.values()) or not 0 < total < math.inf:
            raise ApiError(422, "invalid_input", f"{field}: each weight must be a finite number >= 0, not all 0, with "
                           f"a finite sum (got { {v: str(w) for v, w in weights.items()} })", field)

    def set_split(self, route: ModelRoute, weights: dict[str, float]) -> dict:
        unknown = sorted(set(weights) - set(route.versions))
        if unknown:
            raise ApiError(422, "invalid_input", f"weights: unknown versions {unknown}; loaded: "
                           f"{', '.join(route.versions)}", "weights")
        self.check_weights(weights)
        route.set_weights(weights)
        self.update_weight_metrics(route)
        log("traffic split", model=route.name, weights=route.weights)
        return route.describe()


# ---------------------------------------------------------------------------------------------- middleware


class BodyTooLarge(Exception):
    pass


# Request ids: a random prefix per process, then a counter (32 hex digits, as uuid4().hex was): unique across
# replicas and restarts for all practical purposes, without uuid4's os.urandom call per request (4% of the event
# loop's time at 1,000 req/s).
_REQUEST_PREFIX = uuid.uuid4().hex[:16]
_REQUEST_COUNTER = itertools.count()


def next_request_id() -> str:
    return f"{_REQUEST_PREFIX}{next(_REQUEST_COUNTER):016x}"


class RequestContext:
    """Pure ASGI middleware (no per-request task like BaseHTTPMiddleware): request id, body size limit, the
    JSON access log line, and the per-model request metrics."""

    def __init__(self, app, server: ModelServer):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrival = time.perf_counter()
        headers = dict(scope["headers"])
        state = scope.setdefault("state", {})
        state.update(open_request(scope, headers, arrival))
        request_id, caller = state["request_id"], headers.get(CALLER_HEADER_BYTES)
        length = headers.get(b"content-length")
        status, started = 500, False

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        settings = self.server.settings
        limit, received = settings.max_body_bytes, 0

        async def limited_receive():
            """The body, within its size limit and the request's timeout; once it is complete, receive() waits for
            a disconnect, untimed."""
            nonlocal received
            if state["body_done"]:
                return await receive()
            try:
                async with asyncio.timeout(settings.timeout_s - (time.perf_counter() - arrival)):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                state["body_at"] = time.perf_counter()
                if received > limit:
                    raise BodyTooLarge()
                state["body_done"] = not message.get("more_body", False)
            else:
                state["body_done"] = True
            return message

        try:
            if caller is not None and len(caller) > MAX_CALLER_ID:
                await self.refuse(send_with_id, state, 400, "invalid_header", f"{CALLER_HEADER}: longer than "
                                  f"{MAX_CALLER_ID} characters (got {len(caller)}); send a user or session id")
            elif length is not None and (not length.isdigit() or int(length) > limit):
                await self.too_large(send_with_id, state, limit, length)
            else:
                await self.app(scope, limited_receive, send_with_id)
        except BodyTooLarge:  # a chunked body that passed no Content-Length
            if not started:
                await self.too_large(send_with_id, state, limit, None)
        except BodyTimeout:
            if not started:
                await self.refuse(send_with_id, state, 408, "body_timeout", f"body: not received within "
                                  f"{settings.timeout_s} s (timeout_s); send the whole body promptly")
        finally:
            self.record(scope, state, status, time.perf_counter() - arrival)

    async def too_large(self, send, state: dict, limit: int, length: bytes | None) -> None:
        got = f" (got {length.decode('latin-1')} bytes)" if length else ""
        await self.refuse(send, state, 413, "body_too_large", f"body: larger than the limit of {limit} bytes{got}; "
                         "send a smaller file (the server's --max-body-bytes)")

    async def refuse(self, send, state: dict, status: int, code: str, message: str) -> None:
        """An error answered before (or instead of) the app, in the shape the path's API uses (error_formats.py);
        the connection is closed, since the rest of the body may still be on its way."""
        state["error"] = code
        body = json.dumps(self.server.error_formats.body(state["path"], status, code, message,
                                                         state.get("request_id"))).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def record(self, scope, state: dict, status: int, seconds: float) -> None:
        record_request(self.server, scope, state, status, seconds)


def open_request(scope, headers: dict[bytes, bytes], arrival: float) -> dict:
    """A request's state: its id (the client's X-Request-Id when it is a valid id, else a new one), arrival time,
    whether a body is on its way, and the caller id for A/B stickiness."""
    supplied = headers.get(b"x-request-id", b"").decode("latin-1")
    request_id = supplied if NAME_PATTERN.match(supplied) else next_request_id()
    caller = headers.get(CALLER_HEADER_BYTES)
    length = headers.get(b"content-length")
    expects_body = length not in (None, b"0") or b"chunked" in headers.get(b"transfer-encoding", b"").lower()
    return {"request_id": request_id, "arrival": arrival, "body_at": arrival, "body_done": not expects_body,
            "caller": caller.decode("latin-1") if caller else None, "path": scope["path"]}


def record_request(server: ModelServer, scope, state: dict, status: int, seconds: float) -> None:
    """The request's metrics (per model, version and status) and its access log line."""
    model, version = state.get("model"), state.get("version", "")
    metrics = server.metrics
    path = scope["path"]
    if model is None and path.startswith("/v1/models/"):
        # Refused before routing (e.g. 413): the name in the path is a label only if it is a served model,
        # never an arbitrary string from the URL (unbounded label cardinality).
        named = path.split("/")[3]
        model = named if named in server.routes else "(unknown)"
    if model is not None:
        requests, latency = metrics.request_series(model, version, status)
        requests.inc()
        latency.observe(seconds)
        if status >= 400:
            metrics.errors.labels(model, version, state.get("error", str(status))).inc()
    level = logging.DEBUG if scope["path"] in QUIET_PATHS and status < 400 else logging.INFO
    log_request(level, request_id=state.get("request_id"), method=scope.get("method"), path=scope["path"],
                status=status, latency_ms=round(seconds * 1000, 3), model=state.get("model"),
                version=state.get("version"), error=state.get("error"))


# ---------------------------------------------------------------------------------------------- the app


Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable kind, e.g. invalid_input, unknown_model, last_version.")
    message: str = Field(description="What was wrong, where, and what to do.")
    field: str | None = Field(description="The request field at fault, when there is one.")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer has this shape."""
    error: ErrorDetail
    request_id: str | None


def documented_errors(descriptions: dict[int, str]) -> dict:
    return {status: {"model": ErrorBody, "description": text} for status, text in descriptions.items()}


ADMIN_SECURITY = [{"adminToken": []}]  # declared in install_openapi


def admin_errors(**more: str) -> dict:
    """The errors every admin route may answer, and those of one route (`more`: status as `e409=...`)."""
    return documented_errors({
        401: "Missing or wrong `Authorization: Bearer <token>`",
        403: f"The admin API is disabled ({ADMIN_TOKEN_ENV} unset)",
        404: "Unknown model (or version)", 422: "Invalid body or value",
        **{int(key[1:]): text for key, text in more.items()}})


class LoadVersionBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    package: str = Field(description="Path of a model package on the server's disk.")
    weight: Weight = Field(0.0, description="Traffic share once loaded; 0 keeps it out of traffic.")


class SplitBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    weights: dict[str, Weight] = Field(description="Traffic share per version, e.g. {\"v1\": 90, \"v2\": 10}: "
                                                   "finite, >= 0, not all 0.")


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: str


def group_models(models: list, weights: list[float] | None, name: str | None) -> dict[str, tuple[list, list]]:
    """One model name (the first package's, or `name`) for the packages given: they are its versions."""
    if not models:
        raise ConfigError("serve: give at least one model package")
    weights = weights or [100.0] + [0.0] * (len(models) - 1)
    name = name or models[0].name
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"--name: {name!r} cannot be a URL segment; use letters, digits, '.', '_' and '-'")
    versions = [m.version for m in models]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"serve: the packages share a version ({', '.join(versions)}); each version must be "
                          "distinct (modelworks export --version)")
    tasks = {m.package.task for m in models}
    if len(tasks) > 1 or len({type(m.predictor) for m in models}) > 1:
        raise ConfigError(f"serve: versions of one model must be of one task (got {', '.join(sorted(tasks))})")
    return {name: (models, weights)}


class ModelApp(FastAPI):
    """FastAPI, with the predictors' GET query routes answered in front of all of it (serve/hot.py) when the serve
    settings allow: before its middleware stack, and before its own per-request work (FastAPI's __call__ checks
    whether OpenTelemetry is configured, reading the environment, for every request)."""

    entry: Callable | None = None  # set on the first call, once every route is registered

    async def __call__(self, scope, receive, send):
        if self.entry is None:
            server: ModelServer = self.state.server
            self.entry = super().__call__
            if server.settings.hot_routes and server.hot_routes:
                from .hot import HotRoutes  # hot.py builds on this module's request state, records and errors

                self.entry = HotRoutes(super().__call__, server)
        await self.entry(scope, receive, send)


def create_app(models: list, weights: list[float] | None = None, settings: ServeSettings | None = None,
               loader: Callable | None = None, name: str | None = None) -> FastAPI:
    """The app serving `models` (export.runtime.InferenceModel) as versions of one model name.

    `weights` is the traffic split (default: all to the first); `loader(path) -> InferenceModel` lets the
    admin API load new versions."""
    settings = settings or ServeSettings()
    groups = group_models(models, weights, name)
    routes = {model_name: ModelRoute(model_name) for model_name in groups}
    server = ModelServer(routes, settings, loader)
    # /docs from Swagger UI's files in the fastapi-offline package, not FastAPI's default CDN: offline, on a
    # closed network or behind a proxy the default page is blank. ReDoc (another CDN page) is not offered.
    app = ModelApp(title="modelworks model server", version=__import__("modelworks").__version__,
                   lifespan=make_lifespan(server, groups), description=__doc__, docs_url=None, redoc_url=None)
    app.mount("/docs-assets", StaticFiles(directory=SWAGGER_UI), name="docs-assets")
    app.state.server = server
    app.add_middleware(RequestContext, server=server)
    install_error_handlers(app)
    add_probe_routes(app, server)
    documented = add_model_routes(app, server, groups)
    from .live import add_event_routes, add_query_routes  # live.py builds on this module's errors and envelope

    add_query_routes(app, server, groups, documented)
    add_event_routes(app, server, documented)
    add_admin_routes(app, server)
    install_openapi(app, groups, documented)
    return app


def make_lifespan(server: ModelServer, groups: dict) -> Callable:
    """Start: open the event store, load, warm up and route every version; stop: drain them, close the store."""
    routes, settings = server.routes, server.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.open_events()
        for model_name, (group, group_weights) in groups.items():
            route = routes[model_name]
            route.versions.clear()
            for model in group:
                version = server.new_version(model_name, model)
                route.versions[version.name] = version
                await server.start_version(version)
            route.set_weights(dict(zip([m.version for m in group], group_weights)), remember=False)
            server.update_weight_metrics(route)
        # Everything loaded so far (torch, ONNX Runtime, the models) lives as long as the process: moving it out
        # of the garbage collector's reach keeps full collections, triggered by per-request allocations, from
        # scanning millions of objects (pauses of a few hundred ms, seen as p99 spikes under load).
        gc.collect()
        gc.freeze()
        server.ready, server.draining = True, False
        log("ready", models={n: r.describe()["versions"] for n, r in routes.items()},
            max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue)
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for in-flight requests; answer anything still queued.
            server.ready, server.draining = False, True
            versions = [v for r in routes.values() for v in r.versions.values()]
            await asyncio.gather(*(server.drain_version(v) for v in versions), *server.retiring)
            await server.close_events()
            log("stopped", answered_all=all(v.batcher.unfinished == 0 for v in versions))

    return lifespan


def install_error_handlers(app: FastAPI) -> None:
    """Every error as the JSON body of error_response, a 4xx/5xx status, and the server still up."""
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += "; see /docs for the API"
        return error_response(request, exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, field = describe_validation_error(exc)
        return error_response(request, 422, "invalid_input", message, field)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        error = unexpected_error(exc, request.scope.get("state", {}).get("request_id"))
        return error_response(request, error.status, error.code, error.message)


def add_probe_routes(app: FastAPI, server: ModelServer) -> None:
    """The demo page, /docs, and the probes: /healthz, /readyz, /metrics."""
    routes = server.routes

    # ------------------------------------------------------------------------------------------ probes

    @app.get("/", include_in_schema=False)
    async def demo_page():
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/docs", include_in_schema=False)
    async def docs_page():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title}: API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # its badge calls swagger.io

    @app.get("/healthz", tags=["probes"], summary="The process is alive")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz", tags=["probes"], summary="Models loaded and warmed up; 503 while starting or draining")
    async def readyz():
        if not server.ready:
            status = "draining" if server.draining else "starting"
            return JSONResponse({"status": status}, status_code=503)
        if not server.servable:  # cannot happen through the admin API, which keeps a version with traffic; checked
            return JSONResponse({"status": "no servable version"}, status_code=503)
        return {"status": "ready", "models": {n: [v for v in r.versions] for n, r in routes.items()}}

    @app.get("/metrics", tags=["probes"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def add_model_routes(app: FastAPI, server: ModelServer, groups: dict) -> list[APIRoute]:
    """/v1/models, each model's predict route and /v1/completions; returns the routes served by Starlette that
    the OpenAPI schema documents."""
    routes = server.routes

    # ------------------------------------------------------------------------------------------ models

    @app.get("/v1/models", tags=["models"], summary="Served models, their versions and traffic split")
    async def list_models():
        described = [describe_route(r) for r in routes.values()]
        # `object` and `data` are OpenAI's list shape (the `openai` client's models.list reads them).
        return {"models": described, "object": "list",
                "data": [{"id": d["name"], "object": "model", "created": int(min(
                    v.loaded_at for v in routes[d["name"]].versions.values())), "owned_by": "modelworks"}
                    for d in described]}

    @app.get("/v1/models/{name}", tags=["models"], summary="One served model",
             responses=documented_errors({404: "Unknown model"}))
    async def get_model(name: str):
        return describe_route(server.route_or_404(name))

    documented: list[APIRoute] = []  # served by Starlette routes, described in the OpenAPI schema
    for model_name, (group, _) in groups.items():
        register_predict_route(app, server, model_name, type(group[0].predictor), documented)

    @app.post("/v1/completions", tags=["predict"], summary="OpenAI-compatible text completion, streamed or not",
              description="For models whose predictor generates step by step (GET /v1/models: `streams`). Errors "
                          "have OpenAI's shape: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}.")
    async def completions(request: Request):
        return await complete(server, request)

    server.error_formats.register("/v1/completions", openai_error_body)

    @app.post("/v1/models/{name}/predict", include_in_schema=False)
    async def predict_unknown(name: str):
        server.route_or_404(name)
    return documented


def add_admin_routes(app: FastAPI, server: ModelServer) -> None:
    """/v1/admin/models/{name}/...: load, split, promote, rollback, unload; each behind the admin token."""
    # ------------------------------------------------------------------------------------------ admin

    @app.post("/v1/admin/models/{name}/versions", tags=["admin"], openapi_extra={"security": ADMIN_SECURITY},
              summary="Load a package as a version (or reload one), warmed up before it takes traffic",
              responses=admin_errors(e422="Invalid body or weight, or a package that cannot be loaded or fails its "
                                          "warm-up", e501="No package loader (an embedded server)"))
    async def admin_load(name: str, body: LoadVersionBody, authorization: str | None = Header(None)):
        server.check_admin(authorization)
        async with server.admin_lock:
            return await server.load_version(server.route_or_404(name), body.package, body.weight)

    @app.put("/v1/admin/models/{name}/split", tags=["admin"], summary="Set the traffic split between versions",
             openapi_extra={"security": ADMIN_SECURITY}, responses=admin_errors())
    async def admin_split(name: str, body: SplitBody, authorization: str | None = Header(None)):
        server.check_admin(authorization)
        async with server.admin_lock:
            return server.set_split(server.route_or_404(name), body.weights)

    @app.post("/v1/admin/models/{name}/promote", tags=["admin"], openapi_extra={"security": ADMIN_SECURITY},
              summary="Send all traffic to one version; the others stay loaded for rollback",
              responses=admin_errors())
    async def admin_promote(name: str, body: PromoteBody, authorization: str | None = Header(None)):
        server.check_admin(authorization)
        async with server.admin_lock:
            route = server.route_or_404(name)
            if body.version not in route.versions:
                raise ApiError(422, "invalid_input", f"version: {body.version!r} is not loaded; loaded: "
                               f"{', '.join(route.versions)}", "version")
            return server.set_split(route, {body.version: 100.0})

    @app.post("/v1/admin/models/{name}/rollback", tags=["admin"], summary="Restore the split before the last change",
              openapi_extra={"security": ADMIN_SECURITY}, responses=admin_errors(e409="No earlier split to restore"))
    async def admin_rollback(name: str, authorization: str | None = Header(None)):
        server.check_admin(authorization)
        async with server.admin_lock:
            route = server.route_or_404(name)
            while route.history:
                previous = {v: w for v, w in route.history.pop().items() if v in route.versions}
                if sum(previous.values()) > 0:
                    route.set_weights(previous, remember=False)
                    server.update_weight_metrics(route)
                    log("rollback", model=name, weights=route.weights)
                    return route.describe()
            raise ApiError(409, "nothing_to_roll_back", "rollback: no earlier split of loaded versions")

    @app.delete("/v1/admin/models/{name}/versions/{version}", tags=["admin"],
                summary="Unload a version with no traffic, after its queued requests are answered",
                openapi_extra={"security": ADMIN_SECURITY},
                responses=admin_errors(e409="The version has traffic, or is the model's last"))
    async def admin_unload(name: str, version: str, authorization: str | None = Header(None)):
        server.check_admin(authorization)
        async with server.admin_lock:
            route = server.route_or_404(name)
            if version not in route.versions:
                raise ApiError(404, "unknown_version", f"version: {version!r} is not loaded", "version")
            if len(route.versions) == 1:
                raise ApiError(409, "last_version", f"version: {version!r} is the only version of {name!r}; load "
                               "another version before unloading this one", "version")
            if route.weights.get(version, 0) > 0:
                raise ApiError(409, "version_in_use", f"version: {version!r} still has traffic; move its weight "
                               "to another version first (split or promote)", "version")
            retired = route.versions.pop(version)
            route.weights.pop(version, None)
            route.history = [{v: w for v, w in h.items() if v != version} for h in route.history]
            await server.drain_version(retired)
            server.metrics.forget_version(name, version)
            server.online.forget_version(name, version)
            del retired
            gc.collect()  # the version's model, runtime session and batcher, before their memory is handed back
            release_freed_memory()
            log("version unloaded", model=name, version=version)
            return route.describe()


def describe_route(route: ModelRoute) -> dict:
    predictor = next(iter(route.versions.values())).model.predictor
    spec = predictor.spec
    return {**route.describe(), "predict": f"/v1/models/{route.name}/predict", "inputs": spec.get("inputs"),
            "outputs": spec.get("outputs"), "labels": spec.get("labels"), "file_field": predictor.file_field,
            "request_fields": list(predictor.Request.model_fields), "preprocessing": spec.get("preprocessing"),
            "postprocessing": spec.get("postprocessing"), "limits": predictor.limits,
            "streams": route.streams, "completions": "/v1/completions" if route.streams else None,
            "generates": spec.get("generates")}


@functools.cache
def response_envelope(predictor_class: type) -> type[BaseModel]:
    """The documented answer of a predict (or query) route: the prediction and which version gave it."""
    return create_model(
        f"{predictor_class.Response.__name__}Envelope",
        model=(str, ...), version=(str, Field(description="The version that answered (A/B).")),
        request_id=(str, ...), latency_ms=(float, Field(description="Server time from arrival to answer.")),
        prediction=(predictor_class.Response, ...))


def register_predict_route(app: FastAPI, server: ModelServer, name: str, predictor_class: type,
                           documented: list[APIRoute]) -> None:
    """POST /v1/models/{name}/predict, documented with the predictor's own request and response models."""
    envelope = response_envelope(predictor_class)
    request_schema = {"$ref": f"#/components/schemas/{predictor_class.Request.__name__}"}
    content = {"application/json": {"schema": request_schema}}
    if predictor_class.file_field:
        properties = dict(predictor_class.Request.model_json_schema().get("properties", {}))
        properties[predictor_class.file_field] = {"type": "string", "format": "binary"}
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": properties,
                                                     "required": [predictor_class.file_field]}}
    errors = {status: {"description": text} for status, text in {
        400: "Empty or malformed body, or an X-Caller-Id over 256 characters", 404: "Unknown model",
        408: "Body not received within timeout_s", 413: "Body over the size limit, or an image declaring more "
        "pixels than max_image_pixels (checked before decoding)", 415: "Unsupported Content-Type",
        422: "Unusable input (e.g. undecodable or animated image, wrong size, wrong type)",
        431: "Request line and headers over max_header_bytes (connection closed)",
        500: "The model failed on this input alone (other requests in its batch are answered)",
        503: "Queue full or draining (Retry-After)", 504: "Per-request timeout"}.items()}

    async def predict(request: Request) -> Response:
        return await server.predict(name, request)

    # FastAPI documents the route; a plain Starlette route serves it. The route reads its own body (JSON or
    # multipart), so FastAPI's per-request dependency solving would only add time (about 30 us a request).
    path = f"/v1/models/{name}/predict"
    documented.append(APIRoute(path, predict, methods=["POST"], response_model=envelope, tags=["predict"],
                               summary=f"Predict with {name}", responses=errors,
                               description=f"Send a {CALLER_HEADER} header to stay on one version under an A/B "
                                           "split.",
                               openapi_extra={"requestBody": {"required": True, "content": content}}))
    app.router.routes.append(Route(path, predict, methods=["POST"]))


def install_openapi(app: FastAPI, groups: dict, documented: list[APIRoute]) -> None:
    """FastAPI documents only routes it serves and bodies it parses itself; the predict routes are served by
    Starlette and parse their own bodies (JSON or multipart), so they and their request models are added here."""

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=[*app.routes, *documented])
        schema.setdefault("components", {})["securitySchemes"] = {"adminToken": {
            "type": "http", "scheme": "bearer", "description": f"The server's {ADMIN_TOKEN_ENV}"}}
        components = schema["components"].setdefault("schemas", {})
        for group, _ in groups.values():
            request_model = type(group[0].predictor).Request
            body = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[request_model.__name__] = body
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def run_server(models: list, weights: list[float], settings: ServeSettings, loader: Callable | None, host: str,
               port: int, name: str | None = None, log_level: str = "info") -> int | None:
    """Serve until SIGINT/SIGTERM, then stop accepting, let in-flight requests finish (up to drain_s), exit.
    Returns the signal that stopped the server (None: it stopped by itself)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the signal it caught once the drain is done, but a Ctrl-C raised then reaches
        asyncio's runner, which may let the finished serve() return normally: remember the first signal here."""
        stopped_by: int | None = None

        def handle_exit(self, sig, frame) -> None:
            self.stopped_by = self.stopped_by or sig
            super().handle_exit(sig, frame)

    configure_logging(log_level)
    # The event loop and the inference thread share the GIL. A thread that wants it back (the worker after a graph
    # run) waits until the holder lets go, at the latest after the switch interval: by default 5 ms, about a whole
    # batch of a small model, during which the graph sits idle. With 0.1 ms, batching with --threads 1 served 1130-
    # 1200 instead of 1020-1035 req/s at 32 clients (2 cores, bench/serve.py); with the default threads, no change.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = create_app(models, weights, settings, loader, name)
    if not settings.admin_token:
        log("admin API disabled", reason=f"{ADMIN_TOKEN_ENV} is not set")
    # The request head's size and arrival time are bounded in the protocol (serve/http.py), before the app sees it.
    protocol = httptools_protocol(settings.max_header_bytes, settings.timeout_s, app.state.server.error_formats)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=settings.drain_s, log_level=log_level,
                            http=protocol or "h11", h11_max_incomplete_event_size=settings.max_header_bytes)
    server = Server(config)
    server.run()
    return server.stopped_by
