"""The server survives hostile input: property-based fuzzing of the served API (schemathesis, hypothesis).

For a classification and a detection server, each with the admin API on (a token) and a package loader:

- Every operation of the served OpenAPI schema, fed requests schemathesis generates from it (valid and, where
  there is a body, invalid ones; admin requests with the token and without), never answers 5xx, answers every
  error in the documented shape {"error": {"code", "message", "field"}, "request_id"}, refuses what the schema
  rules out, and leaves the server serving: /healthz, /readyz with every model listed, /v1/models with a split
  that adds up, and a good prediction. Separately, the answers are checked against what the schema documents.
- Damaged image files (flipped and inserted bytes, cut short, a PNG header declaring billions of pixels) get a
  4xx, never a 5xx.
- A good request with one field set to a value its schema rules out (top_k true, resize "true") is refused, not
  served with a value the server guessed.
- Admin input a schema cannot rule out (NaN, infinite and overflowing weights, the last version, packages of
  another task, paths the file system refuses) is refused with a 4xx and never takes the model down: a table
  of single hostile requests, then random sequences of them (a Hypothesis state machine).

Requests go in process, to the app with its lifespan (warm-up, drain) run by Starlette's TestClient (damaged
files, which may crash a decoder, go to a real server process instead). A request
that can change state (any admin one) gets a fresh app, so that a failure replays and shrinks to the requests
that caused it, not to whatever an earlier example left behind. Generation is derandomized (a fixed seed per
test) and bounded per operation: the file runs in about a minute on 2 cores.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import math
import signal
import socket
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import jsonschema_rs
import pytest
import requests
import schemathesis
import urllib3
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from helpers import copy_package_as_version, start_cli
from modelworks.inference import open_model
from modelworks.serve.app import ServeSettings, create_app

TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE_URL = "http://testserver"
PACKAGE_FIXTURES = {"classification": "tiny_package", "detection": "tiny_detection_package"}

# Examples per operation. The probes and listings take no input: schemathesis has one request to make for them.
# The predict route takes the most varied input (JSON or multipart, files, typed fields).
EXAMPLES = {"POST /v1/models/{model}/predict": 120, "GET /v1/models/{name}": 15}
ADMIN_EXAMPLES = 30
OPERATIONS = [
    "GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/models", "GET /v1/models/{name}",
    "POST /v1/models/{model}/predict",
    "POST /v1/admin/models/{name}/versions", "PUT /v1/admin/models/{name}/split",
    "POST /v1/admin/models/{name}/promote", "POST /v1/admin/models/{name}/rollback",
    "DELETE /v1/admin/models/{name}/versions/{version}",
]

# schemathesis' checks, and why these. What the server promises (with error_body_in_shape, below):
# - not_a_server_error: the property itself.
# - negative_data_rejection: a request the schema rules out is refused (4xx), never served: the server does not
#   correct input silently.
# What the schema promises, checked in a test of its own so that a documentation gap never hides a crash:
# - status_code_conformance, response_schema_conformance, content_type_conformance, response_headers_conformance:
#   clients are generated from the served schema, so a status, body, media type or header it does not describe is
#   a defect of the API even where the server behaves (e.g. an error answered 401 but documented nowhere, or
#   Prometheus text documented as JSON).
# Left out: positive_data_acceptance, because a schema-valid request is not a usable one (the base64 must decode
# to an image of the model's size, a package path must exist, split keys must name loaded versions), so it would
# fail on nearly every example and say nothing; max_response_time (shared CPUs: flaky); and the checks that need
# OpenAPI links or security schemes the schema does not declare (use_after_free, ensure_resource_availability,
# ignored_auth, missing_required_header, object_level_authorization) or that re-send each request with other
# methods (unsupported_method: Starlette's routing, not this server's, and a second request per example).
DOCUMENTATION_CHECKS = [status_code_conformance, response_schema_conformance, content_type_conformance,
                        response_headers_conformance]

HYPOTHESIS = dict(derandomize=True, database=None, deadline=None, print_blob=False,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------- the servers


@dataclass
class Served:
    """One task's server: its packages (v1, a copy as v2), opened once and shared by every fresh app."""

    task: str
    name: str  # the model name in the API ("tiny", "boxes")
    packages: dict[str, Path]  # version -> package directory
    other_task_package: Path  # a package of the other task: a load the server must refuse
    good_request: dict  # a JSON prediction request the model answers
    file_field: str  # the request field holding the file (base64 in JSON, the upload in multipart)
    schema: schemathesis.BaseSchema | None = None  # read from the app once it runs

    def app(self, *versions: str):
        """A fresh app serving `versions` (default: v1 alone), all traffic to the first."""
        versions = versions or ("v1",)
        models = [load_model(str(self.packages[v])) for v in versions]
        settings = ServeSettings(admin_token=TOKEN, max_batch_size=4)  # a small batch: a quick warm-up per app
        return create_app(models, [100.0] + [0.0] * (len(models) - 1), settings, loader=load_model)

    def client(self, *versions: str) -> TestClient:
        # A 500 must come back as a response, as from a real server, not be re-raised into the test.
        return TestClient(self.app(*versions), base_url=BASE_URL, raise_server_exceptions=False)


