"""Live recommendation through the server: POST /v1/events into the event store, GET /recommend reading the
user's latest events at request time (an event posted now changes the next answer), two replicas on one store,
and every bad input (unknown item, malformed or duplicate events, k out of range) with the server still serving."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from helpers import with_apps
from modelworks.inference import open_model
from modelworks.serve.app import ServeSettings, create_app

POSTGRES_ENV = "MODELWORKS_TEST_POSTGRES"


def live_app(package, events: str | None, **overrides):
    settings = ServeSettings(**{"admin_token": "", "events": events, **overrides})
    return create_app([open_model(package, "onnx")], settings=settings)


def event(event_id, user, item, ts, kind="view") -> dict:
    return {"event_id": event_id, "user": user, "item": item, "type": kind, "ts": ts}


async def recommend(client, user, **params) -> dict:
    response = await client.get("/v1/models/ease/recommend", params={"user": user, **params})
    assert response.status_code == 200, response.text
    return response.json()["prediction"]


def items_of(prediction: dict) -> list[str]:
    return [item["item"] for item in prediction["items"]]


def test_an_event_posted_now_changes_the_next_recommendation(tiny_rec_package, tmp_path):
    async def body(client):
        cold = await recommend(client, "alice", k=5, exclude="seen")
        assert cold["fallback"] == "popularity" and cold["history_used"] == 0 and len(cold["items"]) == 5
        posted = await client.post("/v1/events", json=[event(f"a{i}", "alice", str(i), 100.0 + i) for i in (1, 2, 3)])
        assert posted.status_code == 200 and posted.json() == {"received": 3, "stored": 3, "duplicates": 0}
        warm = await recommend(client, "alice", k=5, exclude="seen")
        assert warm["fallback"] is None and warm["history_used"] == 3
        assert items_of(warm)[0] == "4" and not {"1", "2", "3"} & set(items_of(warm))  # the walk's next item
        assert warm["items"][0]["title"] == "Movie 4 (1995)" and warm["items"][0]["genres"]
        # One more event, posted now: the very next answer reads it (no retraining, no cache).
        await client.post("/v1/events", json=event("a-later", "alice", "12", 200.0))
        later = await recommend(client, "alice", k=5, exclude="seen")
        assert later["history_used"] == 4 and "12" not in items_of(later) and items_of(later) != items_of(warm)
        # Without exclude=seen the history may be recommended again; an explicit list is always excluded.
        assert set(items_of(await recommend(client, "alice", k=20))) >= {"1", "2", "3"}
        assert "4" not in items_of(await recommend(client, "alice", k=19, exclude="seen,4"))
        assert "4" not in items_of(await recommend(client, "alice", k=19, exclude=["4", "5"]))
        # POST /predict with a user and no history reads the store too; with a history, the request's own.
        posted = await client.post("/v1/models/ease/predict", json={"user": "alice", "k": 3})
        assert posted.json()["prediction"]["history_used"] == 4
        own = await client.post("/v1/models/ease/predict", json={"user": "alice", "history": ["7"], "k": 3})
        assert own.json()["prediction"]["history_used"] == 1 and "7" not in items_of(own.json()["prediction"])
        metrics = (await client.get("/metrics")).text
        assert 'modelworks_events_total{outcome="stored"} 4.0' in metrics

    asyncio.run(with_apps([live_app(tiny_rec_package, f"sqlite:{tmp_path / 'events.db'}")], body))


def test_two_replicas_on_one_store_answer_alike(tiny_rec_package, tmp_path):
    url = f"sqlite:{tmp_path / 'shared.db'}"

    async def body(replica_a, replica_b):
        before = await recommend(replica_b, "bob", k=5, exclude="seen")
        assert before["fallback"] == "popularity"
        await replica_a.post("/v1/events", json=[event(f"b{i}", "bob", str(i), float(i)) for i in (9, 10, 11)])
        after = await recommend(replica_b, "bob", k=5, exclude="seen")  # the other replica sees the events at once
        assert after["history_used"] == 3 and items_of(after) != items_of(before)
        assert after == await recommend(replica_a, "bob", k=5, exclude="seen")
        # A retry sent to the other replica is acknowledged, not stored twice.
        again = await replica_b.post("/v1/events", json=event("b9", "bob", "9", 9.0))
        assert again.json() == {"received": 1, "stored": 0, "duplicates": 1}
        assert (await recommend(replica_a, "bob", k=5, exclude="seen"))["history_used"] == 3

    asyncio.run(with_apps([live_app(tiny_rec_package, url), live_app(tiny_rec_package, url)], body))


def test_live_serving_on_postgresql(tiny_rec_package):
    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"{POSTGRES_ENV} is unset (export it from .ci/start-postgres)")
    import psycopg

    base = os.environ[POSTGRES_ENV]
    name = "mw_live_" + os.urandom(6).hex()
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = base.rsplit("/", 1)[0] + "/" + name

    async def body(replica_a, replica_b):
        await replica_a.post("/v1/events", json=[event(f"c{i}", "carol", str(i), float(i)) for i in (5, 6, 7)])
        answer = await recommend(replica_b, "carol", k=3, exclude="seen")
        assert answer["history_used"] == 3 and items_of(answer)[0] == "8"

    asyncio.run(with_apps([live_app(tiny_rec_package, url), live_app(tiny_rec_package, url)], body))


@pytest.mark.parametrize("body, status, code, says", [
    (event("x1", "u", "999", 1.0), 422, "unknown_item", "item: 1 item not in the served model's catalogue: '999'"),
    ([event("x2", "u", "1", 1.0), event("x3", "u", "nope", 2.0)], 422, "unknown_item", "'nope' (event 1)"),
    ({"user": "u", "item": "1"}, 422, "invalid_input", "event_id: Field required"),
    ([{"event_id": "x4", "user": "u", "item": "1", "ts": "yesterday"}], 422, "invalid_input", "0.ts"),
    ({"event_id": "x5", "user": "u", "item": "1", "rating": 5}, 422, "invalid_input", "rating: unknown field"),
    ("not json", 400, "malformed_body", "not valid JSON"),
    ("", 400, "empty_body", "body: empty"),
])
def test_bad_events_are_refused_naming_the_problem_and_nothing_is_stored(tiny_rec_package, tmp_path, body, status,
                                                                        code, says):
    async def scenario(client):
        content = body if isinstance(body, str) else json.dumps(body)
        response = await client.post("/v1/events", content=content, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and says in error["message"], error
        assert (await recommend(client, "u"))["fallback"] == "popularity"  # nothing stored; still serving
        ok = await client.post("/v1/events", json=event("fine", "u", "1", 1.0))
        assert ok.json()["stored"] == 1

    asyncio.run(with_apps([live_app(tiny_rec_package, f"sqlite:{tmp_path / 'events.db'}")], scenario))


def test_bad_queries_get_4xx_and_the_server_keeps_serving(tiny_rec_package, tmp_path):
    async def scenario(client):
        cases = [({"user": "u", "k": 0}, "k: Input should be greater than or equal to 1"),
                 ({"user": "u", "k": 101}, "k: Input should be less than or equal to 100"),
                 ({"user": "u", "k": 21}, "k: at most 20"),
                 ({"user": "u", "k": "ten"}, "k: Input should be a valid integer"),
                 ({"k": 3}, "user: Field required"),
                 ({"user": "u", "colour": "red"}, "colour: unknown field"),
                 ({"user": "u", "exclude": "seen,999"}, "exclude: 1 item not in the model's catalogue: '999'")]
        for params, says in cases:
            response = await client.get("/v1/models/ease/recommend", params=params)
            assert response.status_code == 422 and says in response.json()["error"]["message"], (params, response.text)
        assert (await client.get("/v1/models/nope/recommend", params={"user": "u"})).status_code == 404
        assert len((await recommend(client, "u", k=20))["items"]) == 20  # the whole catalogue; still serving

    asyncio.run(with_apps([live_app(tiny_rec_package, f"sqlite:{tmp_path / 'events.db'}")], scenario))


def test_without_a_store_events_are_refused_and_recommend_falls_back(tiny_rec_package):
    async def scenario(client):
        response = await client.post("/v1/events", json=event("e", "u", "1", 1.0))
        assert response.status_code == 404 and "--events sqlite:PATH" in response.json()["error"]["message"]
        assert (await recommend(client, "u", k=3))["fallback"] == "popularity"
        schema = (await client.get("/openapi.json")).json()
        recommend_doc = schema["paths"]["/v1/models/ease/recommend"]["get"]
        assert [p["name"] for p in recommend_doc["parameters"]] == ["user", "k", "exclude"]
        assert "/v1/events" in schema["paths"]

    asyncio.run(with_apps([live_app(tiny_rec_package, None)], scenario))


def test_a_bad_store_url_fails_before_any_model_loads():
    from modelworks.errors import ConfigError

    with pytest.raises(ConfigError, match="--events: 'events.db' is not an event store URL"):
        ServeSettings(events="events.db")


def metric_values(text: str, name: str) -> dict[str, float]:
    """{version: value} of one /metrics series of the model "ease"."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            fields = dict(part.split("=", 1) for part in labels.split(","))
            if fields["model"] == '"ease"':
                values[fields["version"].strip('"')] = float(value)
    return values


