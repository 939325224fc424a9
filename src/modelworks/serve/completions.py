"""POST /v1/completions: OpenAI's text-completion API over any streaming predictor (serve/streaming.py).

The request, the response, the server-sent events (`data: {...}` chunks, then `data: [DONE]`) and the error body
(`{"error": {"message", "type", "param", "code"}}`) have OpenAI's shapes, so the official `openai` client works
against this server (`base_url=http://HOST:PORT/v1`). `model`, `prompt` (a string or a list of strings), `n`,
`stream`, `stream_options` and `user` are read here; every other field (max_tokens, temperature, top_p, stop,
seed, and extras such as top_k, min_p, repetition_penalty) goes to the predictor's own typed Request, which
names any field it does not know. With `seed` and n > 1, choice j samples with seed + j (equal seeds would give
n equal texts).

Deadlines: `timeout_s` bounds the time from arrival to the first token of every choice (504 before a streamed
answer has started), and then the wait for each next token (a stalled generation ends with an error event); a
stream's length is bounded by max_tokens, itself capped by the predictor. A client that disconnects has its
sequences dropped from the running batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InputError, InputTooLarge
from .batching import Draining, InferenceFailed, Overloaded

MAX_CHOICES = 16  # prompts x n in one request


class CompletionsBody(BaseModel):
    # Fields beyond these are the predictor's: they are validated by its Request model.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(None, description="A served model's name; may be left out when one model is served.")
    prompt: str | list[str] = Field(description="The text to continue, or several texts (one choice each).")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Completions per prompt.")
    stream: bool = Field(False, description="Send the text as server-sent events as it is generated.")
    stream_options: dict | None = Field(None, description='{"include_usage": true} adds a last chunk with usage.')
    user: str | None = Field(None, description="The caller's id (OpenAI's field); used for A/B stickiness.")


class CompletionError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @property
    def kind(self) -> str:
        special = {408: "timeout_error", 503: "overloaded_error", 504: "timeout_error"}
        return special.get(self.status, "invalid_request_error" if 400 <= self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def openai_error_body(status: int, code: str, message: str, request_id: str | None = None) -> dict:
    """An error produced before routing (413, 408, 431: serve/error_formats.py) in OpenAI's shape."""
    return CompletionError(status, message, code=code).body()


def error_response(request: Request, exc: CompletionError) -> JSONResponse:
    request.scope.setdefault("state", {})["error"] = exc.code or exc.kind
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def describe_errors(exc: ValidationError) -> tuple[str, str | None]:
    lines, first = [], None
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        where = ".".join(loc) or "body"
        first = first or (loc[0] if loc else None)  # the request field (a union's member name is not one)
        if error.get("type") == "extra_forbidden":
            lines.append(f"{where}: unknown field")
        else:
            lines.append(f"{where}: {error.get('msg', 'invalid')} (got {repr(error.get('input'))[:60]})")
    return "; ".join(lines), first