@functools.lru_cache(maxsize=8)
def load_model(path: str):
    """The admin API's loader, as the CLI's (ONNX), with each package opened once per session. lru_cache keeps
    no exceptions, so a path that fails to load fails every time, as in the real loader."""
    return open_model(path, "onnx")


@pytest.fixture(scope="module", params=list(PACKAGE_FIXTURES))
def served(request, tmp_path_factory) -> Served:
    package = request.getfixturevalue(PACKAGE_FIXTURES[request.param])
    other = request.getfixturevalue(next(f for t, f in PACKAGE_FIXTURES.items() if t != request.param))
    v2 = copy_package_as_version(package, tmp_path_factory.mktemp("fuzz-v2") / package.name, "v2")
    model = load_model(str(package))
    fields, file = model.predictor.example_request()
    good = {**fields.model_dump(exclude_none=True), model.predictor.file_field: base64.b64encode(file).decode()}
    # The schema the server serves, read through the same in-process client. (schemathesis.openapi.from_asgi would
    # read it too, but start the app's lifespan in schemathesis' own event loop and keep it running until the
    # process exits; here each example gets its own app, started and stopped by its TestClient.)
    served = Served(request.param, model.name, {"v1": Path(package), "v2": v2}, Path(other), good,
                    model.predictor.file_field)
    with served.client() as client:
        served.schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    return served


class ToTestClient(requests.adapters.HTTPAdapter):
    """Hands the request schemathesis prepared (through `requests`, byte for byte) to a Starlette TestClient and
    the answer back as a `requests` response, so case.call() and its checks run unchanged on an in-process app."""

    def __init__(self, client: TestClient):
        super().__init__()
        self.client = client

    def send(self, request: requests.PreparedRequest, **kwargs) -> requests.Response:
        answer = self.client.request(request.method, request.url, headers=dict(request.headers),
                                     content=request.body)
        raw = urllib3.HTTPResponse(body=io.BytesIO(answer.content), headers=answer.headers.multi_items(),
                                   status=answer.status_code, reason=answer.reason_phrase, version=11,
                                   preload_content=False, decode_content=False)
        return self.build_response(request, raw)


def session_for(client: TestClient) -> requests.Session:
    session = requests.Session()
    session.mount("http://", ToTestClient(client))
    return session


# ---------------------------------------------------------------------------------------------- the properties


def error_body_in_shape(ctx, response, case) -> None:
    """A schemathesis check (so that a failure is reported with the request, as curl, like the built-in ones)."""
    assert_error_in_shape(response.status_code, response.content)