def test_ab_by_user_with_exact_online_hit_counts_per_arm(tiny_rec_package, tmp_path):
    """Two versions split 50/50: each user stays on one (assigned by user id), what each answered is recorded, and
    events for recommended items count as hits of the arm that recommended them, exactly."""
    from helpers import copy_package_as_version

    v2 = copy_package_as_version(tiny_rec_package, tmp_path / "v2", "2")
    settings = ServeSettings(admin_token="", events=f"sqlite:{tmp_path / 'events.db'}", hit_window_s=60.0)
    app = create_app([open_model(tiny_rec_package, "onnx"), open_model(v2, "onnx")], [50.0, 50.0], settings)
    users = [f"user{i}" for i in range(12)]

    async def body(client):
        arm, shown = {}, {}
        for user in users:
            answers = [(await client.get("/v1/models/ease/recommend", params={"user": user, "k": 3})).json()
                       for _ in range(2)]
            assert answers[0]["version"] == answers[1]["version"]  # sticky by user, no X-Caller-Id needed
            arm[user], shown[user] = answers[0]["version"], items_of(answers[0]["prediction"])
        assert set(arm.values()) == {"1", "2"}  # both arms have users
        now = __import__("time").time()
        posted = []
        for n, user in enumerate(users):
            if n % 3 == 0:  # a hit, and the same item again (counted once) and a second shown item (one answer hit)
                posted += [event(f"{user}-a", user, shown[user][0], now), event(f"{user}-b", user, shown[user][0], now),
                           event(f"{user}-c", user, shown[user][1], now)]
            elif n % 3 == 1:  # an item not recommended, and a recommended one long after the window: no hit
                others = [str(i) for i in range(1, 21) if str(i) not in shown[user]]
                posted += [event(f"{user}-d", user, others[0], now), event(f"{user}-e", user, shown[user][2], now + 600)]
            # n % 3 == 2: no events
        response = await client.post("/v1/events", json=posted)
        assert response.json()["stored"] == len(posted)
        again = await client.post("/v1/events", json=[e for e in posted if e["event_id"].endswith("-a")])
        assert again.json()["stored"] == 0  # a retry: no hit counted twice
        metrics = (await client.get("/metrics")).text
        expected_answers = {v: 2.0 * sum(1 for u in users if arm[u] == v) for v in ("1", "2")}
        hit_users = [u for n, u in enumerate(users) if n % 3 == 0]
        expected_hit = {v: float(sum(1 for u in hit_users if arm[u] == v)) for v in ("1", "2")}
        assert metric_values(metrics, "modelworks_online_answers_total") == expected_answers
        # The newest answer of each user is credited: one answer hit, two distinct shown items, per hit user.
        assert metric_values(metrics, "modelworks_online_answers_hit_total") == expected_hit
        assert metric_values(metrics, "modelworks_online_item_hits_total") == {v: 2 * n for v, n in expected_hit.items()}
        assert metric_values(metrics, "modelworks_online_hit_rate") == {
            v: expected_hit[v] / expected_answers[v] for v in ("1", "2")}

    asyncio.run(with_apps([app], body))