async def read_body(request: Request, predictor_class: type) -> tuple[CompletionsBody, list]:
    """The OpenAI body, and one predictor Request per choice (prompt-major, as OpenAI orders choices)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/json", ""):
        raise CompletionError(415, f"Content-Type: {content_type!r} is not accepted; send application/json",
                              code="unsupported_media_type")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CompletionError(400, f"body: not valid JSON ({exc})", code="malformed_body") from None
    if not isinstance(data, dict):
        raise CompletionError(400, "body: send a JSON object, e.g. {\"prompt\": \"ROMEO:\", \"max_tokens\": 50}",
                              code="malformed_body")
    try:
        body = CompletionsBody.model_validate(data)
    except ValidationError as exc:
        message, param = describe_errors(exc)
        raise CompletionError(400, message, param, "invalid_input") from None
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise CompletionError(400, "prompt: an empty list; give a text, or a list of texts", "prompt", "invalid_input")
    if len(prompts) * body.n > MAX_CHOICES:
        raise CompletionError(400, f"n: {len(prompts)} prompts x n={body.n} is over {MAX_CHOICES} choices in one "
                              "request; send fewer", "n", "invalid_input")
    rest = dict(body.model_extra or {})
    seed = rest.get("seed")
    requests = []
    for prompt in prompts:
        for j in range(body.n):
            fields = {**rest, "prompt": prompt}
            if isinstance(seed, int) and not isinstance(seed, bool) and body.n > 1:
                fields["seed"] = seed + j
            try:
                requests.append(predictor_class.Request.model_validate(fields))
            except ValidationError as exc:
                message, param = describe_errors(exc)
                raise CompletionError(400, message, param, "invalid_input") from None
    return body, requests


def encode_event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def complete(server, request: Request) -> Response:
    """The route: choose the model, validate, queue the sequences, answer (whole or streamed)."""
    state = request.scope["state"]
    try:
        return await answer(server, request, state)
    except CompletionError as exc:
        return error_response(request, exc)


async def answer(server, request: Request, state: dict) -> Response:
    settings = server.settings
    if server.draining:
        raise CompletionError(503, "the server is shutting down; retry on another replica", code="draining",
                              headers={"Retry-After": "1"})
    streaming_routes = {name: route for name, route in server.routes.items() if route.streams}
    if not streaming_routes:
        raise CompletionError(404, "no served model generates text; /v1/completions needs one", "model",
                              "model_not_found")
    # The model is named inside the body: read it with the first streaming route's Request model, and again below
    # if the named model's differs. A body that does not arrive within timeout_s is answered 408 by the middleware
    # (in OpenAI's shape: serve/error_formats.py), as on every route.
    first = next(iter(streaming_routes.values()))
    body, requests = await read_body(request, first.predictor_class)
    name = body.model
    if name is None:
        if len(streaming_routes) > 1:
            raise CompletionError(400, f"model: missing; served: {', '.join(streaming_routes)}", "model",
                                  "invalid_input")
        name = next(iter(streaming_routes))
    if name not in streaming_routes:
        raise CompletionError(404, f"model: {name!r} is not served for completions; served: "
                              f"{', '.join(streaming_routes)}", "model", "model_not_found")
    route = streaming_routes[name]
    if route.predictor_class is not first.predictor_class:
        body, requests = await read_body(request, route.predictor_class)
    state["model"] = name
    version = route.choose(body.user or state.get("caller"))
    state["version"] = version.name
    predictor = version.model.predictor
    items = []
    for number, parsed in enumerate(requests):
        try:
            items.append(await asyncio.get_running_loop().run_in_executor(server.decoder, predictor.parse, parsed))
        except (InputError, InputTooLarge) as exc:
            field = exc.field
            where = f" (prompt {number // body.n})" if len(requests) > 1 else ""
            raise CompletionError(400, f"{exc}{where}", field, "invalid_input") from None
    try:
        created = version.scheduler.submit(items)
    except Overloaded as exc:
        raise CompletionError(503, f"the model's queue is full ({settings.max_queue} sequences waiting); retry "
                              f"after {exc.retry_after_s} s", code="overloaded",
                              headers={"Retry-After": str(exc.retry_after_s)}) from None
    except Draining:
        raise CompletionError(503, "this model version is being unloaded; retry", code="draining",
                              headers={"Retry-After": "1"}) from None
    generation = Generation(server, request, state, name, version, created, body)
    if body.stream:
        return await generation.stream_response()
    return await generation.whole_response()


class Generation:
    """One request's sequences, from queued to answered; cancels them if the client leaves or a deadline passes."""

    def __init__(self, server, request: Request, state: dict, name: str, version, created: list, body):
        self.server, self.request, self.state = server, request, state
        self.name, self.version, self.created, self.body = name, version, created, body
        self.events: asyncio.Queue = created[0].events
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.timestamp = int(time.time())
        self.open = {stream.index for stream in created}
        self.chunk_head: bytes | None = None  # text_chunk's constant start
        self.watcher = asyncio.get_running_loop().create_task(self.watch_disconnect())

    async def watch_disconnect(self) -> None:
        """The body is read: receive() now returns only when the client disconnects."""
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.version.scheduler.cancel(self.created)
                self.events.put_nowait((None, None))  # wakes a wait for the next token: nobody is left to answer
                return

    def close(self) -> None:
        self.version.scheduler.cancel(self.created)
        self.watcher.cancel()

    async def next_event(self, first: bool):
        """(index, Delta); the deadline is the request's timeout_s from arrival until every choice has started,
        then timeout_s per token."""
        timeout_s = self.server.settings.timeout_s
        limit = timeout_s - (time.perf_counter() - self.state["arrival"]) if first else timeout_s
        try:
            async with asyncio.timeout(max(limit, 0.0)):
                index, event = await self.events.get()
        except TimeoutError:
            raise CompletionError(504, f"no token within {timeout_s} s (timeout_s); the server is overloaded, "
                                  "retry later", code="timeout") from None
        return self.accept(index, event)

    def accept(self, index, event):
        if index is None:
            raise CompletionError(499, "the client disconnected", code="client_disconnected")
        if isinstance(event, InferenceFailed):
            raise CompletionError(500, f"the model failed on this input ({event})", code="inference_failed")
        if event.finished:
            self.open.discard(index)
        return index, event

    def merge_ready(self, index: int, delta) -> tuple[str, bool, str | None, tuple | None]:
        """The deltas of choice `index` already queued behind `delta`, joined: under load the worker steps while
        this stream's previous chunk is being written, and one chunk per waiting token would multiply the writes
        (and the client's reads) by the backlog. Returns (text, finished, finish_reason, the first event of
        another choice, held for the next chunk)."""
        text, finished, reason = delta.text, delta.finished, delta.finish_reason
        while not finished and not self.events.empty():
            other = self.accept(*self.events.get_nowait())
            if other[0] != index:
                return text, finished, reason, other
            text += other[1].text
            finished, reason = other[1].finished, other[1].finish_reason
        return text, finished, reason, None

    def usage(self) -> dict:
        prompt = sum(len(s.sequence.item.prompt_ids) for s in self.created) // self.body.n
        completion = sum(self.version.model.predictor.respond(s.sequence).completion_tokens for s in self.created)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, choices: list, **more) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.timestamp, "model": self.name,
                "choices": choices, **more}

    def text_chunk(self, text: str, index: int, finish_reason: str | None) -> bytes:
        """One text event, byte for byte as encode_event(self.envelope([choice])) renders it, from a head rendered
        once per request: under load the event loop writes one per token and stream."""
        if self.chunk_head is None:
            self.chunk_head = encode_event(self.envelope([{"text": ""}]))[:-len(b'""}]}\n\n')]
        return b'%s%s,"index":%d,"logprobs":null,"finish_reason":%s}]}\n\n' % (
            self.chunk_head, json.dumps(text).encode(), index, json.dumps(finish_reason).encode())

    async def whole_response(self) -> Response:
        try:
            started = set()
            while self.open:
                index, _ = await self.next_event(first=len(started) < len(self.created))
                started.add(index)
        except CompletionError as exc:
            self.close()
            return error_response(self.request, exc)
        finally:
            self.watcher.cancel()
        predictor = self.version.model.predictor
        choices = []
        for stream in self.created:
            response = predictor.respond(stream.sequence)
            choices.append({"text": response.text, "index": stream.index, "logprobs": None,
                            "finish_reason": response.finish_reason})
        return JSONResponse(self.envelope(choices, usage=self.usage()), headers={"X-Model-Version": self.version.name})

    async def stream_response(self) -> Response:
        # The first token is awaited before the answer starts, so a deadline or a failure up to then is still an
        # HTTP error status, not an event in a 200 stream.
        try:
            first = await self.next_event(first=True)
        except CompletionError as exc:
            self.close()
            return error_response(self.request, exc)
        return StreamingResponse(self.events_after(first), media_type="text/event-stream",
                                 headers={"X-Model-Version": self.version.name, "Cache-Control": "no-cache"})

    async def events_after(self, first):
        include_usage = bool((self.body.stream_options or {}).get("include_usage"))
        try:
            event = first
            started = {first[0]}
            while True:
                index, delta = event
                try:
                    if event is first:  # the first token goes out alone, so the stream visibly starts with it
                        text, finished, reason, held = delta.text, delta.finished, delta.finish_reason, None
                    else:
                        text, finished, reason, held = self.merge_ready(index, delta)
                except CompletionError as exc:
                    yield encode_event(exc.body())
                    return
                if text or finished:
                    yield self.text_chunk(text, index, reason if finished else None)
                if held is not None:
                    event = held
                    started.add(event[0])
                    continue
                if not self.open:
                    break
                try:
                    event = await self.next_event(first=len(started) < len(self.created))
                except CompletionError as exc:
                    yield encode_event(exc.body())
                    return
                started.add(event[0])
            if include_usage:
                yield encode_event(self.envelope([], usage=self.usage()))
            yield encode_event("[DONE]")
        finally:
            self.close()  # the client left mid-stream (the generator is closed) or the stream ended: free slots