def assert_error_in_shape(status: int, content: bytes, after: str = "") -> None:
    """Every 4xx/5xx body is {"error": {"code": str, "message": str, "field": str | null}, "request_id": str}."""
    if status < 400:
        return
    try:
        body = json.loads(content)
    except ValueError:
        raise AssertionError(f"{status} with a body that is not JSON: {content[:200]!r}{after}") from None
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(body, dict) and set(body) == {"error", "request_id"} and isinstance(error, dict) and \
        set(error) == {"code", "message", "field"}, f"{status}: error body not in shape: {body!r:.300}{after}"
    assert isinstance(error["code"], str) and error["code"], f"error.code: {error['code']!r}{after}"
    assert isinstance(error["message"], str) and error["message"], f"error.message: {error['message']!r}{after}"
    assert error["field"] is None or isinstance(error["field"], str), f"error.field: {error['field']!r}{after}"
    assert isinstance(body["request_id"], str) and body["request_id"], f"request_id: {body['request_id']!r}{after}"


def answer(response) -> str:
    """`status body` of an httpx or schemathesis response, the body cut short."""
    return f"{response.status_code} {response.content[:300].decode('utf-8', 'replace')}"


def assert_still_serves(client: httpx.Client, served: Served, after: str) -> None:
    """Alive, ready with every model listed (and a version in each), a good prediction answered, and the models
    described with traffic shares that add up to 1."""
    health = client.get("/healthz")
    assert health.status_code == 200, f"after {after}: /healthz {answer(health)}"
    ready = client.get("/readyz")
    assert ready.status_code == 200, f"after {after}: /readyz {answer(ready)}"
    models = ready.json().get("models", {})
    assert set(models) == {served.name} and all(models.values()), f"after {after}: /readyz {answer(ready)}"
    prediction = client.post(f"/v1/models/{served.name}/predict", json=served.good_request)
    assert prediction.status_code == 200, f"after {after}: a good prediction got {answer(prediction)}"
    listing = client.get("/v1/models")
    assert listing.status_code == 200, f"after {after}: /v1/models {answer(listing)}"
    for model in listing.json()["models"]:
        traffic = sum(version["traffic"] for version in model["versions"])
        assert math.isclose(traffic, 1.0), f"after {after}: the traffic shares add up to {traffic}: {answer(listing)}"


def operation_in(served: Served, label: str):
    method, path = label.split(" ", 1)
    return served.schema[path.replace("{model}", served.name)][method]


def case_strategy(served: Served, operation, data):
    """Cases schemathesis generates for `operation`, steered half the time to the served model and its versions
    (a random name only ever meets a 404) and, for admin routes, to the right token (else to a generated one or
    none)."""
    path_parameters, headers = {}, None
    if "{name}" in operation.path and data.draw(st.booleans(), label="served model name"):
        path_parameters["name"] = served.name
    if "{version}" in operation.path:
        version = data.draw(st.sampled_from(["v1", "v2", None]), label="version")
        if version is not None:
            path_parameters["version"] = version
    if operation.path.startswith("/v1/admin/") and data.draw(st.booleans(), label="admin token"):
        headers = AUTH
    # A body can be made invalid; where only a path parameter or the token header is left, nothing can.
    modes = list(GenerationMode) if operation.body else [GenerationMode.POSITIVE]
    mode = data.draw(st.sampled_from(modes), label="generation mode")
    return operation.as_strategy(generation_mode=mode, path_parameters=path_parameters or None, headers=headers)


