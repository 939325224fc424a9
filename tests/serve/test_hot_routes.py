"""The hot GET routes (serve/hot.py): the predictors' query routes answered in front of the framework's middleware
stack give the same answers and errors as the full stack, count the same metrics, write every access log line, and
leave every other request to the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging


from helpers import with_apps
from modelworks.inference import open_model
from modelworks.serve.app import ServeSettings, create_app
from modelworks.serve.hot import HotRoutes
from modelworks.tasks.recommendation.predictor import RecommendationPredictor

PATH = "/v1/models/ease/recommend"


def app_on(package, store: str, hot: bool):
    return create_app([open_model(package, "onnx")], settings=ServeSettings(admin_token="", events=store,
                                                                            hot_routes=hot))




@contextlib.contextmanager
def captured_log():
    """The server logger's records, whatever its propagation (configure_logging turns it off)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("modelworks.serve")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def without_ids(answer: dict) -> dict:
    return {key: value for key, value in answer.items() if key not in ("request_id", "latency_ms")}


QUERIES = [{"user": "dora", "k": 5, "exclude": "seen"}, {"user": "dora", "k": 7}, {"user": "nobody", "k": 3},
           {"user": "dora", "k": 4, "exclude": ["seen", "5"]}]
BAD_QUERIES = [({"user": "dora", "k": 0}, 422, "invalid_input"), ({"user": "dora", "k": 21}, 422, "invalid_input"),
               ({"user": "dora", "exclude": "999"}, 422, "invalid_input"), ({"k": 3}, 422, "invalid_input"),
               ({"user": "dora", "colour": "red"}, 422, "invalid_input")]


def test_the_hot_path_answers_as_the_full_stack_does(tiny_rec_package, tmp_path):
    store = f"sqlite:{tmp_path / 'events.db'}"
    hot_app, full_app = app_on(tiny_rec_package, store, True), app_on(tiny_rec_package, store, False)

    async def body(hot, full):
        events = [{"event_id": f"d{i}", "user": "dora", "item": str(i), "type": "view", "ts": float(i)} for i in (2, 3)]
        assert (await hot.post("/v1/events", json=events)).json()["stored"] == 2
        for params in QUERIES:
            answers = [await client.get(PATH, params=params, headers={"x-request-id": "mine-1"})
                       for client in (hot, full)]
            assert [a.status_code for a in answers] == [200, 200]
            assert without_ids(answers[0].json()) == without_ids(answers[1].json())
            assert answers[0].json()["request_id"] == "mine-1" == answers[0].headers["x-request-id"]
            for header in ("content-type", "x-model-version"):
                assert answers[0].headers[header] == answers[1].headers[header]
        assert (await hot.get(PATH, params=QUERIES[0])).json()["prediction"]["history_used"] == 2
        for params, status, code in BAD_QUERIES:
            errors = [await client.get(PATH, params=params) for client in (hot, full)]
            assert [e.status_code for e in errors] == [status, status], params
            assert errors[0].json()["error"] == errors[1].json()["error"] and errors[0].json()["error"]["code"] == code
            assert errors[0].json()["request_id"] == errors[0].headers["x-request-id"]
        long_caller = {"x-caller-id": "c" * 300}
        refused = [await client.get(PATH, params=QUERIES[0], headers=long_caller) for client in (hot, full)]
        assert [r.status_code for r in refused] == [400, 400]
        assert refused[0].json()["error"]["message"] == refused[1].json()["error"]["message"]
        assert (await hot.get(PATH, params=QUERIES[0])).status_code == 200  # still serving

    asyncio.run(with_apps([hot_app, full_app], body))


def test_hot_requests_skip_the_stack_and_are_counted_and_logged(tiny_rec_package, tmp_path):
    app = app_on(tiny_rec_package, f"sqlite:{tmp_path / 'events.db'}", True)
    reached_stack: list[str] = []

    async def body(client):
        await client.get("/healthz")  # the first call sets the entry
        assert isinstance(app.entry, HotRoutes)
        inner = app.entry.app

        async def counting(scope, receive, send):
            reached_stack.append(f"{scope.get('method')} {scope.get('path')}")
            await inner(scope, receive, send)

        app.entry.app = counting
        with captured_log() as records:
            for _ in range(3):
                assert (await client.get(PATH, params={"user": "erin", "k": 2})).status_code == 200
            assert (await client.get(PATH, params={"user": "erin", "k": 0})).status_code == 422
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.head(PATH, params={"user": "erin"})).status_code == 200  # HEAD: the full route
        assert reached_stack == ["GET /healthz", f"HEAD {PATH}"]
        lines = [r for r in records if r.getMessage() == "request" and r.fields["path"] == PATH]
        assert [(r.fields["method"], r.fields["status"]) for r in lines] == [("GET", 200)] * 3 + [("GET", 422),
                                                                                                 ("HEAD", 200)]
        assert all(r.fields["model"] == "ease" and r.fields["request_id"] for r in lines)
        assert [r.fields["version"] for r in lines] == ["1", "1", "1", None, "1"]  # a bad query reaches no version
        assert len({r.fields["request_id"] for r in lines}) == 5
        assert lines[3].fields["error"] == "invalid_input"
        metrics = (await client.get("/metrics")).text
        assert 'modelworks_requests_total{model="ease",status="200",version="1"} 4.0' in metrics
        # A bad query is refused before a version is chosen: its series has an empty version, as on the full stack.
        assert 'modelworks_requests_total{model="ease",status="422",version=""} 1.0' in metrics
        assert 'modelworks_errors_total{kind="invalid_input",model="ease",version=""} 1.0' in metrics
        assert 'modelworks_request_seconds_count{model="ease",version="1"} 4.0' in metrics
        assert 'modelworks_request_seconds_count{model="ease",version=""} 1.0' in metrics

    asyncio.run(with_apps([app], body))


def test_an_unexpected_failure_on_the_hot_path_is_a_logged_500_and_serving_goes_on(tiny_rec_package, tmp_path,
                                                                                    monkeypatch):
    app = app_on(tiny_rec_package, f"sqlite:{tmp_path / 'events.db'}", True)
    original = RecommendationPredictor.request_from_query
    calls = []

    def fails_once(self, route, query):
        calls.append(route)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return original(self, route, query)

    monkeypatch.setattr(RecommendationPredictor, "request_from_query", fails_once)

    async def body(client):
        with captured_log() as records:
            failed = await client.get(PATH, params={"user": "finn"})
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
        assert failed.json()["request_id"] == failed.headers["x-request-id"]
        logged = [r for r in records if r.getMessage() == "unhandled error"]
        assert logged and "RuntimeError: a bug" in logged[0].fields["error"]
        assert (await client.get(PATH, params={"user": "finn"})).status_code == 200
        assert 'modelworks_errors_total{kind="internal_error",model="ease",version=""} 1.0' in (
            await client.get("/metrics")).text

    asyncio.run(with_apps([app], body))
