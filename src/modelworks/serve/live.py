"""Live data in the server: the event store's route, and the GET query routes predictors declare.

    POST /v1/events                        one event or a list: {"event_id", "user", "item", "type", "ts"}
    GET  /v1/models/{name}/{route}?...     Predictor.query_routes, e.g. /v1/models/rec/recommend?user=42&k=10

Both are general: a predictor that reads a user's history declares `history_length` (the server then reads the
user's latest events from the store at request time, ModelServer.read_history) and `unknown_items` (events
naming items no served model knows are refused); a predictor with query routes declares them in `query_routes`.
Nothing here knows a task.

Replicas: the store is the only state a live answer depends on besides the model, so N servers given one store
URL (one SQLite file on one host, or one PostgreSQL) behind a load balancer answer every user alike: an event
posted to one replica changes the next answer of every other.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.routing import Route

from ..events import Event
from .app import ApiError, ModelServer, describe_validation_error, documented_errors, response_envelope
from .hot import HotRoute
from .logs import log

MAX_EVENTS_PER_REQUEST = 10_000  # one transaction; a bulk load sends several requests
EVENTS = TypeAdapter(Event | list[Event])


class EventsAnswer(BaseModel):
    received: int = Field(description="Events in the request.")
    stored: int = Field(description="Events stored now.")
    duplicates: int = Field(description="Events whose event_id was stored before (a retry): acknowledged, not "
                                        "stored again.")


def add_event_routes(app: FastAPI, server: ModelServer, documented: list[APIRoute]) -> None:
    """POST /v1/events: validated, checked against the served catalogues, stored by the store's group commit."""

    async def post_events(request: Request) -> Response:
        if server.events is None:
            raise ApiError(404, "no_event_store", "POST /v1/events: this server has no event store; start it with "
                           "--events sqlite:PATH or --events postgresql://USER@HOST/DB")
        events = parse_events(await request.body())
        check_items(server, events)
        try:
            new = await server.events.add(events)  # answered once the transaction holding them has committed
        except Exception as exc:  # the store is down or locked past its timeout: the client retries (idempotent)
            log("event store write failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            raise ApiError(503, "event_store_unavailable", f"the events were not stored ({type(exc).__name__}); "
                           "retry: events already stored are acknowledged as duplicates",
                           headers={"Retry-After": "1"}) from None
        stored = sum(new)
        server.metrics.events.labels("stored").inc(stored)
        server.metrics.events.labels("duplicate").inc(len(events) - stored)
        server.online.observe([event for event, is_new in zip(events, new) if is_new])  # a retry counts no hit twice
        # Built by hand: FastAPI's response_model validation and encoding cost more than the store's round trip.
        return Response(b'{"received":%d,"stored":%d,"duplicates":%d}' % (len(events), stored, len(events) - stored),
                        media_type="application/json")

    # FastAPI documents the route; a plain Starlette route serves it (as the predict routes, app.py).
    documented.append(APIRoute("/v1/events", post_events, methods=["POST"], response_model=EventsAnswer,
                               tags=["events"], summary="Record what users did (one event or a list); idempotent "
                               "by event_id", openapi_extra={"requestBody": {"required": True, "content": {
                                   "application/json": {"schema": EVENTS.json_schema(
                                       ref_template="#/components/schemas/{model}")}}}},
                               responses=documented_errors({
                                   400: "Empty or malformed body", 404: "The server has no event store (start it "
                                   "with --events)", 413: f"Over {MAX_EVENTS_PER_REQUEST} events",
                                   422: "Invalid event, or an item no served model knows (named)",
                                   503: "The event store is unavailable"})))
    app.router.routes.append(Route("/v1/events", post_events, methods=["POST"]))


def query_values(query_string: bytes) -> dict[str, str]:
    """A URL query as {key: value}, as Starlette's QueryParams reads it (blank values kept, latin-1); a repeated
    parameter (exclude=1&exclude=2) reads as its comma-joined values."""
    values: dict[str, str] = {}
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        values[key] = f"{values[key]},{value}" if key in values else value
    return values