def fuzz_operation(served: Served, label: str, examples: int, checks: list) -> None:
    """Send `examples` generated requests to one operation and run `checks` on each answer. An admin request may
    change what is served, so it gets a fresh app (v1 with all traffic, v2 loaded with none), which must still
    serve after it; the others share one app, which must still serve at the end."""
    operation = operation_in(served, label)
    admin = operation.path.startswith("/v1/admin/")

    def send_and_check(client: TestClient, case) -> None:
        response = case.call(base_url=BASE_URL, session=session_for(client))
        # A form carries text only: a "negative" multipart case (a null made an array, a number made a string)
        # is often sent as text the server rightly reads as a valid value, so only JSON bodies are held to it.
        media_checks = [c for c in checks if c is not negative_data_rejection or case.media_type != "multipart/form-data"]
        case.validate_response(response, checks=media_checks)
        if admin:
            assert_still_serves(client, served, f"{case.method} {case.formatted_path} -> {answer(response)}")

    with served.client("v1", "v2") as shared:
        @settings(max_examples=examples, **HYPOTHESIS)
        @given(data=st.data())
        def fuzz(data):
            case = data.draw(case_strategy(served, operation, data), label="case")
            if admin:
                with served.client("v1", "v2") as client:
                    send_and_check(client, case)
            else:
                send_and_check(shared, case)

        fuzz()
        assert_still_serves(shared, served, f"{examples} generated requests to {label}")


@pytest.mark.parametrize("label", OPERATIONS)
def test_generated_requests_get_no_5xx_errors_in_shape_and_the_server_keeps_serving(served, label):
    examples = EXAMPLES.get(label, ADMIN_EXAMPLES if "/v1/admin/" in label else 3)
    fuzz_operation(served, label, examples, [not_a_server_error, error_body_in_shape, negative_data_rejection])


@pytest.mark.parametrize("label", OPERATIONS)
def test_generated_requests_get_answers_the_schema_documents(served, label):
    fuzz_operation(served, label, 10, DOCUMENTATION_CHECKS)


def test_good_predictions_match_the_schema(served):
    """The 200 envelope, for a JSON and a multipart request (generated ones are never good enough to get it)."""
    operation = operation_in(served, "POST /v1/models/{model}/predict")
    fields = dict(served.good_request)
    file = base64.b64decode(fields.pop(served.file_field))
    cases = [operation.Case(body=served.good_request, media_type="application/json"),
             operation.Case(body={**fields, served.file_field: file}, media_type="multipart/form-data")]
    with served.client() as client:
        for case in cases:
            response = case.call(base_url=BASE_URL, session=session_for(client))
            assert response.status_code == 200, f"{case.media_type}: {answer(response)}"
            case.validate_response(response, checks=DOCUMENTATION_CHECKS)


# Values of every JSON type, in and out of range: for each request field, those its schema rules out are sent.
WRONG_VALUES = [True, False, 0, -1, 2.5, 1e308, "5", "true", "", [], {}, None]


def test_a_good_request_with_one_field_the_schema_rules_out_is_refused(served):
    """The good request, one field at a time set to a value its schema rules out (e.g. top_k true or "5"): 4xx, as
    the field's type says, never a prediction made from a value the server guessed (the file field is the
    fuzzers' business)."""
    schema = served.schema.raw_schema["components"]["schemas"]
    request_schema = next(body for body in schema.values() if served.file_field in body.get("properties", {})
                          and body.get("additionalProperties") is False)
    problems = []
    with served.client() as client:
        for field, field_schema in request_schema["properties"].items():
            if field == served.file_field:
                continue
            for value in WRONG_VALUES:
                if jsonschema_rs.Draft202012Validator(field_schema).is_valid(value):
                    continue
                body = json.dumps({**served.good_request, field: value})
                response = client.post(f"/v1/models/{served.name}/predict", content=body,
                                       headers={"Content-Type": "application/json"})
                if not 400 <= response.status_code < 500:
                    problems.append(f"{field}: {json.dumps(value)} -> {answer(response)}")
    assert not problems, "accepted values the schema rules out:\n" + "\n".join(problems)


def image_files(file: bytes) -> dict[str, bytes]:
    """The example request's image as PNG (the predictor's own), JPEG, GIF and WebP."""
    from PIL import Image

    image = Image.open(io.BytesIO(file))
    files = {"png": file}
    for name, kind in (("jpeg", "JPEG"), ("gif", "GIF"), ("webp", "WEBP")):
        buffer = io.BytesIO()
        image.save(buffer, format=kind)
        files[name] = buffer.getvalue()
    return files


