"""The HTTP API in process (TestClient, or httpx on the ASGI app for concurrency): predictions, every bad input,
probes, metrics, OpenAPI, batching, the queue bound, timeouts, A/B routing and the admin API."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from helpers import copy_package_as_version, fashion_test_images, png_bytes
from modelworks.inference import open_model
from modelworks.serve.app import ServeSettings, create_app
from modelworks.serve.routing import caller_point

TOKEN = "test-admin-token"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def images(tiny_run_dir):
    root = Path(yaml.safe_load((tiny_run_dir / "config.yaml").read_text())["data"]["root"])
    pixels, labels = fashion_test_images(root, n=8)
    return [png_bytes(p) for p in pixels], labels.tolist()


@pytest.fixture(scope="module")
def package_v2(tiny_package, tmp_path_factory) -> Path:
    return copy_package_as_version(tiny_package, tmp_path_factory.mktemp("v2") / "tiny-v2", "v2")


def settings(**overrides) -> ServeSettings:
    return ServeSettings(**{"admin_token": "", **overrides})


def app_for(*packages, weights=None, **overrides):
    return create_app([open_model(p, "onnx") for p in packages], weights, settings(**overrides),
                      loader=lambda path: open_model(path, "onnx"))


def json_body(image: bytes, **fields) -> dict:
    return {"image": base64.b64encode(image).decode(), **fields}


def metric(text: str, name: str, **labels) -> float:
    """The sum of a Prometheus sample over the series whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}\{{([^}}]*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def with_app(app, body):
    """Run `body(client)` against the app with its lifespan (warm-up, drain) and real concurrency."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            return await body(client)


# ---------------------------------------------------------------------------------------------- predictions


def test_json_and_multipart_predictions(tiny_package, images):
    files, labels = images
    with TestClient(app_for(tiny_package)) as client:
        response = client.post("/v1/models/tiny/predict", json=json_body(files[0], top_k=3),
                               headers={"X-Request-Id": "req-123"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model"], body["version"], body["request_id"]) == ("tiny", "v1", "req-123")
        assert response.headers["x-request-id"] == "req-123" and response.headers["x-model-version"] == "v1"
        prediction = body["prediction"]
        assert prediction["label"] == LABELS[labels[0]] and len(prediction["top_k"]) == 3
        assert prediction["top_k"][0] == {"label": prediction["label"], "index": labels[0],
                                          "probability": prediction["probability"]}
        assert body["latency_ms"] > 0
        # a data: URL, as a browser's FileReader makes it
        data_url = "data:image/png;base64," + base64.b64encode(files[1]).decode()
        assert client.post("/v1/models/tiny/predict", json={"image": data_url}).json()["prediction"]["label"] == \
            LABELS[labels[1]]
        upload = client.post("/v1/models/tiny/predict", files={"image": ("x.png", files[2], "image/png")},
                             data={"top_k": "2"})
        assert upload.status_code == 200, upload.text
        assert upload.json()["prediction"]["label"] == LABELS[labels[2]]
        assert len(upload.json()["prediction"]["top_k"]) == 2


BAD_INPUTS = {
    "undecodable image": (dict(json={"image": base64.b64encode(b"not an image at all").decode()}), 422,
                          r"image: cannot be decoded as PNG, JPEG, GIF or WebP"),
    "wrong size": (dict(json=json_body(png_bytes(np.zeros((32, 32), np.uint8)))), 422,
                   r"image: the model takes 28x28 grayscale \(1 channel\) images, as it was trained \(got 32x32"),
    "wrong colour mode": (dict(json=json_body(png_bytes(np.zeros((28, 28, 3), np.uint8)))), 422,
                          r"\(got 28x28 with 3 channels\)"),
    "not base64": (dict(json={"image": "%%%"}), 422, r"image: not valid base64"),
    "wrong type": (dict(json={"image": 12}), 422, r"image: Input should be a valid string \(got 12\)"),
    "bad top_k": (dict(json={"top_k": "many"}), 422, r"top_k: Input should be a valid integer"),
    "unknown field": (dict(json={"imgae": "x"}), 422, r"imgae: unknown field; valid fields: image, top_k, resize"),
    "no image": (dict(json={"top_k": 2}), 422, r"image: missing"),
    "empty body": (dict(content=b"", headers={"content-type": "application/json"}), 400, r"body: empty"),
    "malformed JSON": (dict(content=b'{"image": ', headers={"content-type": "application/json"}), 400,
                       r"body: not valid JSON"),
    "unsupported content type": (dict(content=b"hello", headers={"content-type": "text/plain"}), 415,
                                 r"Content-Type: 'text/plain' is not accepted"),
    "empty upload": (dict(files={"image": ("x.png", b"", "image/png")}), 422, r"image: empty file"),
    "upload under another name": (dict(files={"picture": ("x.png", b"abc", "image/png")}), 422,
                                  r"picture: unexpected file field; upload the file as 'image'"),
    "oversized body": (dict(content=b"x" * 5000, headers={"content-type": "application/json"}), 413,
                       r"body: larger than the limit of 4000 bytes \(got 5000 bytes\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_every_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(tiny_package, images, case):
    request, status, message = BAD_INPUTS[case]
    with TestClient(app_for(tiny_package, max_body_bytes=4000)) as client:
        response = client.post("/v1/models/tiny/predict", **request)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert re.search(message, error["message"]), error["message"]
        assert response.json()["request_id"] == response.headers["x-request-id"]
        assert client.post("/v1/models/tiny/predict", json=json_body(images[0][0])).status_code == 200


def test_unknown_model_and_unknown_path(tiny_package):
    with TestClient(app_for(tiny_package)) as client:
        response = client.post("/v1/models/nope/predict", json={})
        assert response.status_code == 404
        assert response.json()["error"]["message"] == "model: 'nope' is not served; served: tiny"
        assert client.get("/v1/models/nope").status_code == 404
        missing = client.get("/v2/anything")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert client.get("/v1/models/tiny/predict").status_code == 405


def test_probes_metrics_models_and_openapi(tiny_package, images):
    with TestClient(app_for(tiny_package)) as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        assert client.get("/readyz").json() == {"status": "ready", "models": {"tiny": ["v1"]}}
        models = client.get("/v1/models").json()["models"]
        assert models[0]["name"] == "tiny" and models[0]["labels"] == LABELS
        assert models[0]["versions"][0]["version"] == "v1" and models[0]["versions"][0]["traffic"] == 1.0
        client.post("/v1/models/tiny/predict", json=json_body(images[0][0]))
        client.post("/v1/models/tiny/predict", json={"image": "%%%"})
        text = client.get("/metrics").text
        assert metric(text, "modelworks_requests_total", model="tiny", version="v1", status="200") == 1
        assert metric(text, "modelworks_errors_total", model="tiny", version="v1", kind="invalid_input") == 1
        assert metric(text, "modelworks_request_seconds_count", model="tiny", version="v1") == 2
        assert metric(text, "modelworks_batch_size_count", model="tiny", version="v1") >= 1
        assert metric(text, "modelworks_prediction_confidence_count", model="tiny", version="v1") == 1
        assert "modelworks_queue_depth" in text and "modelworks_inference_seconds_bucket" in text
        assert "\nmodelworks_ready 1.0\n" in text and "\nmodelworks_queue_capacity 256.0\n" in text
        schema = client.get("/openapi.json").json()
        operation = schema["paths"]["/v1/models/tiny/predict"]["post"]
        content = operation["requestBody"]["content"]
        assert content["application/json"]["schema"]["$ref"] == "#/components/schemas/ImageRequest"
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
        assert set(schema["components"]["schemas"]["ImageRequest"]["properties"]) == {"image", "top_k", "resize"}
        assert "ClassificationResponse" in schema["components"]["schemas"]
        assert client.get("/docs").status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and "/v1/models" in page.text


def test_while_draining_readyz_is_503_new_predictions_are_refused_and_accepted_ones_answered(tiny_package,
                                                                                             images):
    """The lifespan's drain, in process: a prediction is held in the graph (its runtime waits on an event) when
    shutdown begins; meanwhile /readyz answers 503 "draining" (and the modelworks_ready gauge reads 0) and a new
    prediction 503 with Retry-After, and
    once the graph is released the held request still gets its answer and shutdown completes."""
    import threading

    model = open_model(tiny_package, "onnx")
    predict, held, release = model.predict, threading.Event(), threading.Event()

    def held_predict(items):
        if held.is_set():
            release.wait(20)
        return predict(items)

    model.predict = held_predict
    app = create_app([model], None, settings())

    async def scenario():
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            assert (await client.get("/readyz")).status_code == 200
            held.set()
            in_flight = asyncio.create_task(client.post("/v1/models/tiny/predict", json=json_body(images[0][0])))
            await asyncio.sleep(0.3)
            shutdown = asyncio.create_task(lifespan.__aexit__(None, None, None))
            await asyncio.sleep(0.3)
            assert not in_flight.done() and not shutdown.done()
            ready = await client.get("/readyz")
            refused = await client.post("/v1/models/tiny/predict", json=json_body(images[0][0]))
            metrics = (await client.get("/metrics")).text
            release.set()
            answered = await in_flight
            await asyncio.wait_for(shutdown, 20)
        return ready, refused, answered, metrics

    ready, refused, answered, metrics = asyncio.run(scenario())
    assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
    assert "\nmodelworks_ready 0.0\n" in metrics  # what the readiness alert reads
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert refused.headers["retry-after"] == "1"
    assert answered.status_code == 200 and answered.json()["prediction"]["label"] == LABELS[images[1][0]]


# ---------------------------------------------------------------------------------------------- batching


def test_concurrent_requests_are_batched(tiny_package, images):
    # A request whose body is still arriving holds the first batch (up to max_wait_ms), so the 16 requests sent
    # meanwhile are grouped with it however early the worker thread wakes. (Sent without one, in-process
    # requests may each reach the queue before the next is read, and a lone request rightly does not wait.)
    app = app_for(tiny_package, max_batch_size=32, max_wait_ms=2000)

    async def body(client):
        slow = asyncio.create_task(post_arriving_slowly(client, images[0][7], 0.3))
        await asyncio.sleep(0.05)
        responses = await asyncio.gather(*(client.post("/v1/models/tiny/predict", json=json_body(images[0][i % 8]))
                                           for i in range(16)))
        responses.append(await slow)
        return responses, (await client.get("/metrics")).text

    responses, text = asyncio.run(with_app(app, body))
    assert [r.status_code for r in responses] == [200] * 17
    assert [r.json()["prediction"]["label"] for r in responses] == \
        [LABELS[images[1][i % 8]] for i in range(16)] + [LABELS[images[1][7]]]
    batches = metric(text, "modelworks_batch_size_count", model="tiny", version="v1")
    # One batch, or two if the worker woke between the slow request's arrival and its enqueue (warm-up runs
    # are not observed).
    assert batches <= 2


async def post_arriving_slowly(client, image: bytes, delay_s: float, stall: bool = False) -> httpx.Response:
    """A request whose body takes `delay_s` to arrive, a byte of leading JSON whitespace every 2 ms (while bytes keep
    coming, a batch waits for it, up to max_wait_ms); with `stall`, one byte and then nothing until `delay_s`."""
    async def chunks():
        start = asyncio.get_running_loop().time()
        yield b" "
        while asyncio.get_running_loop().time() - start < delay_s:
            await asyncio.sleep(delay_s if stall else 0.002)
            if not stall:
                yield b" "
        yield json.dumps(json_body(image)).encode()

    return await client.post("/v1/models/tiny/predict", content=chunks(), headers={"Content-Type": "application/json"})


def test_a_full_queue_answers_503_with_retry_after_and_loses_no_accepted_request(tiny_package, images):
    # A request still arriving holds the first batch (up to max_wait_ms), so the queue bound of 2 is reached.
    app = app_for(tiny_package, max_batch_size=8, max_wait_ms=1000, max_queue=2)

    async def body(client):
        slow = asyncio.create_task(post_arriving_slowly(client, images[0][0], 0.3))
        await asyncio.sleep(0.05)
        responses = await asyncio.gather(*(client.post("/v1/models/tiny/predict", json=json_body(images[0][0]))
                                           for _ in range(40)))
        responses.append(await slow)
        return responses, (await client.get("/metrics")).text, (await client.get("/healthz")).status_code

    responses, text, health = asyncio.run(with_app(app, body))
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2 and health == 200
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == "overloaded"
    assert metric(text, "modelworks_requests_total", status="200") == statuses.count(200)


def test_a_batch_waits_only_for_arriving_requests_and_a_request_past_its_deadline_gets_504(tiny_package, images):
    app = app_for(tiny_package, max_batch_size=8, max_wait_ms=2000, timeout_s=0.3)

    async def body(client):
        alone = await client.post("/v1/models/tiny/predict", json=json_body(images[0][0]))
        # Now a request still arriving makes the next batch wait for it, past the deadline of the one queued; its
        # own body takes longer than timeout_s, which covers reading it.
        slow = asyncio.create_task(post_arriving_slowly(client, images[0][1], 0.6))
        await asyncio.sleep(0.05)
        queued = await client.post("/v1/models/tiny/predict", json=json_body(images[0][0]))
        return alone, queued, await slow

    alone, queued, slow = asyncio.run(with_app(app, body))
    assert alone.status_code == 200 and alone.json()["latency_ms"] < 1000  # nothing else arriving: no wait
    assert queued.status_code == 504
    assert re.search(r"no answer within 0.3 s \(timeout_s\)", queued.json()["error"]["message"])
    assert slow.status_code == 408 and slow.json()["error"]["code"] == "body_timeout"
    assert "not received within 0.3 s" in slow.json()["error"]["message"]


def test_a_stalled_upload_does_not_hold_batches(tiny_package, images):
    """A body that stops receiving bytes is not 'arriving': batches stop waiting for it (they waited the whole
    max_wait_ms for every such connection before)."""
    app = app_for(tiny_package, max_batch_size=8, max_wait_ms=1000, timeout_s=5)

    async def body(client):
        stalled = [asyncio.create_task(post_arriving_slowly(client, images[0][1], 1.5, stall=True))
                   for _ in range(5)]
        await asyncio.sleep(0.1)
        answers = []
        for _ in range(5):
            answers.append(await client.post("/v1/models/tiny/predict", json=json_body(images[0][0])))
        return answers, await asyncio.gather(*stalled)

    answers, stalled = asyncio.run(with_app(app, body))
    assert all(a.status_code == 200 for a in answers) and all(s.status_code == 200 for s in stalled)
    # Each would wait max_wait_ms (1000 ms) for the stalled bodies if they counted as arriving.
    assert max(a.json()["latency_ms"] for a in answers) < 300, [a.json()["latency_ms"] for a in answers]


# ---------------------------------------------------------------------------------------------- A/B


def test_ab_split_follows_the_weights_and_is_sticky_per_caller(tiny_package, package_v2, images):
    app = app_for(tiny_package, package_v2, weights=[90, 10])
    with TestClient(app) as client:
        route = app.state.server.routes["tiny"]
        share = sum(route.choose(f"user-{i}").name == "v2" for i in range(20000)) / 20000
        assert share == pytest.approx(0.10, abs=0.01)
        seen = {}
        for caller in [f"caller-{i}" for i in range(30)]:
            versions = {client.post("/v1/models/tiny/predict", json=json_body(images[0][0]),
                                    headers={"X-Caller-Id": caller}).json()["version"] for _ in range(3)}
            assert len(versions) == 1  # sticky
            seen[caller] = versions.pop()
            assert seen[caller] == ("v2" if caller_point("tiny", caller) >= 0.9 else "v1")
        text = client.get("/metrics").text
        for version in set(seen.values()):
            assert metric(text, "modelworks_requests_total", model="tiny", version=version) == \
                3 * list(seen.values()).count(version)
        assert metric(text, "modelworks_traffic_weight", version="v2") == pytest.approx(0.1)
        models = client.get("/v1/models").json()["models"][0]
        assert [(v["version"], v["traffic"]) for v in models["versions"]] == [("v1", 0.9), ("v2", 0.1)]


def test_admin_api_is_disabled_without_a_token_and_guarded_with_one(tiny_package):
    with TestClient(app_for(tiny_package)) as client:
        response = client.post("/v1/admin/models/tiny/rollback")
        assert response.status_code == 403
        assert "set to a secret to enable it" in response.json()["error"]["message"]
    with TestClient(app_for(tiny_package, admin_token=TOKEN)) as client:
        assert client.post("/v1/admin/models/tiny/rollback").status_code == 401
        assert client.post("/v1/admin/models/tiny/rollback", headers={"Authorization": "Bearer wrong"}
                           ).status_code == 401


def test_admin_load_split_promote_rollback_unload(tiny_package, package_v2, images):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app_for(tiny_package, admin_token=TOKEN)) as client:
        def versions():
            return {v["version"]: v["traffic"] for v in client.get("/v1/models/tiny").json()["versions"]}

        def served_by(n=20):
            return {client.post("/v1/models/tiny/predict", json=json_body(images[0][0]),
                                headers={"X-Caller-Id": f"c{i}"}).json()["version"] for i in range(n)}

        loaded = client.post("/v1/admin/models/tiny/versions", json={"package": str(package_v2)}, headers=auth)
        assert loaded.status_code == 200, loaded.text
        assert versions() == {"v1": 1.0, "v2": 0.0} and served_by() == {"v1"}
        assert client.put("/v1/admin/models/tiny/split", json={"weights": {"v1": 50, "v2": 50}},
                          headers=auth).status_code == 200
        assert served_by() == {"v1", "v2"}
        assert client.post("/v1/admin/models/tiny/promote", json={"version": "v2"}, headers=auth).status_code == 200
        assert versions() == {"v1": 0.0, "v2": 1.0} and served_by() == {"v2"}
        assert client.post("/v1/admin/models/tiny/rollback", headers=auth).json()["versions"][0]["traffic"] == 0.5
        assert versions() == {"v1": 0.5, "v2": 0.5}
        in_use = client.delete("/v1/admin/models/tiny/versions/v2", headers=auth)
        assert in_use.status_code == 409 and "still has traffic" in in_use.json()["error"]["message"]
        client.post("/v1/admin/models/tiny/promote", json={"version": "v1"}, headers=auth)
        assert client.delete("/v1/admin/models/tiny/versions/v2", headers=auth).status_code == 200
        assert versions() == {"v1": 1.0}
        bad = client.put("/v1/admin/models/tiny/split", json={"weights": {"v9": 1}}, headers=auth)
        assert bad.status_code == 422 and "unknown versions ['v9']" in bad.json()["error"]["message"]
        broken = client.post("/v1/admin/models/tiny/versions", json={"package": "/nonexistent"}, headers=auth)
        assert broken.status_code == 422 and "no such package directory" in broken.json()["error"]["message"]


def test_reload_and_promote_under_load_drop_no_request(tiny_package, package_v2, images):
    app = app_for(tiny_package, admin_token=TOKEN, max_batch_size=4, max_wait_ms=5)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def body(client):
        async def traffic():
            return [await client.post("/v1/models/tiny/predict", json=json_body(images[0][k % 8]))
                    for k in range(25)]

        async def admin():
            await asyncio.sleep(0.05)
            reloaded = await client.post("/v1/admin/models/tiny/versions", json={"package": str(tiny_package)},
                                         headers=auth)  # the same version again: a reload
            loaded = await client.post("/v1/admin/models/tiny/versions", json={"package": str(package_v2)},
                                       headers=auth)
            promoted = await client.post("/v1/admin/models/tiny/promote", json={"version": "v2"}, headers=auth)
            return [reloaded.status_code, loaded.status_code, promoted.status_code]

        *streams, admin_statuses = await asyncio.gather(*(traffic() for _ in range(6)), admin())
        return [r for stream in streams for r in stream], admin_statuses

    responses, admin_statuses = asyncio.run(with_app(app, body))
    assert admin_statuses == [200, 200, 200]
    assert [r.status_code for r in responses] == [200] * 150
    assert responses[-1].json()["version"] == "v2"