def parse_events(body: bytes) -> list[Event]:
    if not body.strip():
        raise ApiError(400, "empty_body", 'body: empty; send an event {"event_id", "user", "item", "type", "ts"} '
                       "or a list of them")
    try:
        parsed = EVENTS.validate_json(body)
    except ValidationError as exc:
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            raise ApiError(400, "malformed_body", f"body: not valid JSON ({exc.errors()[0].get('msg', '')})") from None
        # Pydantic reports the failure against both shapes (one event, a list); the one the body has is meant.
        shape = "list" if body.lstrip().startswith(b"[") else "Event"
        errors = [e for e in exc.errors() if str(e["loc"][0]).startswith("list" if shape == "list" else "Event")]
        message, field = describe_validation_error(_Errors(errors or exc.errors()), list(Event.model_fields))
        raise ApiError(422, "invalid_input", message, field) from None
    events = parsed if isinstance(parsed, list) else [parsed]
    if len(events) > MAX_EVENTS_PER_REQUEST:
        raise ApiError(413, "too_many_events", f"body: {len(events)} events, over {MAX_EVENTS_PER_REQUEST} per "
                       "request; send them in several requests")
    return events


class _Errors:
    """Pydantic's errors of one union member, with the member's name dropped from each location."""

    def __init__(self, errors: list[dict]):
        self._errors = [{**e, "loc": tuple(e["loc"][1:]) if e["loc"] and str(e["loc"][0]).startswith(("list", "Event"))
                         else e["loc"]} for e in errors]

    def errors(self) -> list[dict]:
        return self._errors


def check_items(server: ModelServer, events: list[Event]) -> None:
    """Refuse events naming items that no served version of a history-reading model knows: such an event could
    never inform an answer, and is most often a client's bug (a wrong id space)."""
    readers = [version.model.predictor for route in server.routes.values() for version in route.versions.values()
               if version.model.predictor.history_length > 0]
    if not readers:
        return
    items = sorted({str(event.item) for event in events})
    unknown = set(items)
    for predictor in readers:
        unknown &= set(predictor.unknown_items(items))
    if unknown:
        where = [f"{i}" for i, event in enumerate(events) if str(event.item) in unknown]
        shown = ", ".join(repr(i) for i in sorted(unknown)[:10]) + (" and more" if len(unknown) > 10 else "")
        raise ApiError(422, "unknown_item", f"item: {len(unknown)} item{'s' if len(unknown) > 1 else ''} not in the "
                       f"served model's catalogue: {shown} (event{'s' if len(where) > 1 else ''} "
                       f"{', '.join(where[:10])}); send item ids as in the training data; nothing was stored", "item")


def add_query_routes(app: FastAPI, server: ModelServer, groups: dict, documented: list[APIRoute]) -> None:
    """GET /v1/models/{name}/{route} for each of the model's Predictor.query_routes, answered like a prediction."""
    for model_name, (group, _) in groups.items():
        predictor_class = type(group[0].predictor)
        for route_name, query_model in predictor_class.query_routes.items():
            register_query_route(app, server, model_name, route_name, query_model, predictor_class, documented)


def register_query_route(app: FastAPI, server: ModelServer, name: str, route_name: str, query_model: type[BaseModel],
                         predictor_class: type, documented: list[APIRoute]) -> None:
    fields = list(query_model.model_fields)

    def read_query(query_string: bytes):
        """(the predictor's typed request, None) from the URL's query string."""
        try:
            query = query_model.model_validate(query_values(query_string))
        except ValidationError as exc:
            message, field = describe_validation_error(exc, fields)
            raise ApiError(422, "invalid_input", message, field) from None
        predictor = next(iter(server.routes[name].versions.values())).model.predictor
        return predictor.request_from_query(route_name, query), None

    async def answer(request: Request):
        return await server.predict(name, request, lambda: read_query(request.scope["query_string"]))

    path = f"/v1/models/{name}/{route_name}"
    # Answered in front of the framework's middleware (serve/hot.py) unless serve settings turn that off; the
    # Starlette route below stays: it serves HEAD, GETs carrying a body, and the whole route when the fast path
    # is off.
    server.hot_routes[path] = HotRoute(name, read_query)
    schema = query_model.model_json_schema()
    parameters = [{"name": key, "in": "query", "required": key in schema.get("required", []),
                   "description": prop.get("description", ""),
                   "schema": {k: v for k, v in prop.items() if k not in ("description", "title")}}
                  for key, prop in schema.get("properties", {}).items()]
    documented.append(APIRoute(path, answer, methods=["GET"], response_model=response_envelope(predictor_class),
                               tags=["predict"], summary=f"{route_name} with {name}",
                               description=query_model.__doc__ or "", openapi_extra={"parameters": parameters},
                               responses=documented_errors({404: "Unknown model", 422: "Invalid query",
                                                            503: "Overloaded, or the event store is unavailable",
                                                            504: "Per-request timeout"})))
    app.router.routes.append(Route(path, answer, methods=["GET"]))