def with_png_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose header declares another size (its CRC made right, so that the decoder believes it)."""
    ihdr = data[12:16] + struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr[4:] + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


@st.composite
def corrupted_files(draw, files: dict[str, bytes]) -> bytes:
    """A good image file, damaged: bytes flipped, cut short, junk inserted, or (PNG) a header declaring up to
    2^31 - 1 pixels a side over the few bytes of data there are."""
    kind = draw(st.sampled_from(sorted(files)), label="format")
    data = bytearray(files[kind])
    if kind == "png" and draw(st.booleans(), label="declare another size"):
        sides = st.one_of(st.sampled_from([0, 1, 60000, 2 ** 16, 2 ** 31 - 1]), st.integers(0, 2 ** 31 - 1))
        data = bytearray(with_png_size(bytes(data), draw(sides, label="width"), draw(sides, label="height")))
    for _ in range(draw(st.integers(0, 3), label="damages")):
        at = draw(st.integers(0, len(data) - 1), label="at")
        damage = draw(st.sampled_from(["flip", "cut", "insert"]), label="damage")
        if damage == "flip":
            data[at] ^= draw(st.integers(1, 255), label="bits")
        elif damage == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=64), label="junk")
        if not data:
            break
    return bytes(data)


class ServerProcess:
    """`modelworks serve PACKAGE` on loopback (log level warning: nobody reads its stderr while it runs)."""

    def __init__(self, package: Path):
        self.package = package
        self.start()

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = start_cli(["serve", str(self.package), "--port", str(self.port), "--log-level", "warning"])
        deadline = time.time() + 90
        while time.time() < deadline and self.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        self.process.kill()
        raise AssertionError(f"the server did not start: {self.process.communicate()[1][-2000:]}")

    def died(self, wait_s: float = 0.0) -> int | None:
        """Its exit code if it is gone (waiting up to `wait_s` for it to go), else None."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=wait_s) if wait_s else None
        return self.process.poll()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=60)


def test_damaged_image_files_get_4xx_and_the_server_keeps_serving(served):
    """The decoders meet the files schemathesis cannot make: real images, damaged. Every answer is a 200 (the
    damage missed) or an error in shape, never a 5xx, and the process lives on. A real server process: a decoder
    that crashes takes the process with it, and must not take pytest too."""
    files = image_files(base64.b64decode(served.good_request[served.file_field]))
    server = ServerProcess(served.packages["v1"])
    try:
        # No shrinking: each crash costs a restart of the server (seconds). The falsifying example lists the
        # damage drawn, and the message carries the file.
        @settings(max_examples=80, phases=[Phase.explicit, Phase.generate], **HYPOTHESIS)
        @given(data=corrupted_files(files))
        def upload(data):
            if server.died() is not None:  # an earlier example killed it: every example meets a live server
                server.start()
            body = {**served.good_request, served.file_field: base64.b64encode(data).decode()}
            try:
                response = httpx.post(f"{server.url}/v1/models/{served.name}/predict", json=body, timeout=30)
            except httpx.HTTPError as exc:
                code = server.died(wait_s=5)
                log = server.process.communicate()[1][-500:] if code is not None else ""
                state = f"died (exit code {code})" if code is not None else "is alive"
                raise AssertionError(f"{type(exc).__name__}; the server {state} after this {len(data)}-byte file "
                                     f"(base64): {base64.b64encode(data).decode()[:2000]}\nits last words: {log}"
                                     ) from None
            assert response.status_code < 500, answer(response)
            assert_error_in_shape(response.status_code, response.content)

        upload()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert_still_serves(client, served, "80 damaged image files")
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- hostile admin input

# name -> steps (method, path under /v1/admin/models/NAME/, JSON text or None, expected status classes). The JSON is
# text because NaN and Infinity are not JSON, yet Python's parser, hence FastAPI's, reads them. $V2, $OTHER,
# $FILE stand for a copy of the package as v2, a package of the other task, and a file that is not a package.
LOAD_V2 = ("POST", "versions", '{"package": $V2}', (2,))
HOSTILE_ADMIN = {
    "split NaN": [("PUT", "split", '{"weights": {"v1": NaN}}', (4,))],
    "split NaN beside a weight": [LOAD_V2, ("PUT", "split", '{"weights": {"v1": 100, "v2": NaN}}', (4,))],
    "split Infinity": [("PUT", "split", '{"weights": {"v1": Infinity}}', (4,))],
    "split 1e999 (read as infinity)": [("PUT", "split", '{"weights": {"v1": 1e999}}', (4,))],
    "split -Infinity": [LOAD_V2, ("PUT", "split", '{"weights": {"v1": -Infinity, "v2": 1}}', (4,))],
    "split all zero": [("PUT", "split", '{"weights": {"v1": 0}}', (4,))],
    "split weights whose sum overflows": [LOAD_V2,  # refused, or served as the 50/50 split it is
                                          ("PUT", "split", '{"weights": {"v1": 1e308, "v2": 1e308}}', (2, 4))],
    "split an unknown version": [("PUT", "split", '{"weights": {"v1": 1, "v9": 1}}', (4,))],
    "split weights that are not numbers": [("PUT", "split", '{"weights": {"v1": "all"}}', (4,))],
    "split a body that is not JSON": [("PUT", "split", '{"weights": ', (4,))],
    "load with weight Infinity": [("POST", "versions", '{"package": $V2, "weight": Infinity}', (4,))],
    "load with weight NaN": [("POST", "versions", '{"package": $V2, "weight": NaN}', (4,))],
    "load with a negative weight": [("POST", "versions", '{"package": $V2, "weight": -1}', (4,))],
    "load a path too long for a file name": [("POST", "versions", '{"package": "' + "a" * 300 + '"}', (4,))],
    "load a path with a NUL byte": [("POST", "versions", '{"package": "pack\\u0000age"}', (4,))],
    "load an empty path": [("POST", "versions", '{"package": ""}', (4,))],
    "load a file, not a package": [("POST", "versions", '{"package": $FILE}', (4,))],
    "load a package of another task": [("POST", "versions", '{"package": $OTHER}', (4,))],
    "promote an unknown version": [("POST", "promote", '{"version": "v9"}', (4,))],
    "unload the only version": [("DELETE", "versions/v1", None, (4,))],
    "unload the version with the traffic": [LOAD_V2, ("DELETE", "versions/v1", None, (4,))],
    "unload an unknown version": [("DELETE", "versions/v9", None, (4,))],
    "unload the last version after a NaN split": [("PUT", "split", '{"weights": {"v1": NaN}}', (4,)),
                                                  ("DELETE", "versions/v1", None, (4,))],
    "promote v2, unload v1, then v2": [LOAD_V2, ("POST", "promote", '{"version": "v2"}', (2,)),
                                       ("DELETE", "versions/v1", None, (2,)), ("DELETE", "versions/v2", None, (4,))],
    "rollback with no earlier split": [("POST", "rollback", None, (4,))],
}


@pytest.mark.parametrize("case", list(HOSTILE_ADMIN))
def test_hostile_admin_input_is_refused_and_the_model_keeps_serving(served, case, tmp_path):
    """Each case on a fresh app serving v1 alone. Every step is checked, and the server after them all, so that
    one report names everything that went wrong (e.g. a NaN split answered 500 *and* the last version unloaded)."""
    not_a_package = tmp_path / "notes.txt"
    not_a_package.write_text("not a package")
    paths = {"$V2": served.packages["v2"], "$OTHER": served.other_task_package, "$FILE": not_a_package}
    problems = []
    with served.client() as client:
        for method, path, body, expected in HOSTILE_ADMIN[case]:
            for placeholder, value in paths.items():
                body = body.replace(placeholder, json.dumps(str(value))) if body else body
            response = client.request(method, f"/v1/admin/models/{served.name}/{path}", content=body,
                                      headers={**AUTH, "Content-Type": "application/json"})
            step = f"{method} {path} {(body or '')[:120]} -> {answer(response)}"
            if response.status_code // 100 not in expected:
                problems.append(f"{step}\n    expected {' or '.join(f'{e}xx' for e in expected)}")
            try:
                assert_error_in_shape(response.status_code, response.content)
            except AssertionError as exc:
                problems.append(f"{step}\n    {exc}")
        try:
            assert_still_serves(client, served, case)
        except AssertionError as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- admin sequences

NAN, INF = math.nan, math.inf
VERSIONS = st.sampled_from(["v1", "v2", "v3"])  # v3 is never loaded
WEIGHTS = st.one_of(st.sampled_from([0.0, -0.0, 1.0, 50.0, 100.0, -1.0, 5e-324, 1e308, NAN, INF, -INF]),
                    st.floats(allow_nan=True, allow_infinity=True))


def test_admin_sequences_never_take_the_model_down(served, tmp_path):
    """Sequences of load / split / promote / rollback / unload with hostile values, each on a fresh app serving v1
    alone; after every step the model still serves. Bodies are sent as JSON text with NaN and Infinity, which
    Python's and FastAPI's JSON parsers accept."""
    not_a_package = tmp_path / "not-a-package"
    not_a_package.mkdir()
    packages = st.sampled_from([
        str(served.packages["v1"]), str(served.packages["v2"]),  # a reload; a new version
        str(served.other_task_package),  # another task: refused
        str(tmp_path / "missing"), str(not_a_package), str(served.packages["v1"] / "manifest.json"),
        "", "\x00", "a" * 300, "../../../../etc",  # no file name is 300 bytes long
    ])

    class AdminSequence(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.steps: list[str] = []
            self.context = served.client()
            self.client = self.context.__enter__()

        def teardown(self):
            self.context.__exit__(None, None, None)

        def admin(self, method: str, path: str, body=None) -> None:
            content = None if body is None else json.dumps(body).encode()  # NaN, Infinity as JSON text
            response = self.client.request(method, f"/v1/admin/models/{served.name}/{path}", content=content,
                                           headers={**AUTH, "Content-Type": "application/json"})
            self.steps.append(f"{method} {path} {content.decode()[:200] if content else ''} -> {answer(response)}")
            steps = "\n  " + "\n  ".join(self.steps)
            assert response.status_code < 500, f"server error after:{steps}"
            assert_error_in_shape(response.status_code, response.content, f"; after:{steps}")

        @rule(package=packages, weight=WEIGHTS)
        def load(self, package, weight):
            self.admin("POST", "versions", {"package": package, "weight": weight})

        @rule(weights=st.dictionaries(VERSIONS, WEIGHTS, max_size=3))
        def split(self, weights):
            self.admin("PUT", "split", {"weights": weights})

        @rule(version=VERSIONS)
        def promote(self, version):
            self.admin("POST", "promote", {"version": version})

        @rule()
        def rollback(self):
            self.admin("POST", "rollback")

        @rule(version=VERSIONS)
        def unload(self, version):
            self.admin("DELETE", f"versions/{version}")

        @invariant()
        def still_serves(self):
            assert_still_serves(self.client, served, "\n  " + "\n  ".join(self.steps or ["(start)"]))

    # One bug reported per run: shrinking a sequence replays it hundreds of times, and every 5xx here fails at the
    # same line, which Hypothesis would count as one bug anyway.
    run_state_machine_as_test(AdminSequence, settings=settings(max_examples=40, stateful_step_count=6,
                                                                 report_multiple_bugs=False, **HYPOTHESIS))
