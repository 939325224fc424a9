"""/v1/completions and continuous batching, on a real uvicorn server in a thread serving a tiny language model
package (random weights: these tests are about serving, not text quality). The official `openai` client parses
the answers and the server-sent events."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from modelworks.config import load_config, to_dict
from modelworks.inference import open_model
from modelworks.serve.app import ServeSettings, create_app
from modelworks.tasks.language_model.task import LanguageModelTask

openai = pytest.importorskip("openai")

WORDS_PROMPT = "the king"


@pytest.fixture(scope="module")
def lm_package(tmp_path_factory) -> Path:
    """LanguageModelTask.tiny()'s model with random weights, exported (TorchScript and ONNX, both graphs checked)."""
    from modelworks.engine.batches import eval_indices, fetch
    from modelworks.export.build import ExportOptions, build_package

    root = tmp_path_factory.mktemp("lm")
    raw = LanguageModelTask.tiny(root / "data")
    raw.update(task="language_model", output_dir=str(root / "runs"), name="tiny")
    raw["train"].update(device="cpu", precision="fp32")
    cfg = load_config(LanguageModelTask, raw)
    task = LanguageModelTask(cfg)
    splits = task.datasets(torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    val = lambda: fetch(splits.val, eval_indices(len(splits.val), 8, 0, 1), torch.device("cpu"))  # noqa: E731
    build_package(task, model, val, iter(()), root / "package", ExportOptions("verse", "v1"), source={}, metrics={},
                  config=json.loads(json.dumps(to_dict(cfg))), log=lambda line: None)
    return root / "package"


class ServerThread:
    """uvicorn on a free port in a background thread: real sockets, real disconnects, real concurrency."""

    def __init__(self, app):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True  # what uvicorn's SIGTERM handler does
        self.thread.join(30)

    def __exit__(self, *exc):
        self.stop()


def serve(package: Path, **settings) -> ServerThread:
    model = open_model(package, "onnx")
    return ServerThread(create_app([model], None, ServeSettings(admin_token="", **settings)))


@pytest.fixture(scope="module")
def server(lm_package):
    with serve(lm_package, max_running=8, max_queue=16) as running:
        yield running


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_the_openai_client_completes_streamed_and_not(server):
    api = client(server)
    whole = api.completions.create(model="verse", prompt=WORDS_PROMPT, max_tokens=12, temperature=0.8, seed=3,
                                   extra_body={"top_k": 10})
    assert whole.object == "text_completion" and whole.model == "verse"
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.index == 0 and len(choice.text) == 12  # a char model
    assert whole.usage.prompt_tokens == len(WORDS_PROMPT) and whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == len(WORDS_PROMPT) + 12

    chunks = list(api.completions.create(model="verse", prompt=WORDS_PROMPT, max_tokens=12, temperature=0.8, seed=3,
                                         stream=True, extra_body={"top_k": 10}))
    # Streamed, not in one piece: the first token is a chunk of its own; later tokens already waiting behind a
    # chunk being written are joined into the next one, so their count depends on the machine's load
    assert len(chunks) >= 2 and len(chunks[0].choices[0].text) == 1
    assert "".join(c.choices[0].text for c in chunks) == choice.text  # same seed, same text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_raw_sse_shape_usage_chunk_and_done(server):
    body = {"model": "verse", "prompt": "a", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 1, "completion_tokens": 4,
                                                         "total_tokens": 5}


def test_several_prompts_and_n_give_prompt_major_choices(server):
    api = client(server)
    answer = api.completions.create(model="verse", prompt=["the", "a lord"], n=2, max_tokens=6, seed=1)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.choices[0].text != answer.choices[1].text  # n > 1 with a seed: seed + j per choice
    assert answer.usage.prompt_tokens == len("the") + len("a lord") and answer.usage.completion_tokens == 24


def test_a_late_short_request_finishes_before_an_earlier_long_one(server):
    """Continuous batching: the short request joins the running batch; it does not wait for the long one."""
    finished: dict[str, float] = {}

    def complete(label, max_tokens):
        client(server).completions.create(model="verse", prompt="the", max_tokens=max_tokens)
        finished[label] = time.perf_counter()

    long = threading.Thread(target=complete, args=("long", 900))
    long.start()
    deadline = time.time() + 10
    while metric(server, "modelworks_running_sequences") < 1:  # the long one is decoding
        assert time.time() < deadline
        time.sleep(0.005)
    complete("short", 5)
    assert "long" not in finished  # the short one came back while the long one was still generating
    long.join(60)
    assert finished["short"] < finished["long"]


def test_a_disconnected_stream_frees_its_slot(server):
    before = metric(server, "modelworks_generated_tokens_total")
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=30,
                      json={"model": "verse", "prompt": "the", "max_tokens": 4000, "stream": True}) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)  # the first token arrived: the sequence is running
        assert metric(server, "modelworks_running_sequences") == 1
    deadline = time.time() + 5
    while metric(server, "modelworks_running_sequences") > 0:
        assert time.time() < deadline, "the running sequence was not dropped after its client left"
        time.sleep(0.01)
    generated = metric(server, "modelworks_generated_tokens_total") - before
    assert generated < 4000
    time.sleep(0.2)
    assert metric(server, "modelworks_generated_tokens_total") - before == generated  # nothing more decoded for it
    assert metric(server, "modelworks_time_to_first_token_seconds_count") >= 1


@pytest.mark.parametrize("body, status, param", [
    ({"model": "verse", "max_tokens": 5}, 400, "prompt"),
    ({"model": "verse", "prompt": "", "max_tokens": 5}, 400, "prompt"),
    ({"model": "verse", "prompt": [], "max_tokens": 5}, 400, "prompt"),
    ({"model": "verse", "prompt": "the king " * 10, "max_tokens": 5}, 400, "prompt"),  # context is 32
    ({"model": "verse", "prompt": "ZQ@", "max_tokens": 5}, 400, "prompt"),  # not in the char vocabulary
    ({"model": "verse", "prompt": "the", "n": "2"}, 400, "n"),
    ({"model": "verse", "prompt": "the", "n": 0}, 400, "n"),
    ({"model": "verse", "prompt": "the", "stop": 3}, 400, "stop"),
    ({"model": "verse", "prompt": "the", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "verse", "prompt": "the", "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"model": "verse", "prompt": "the", "frequency_penalty": 1.0}, 400, "frequency_penalty"),
    ({"model": "nope", "prompt": "the"}, 404, "model"),
])
def test_bad_inputs_are_openai_errors_naming_the_field(server, body, status, param):
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"].startswith(param), error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    # the server keeps serving
    assert client(server).completions.create(model="verse", prompt="the", max_tokens=2).choices[0].text


def test_the_openai_client_raises_on_a_bad_request(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(server).completions.create(model="verse", prompt="the", max_tokens=0)


def test_models_list_has_openai_shape_and_the_streaming_capability(server):
    listed = client(server).models.list()
    assert [m.id for m in listed.data] == ["verse"]
    described = httpx.get(f"{server.url}/v1/models").json()["models"][0]
    assert described["streams"] is True and described["completions"] == "/v1/completions"


def test_the_predict_route_still_answers_whole(server):
    response = httpx.post(f"{server.url}/v1/models/verse/predict", json={"prompt": "the", "max_tokens": 5}, timeout=30)
    assert response.status_code == 200
    assert response.json()["prediction"]["completion_tokens"] == 5


def test_past_the_queue_bound_503_and_a_queued_request_starts_when_a_slot_frees(lm_package):
    with serve(lm_package, max_running=1, max_queue=1) as small:
        url = f"{small.url}/v1/completions"
        long = httpx.stream("POST", url, timeout=30, json={"prompt": "the", "max_tokens": 4000, "stream": True})
        with long as first:
            lines = first.iter_lines()
            next(lines)  # running: the only slot is taken
            results = {}
            waiting = threading.Thread(target=lambda: results.update(
                queued=httpx.post(url, json={"prompt": "a", "max_tokens": 3}, timeout=30)))
            waiting.start()
            deadline = time.time() + 5
            while metric(small, "modelworks_waiting_sequences") < 1:
                assert time.time() < deadline
                time.sleep(0.005)
            refused = httpx.post(url, json={"prompt": "a", "max_tokens": 3}, timeout=30)
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert refused.json()["error"]["code"] == "overloaded"
            assert "queued" not in results  # waiting behind the long stream
        waiting.join(10)  # the long stream's client left: its slot went to the queued request
        assert results["queued"].status_code == 200
        assert results["queued"].json()["choices"][0]["finish_reason"] == "length"


def test_drain_lets_a_running_stream_finish(lm_package):
    small = serve(lm_package).__enter__()
    events = []
    with httpx.stream("POST", f"{small.url}/v1/completions", timeout=30,
                      json={"prompt": "the", "max_tokens": 300, "stream": True}) as response:
        lines = response.iter_lines()
        events.append(next(lines))
        stopper = threading.Thread(target=small.stop)  # as on SIGTERM
        stopper.start()
        events.extend(line for line in lines if line)
    stopper.join(30)
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events if e.startswith("data: {"))
    assert len(text) == 300
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{small.url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=5)


def raw_answer(port: int, data: bytes, pieces: int = 1, wait_s: float = 5.0) -> bytes:
    """Send `data` (`pieces` times), then read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        try:
            for _ in range(pieces):
                sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while still sending: the answer is already waiting
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
    return answer


def test_errors_before_routing_have_openai_shape_on_completions_and_the_house_shape_elsewhere(lm_package):
    """413 (body too large) and 408 (body too slow) from the middleware, 431 (head too large) from the HTTP
    protocol: no route has run, yet /v1/completions answers them in OpenAI's shape, which its clients parse."""
    from modelworks.serve.http import httptools_protocol

    app = create_app([open_model(lm_package, "onnx")], None,
                     ServeSettings(admin_token="", timeout_s=1.0, max_body_bytes=1000, max_header_bytes=4096))
    running = ServerThread(app)
    protocol = httptools_protocol(4096, 1.0, app.state.server.error_formats)
    if protocol is None:
        pytest.skip("httptools is not installed")
    running.server.config.http = protocol
    openai_keys, house_keys = {"message", "type", "param", "code"}, {"code", "message", "field"}

    def error_of(answer: bytes, status: int) -> dict:
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
        return json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]

    with running:
        for path, keys in (("/v1/completions", openai_keys), ("/v1/models/verse/predict", house_keys)):
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
            too_large = error_of(raw_answer(running.port, head + b"Content-Length: 5000\r\n\r\n"), 413)
            slow = error_of(raw_answer(running.port, head + b"Content-Length: 50\r\n\r\n{\"prompt\""), 408)
            big_head = error_of(raw_answer(running.port, head + b"X-Padding: " + b"p" * 1024, pieces=8), 431)
            for error, code in ((too_large, "body_too_large"), (slow, "body_timeout"),
                                (big_head, "headers_too_large")):
                assert set(error) == keys and error["code"] == code, (path, error)
        assert too_large["message"].startswith("body: larger than the limit of 1000 bytes")
        # The official client reads the OpenAI-shaped one as an error with its message.
        with pytest.raises(openai.APIStatusError, match="larger than the limit of 1000 bytes") as caught:
            client(running).completions.create(model="verse", prompt="x" * 2000, max_tokens=1)
        assert caught.value.status_code == 413 and caught.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("text,reason", [("ROMEO:", None), ('a "quote", \\ and\nnewline', None),
                                         ("naïve ☃ \u2028", "stop"), ("", "length")])
def test_a_text_chunk_is_byte_for_byte_the_envelope_encoded(text, reason):
    """The pre-rendered event a stream writes per token equals the dict envelope serialised in full."""
    from modelworks.serve.completions import Generation, encode_event

    generation = Generation.__new__(Generation)  # the rendering needs only the envelope's fields
    generation.id, generation.timestamp, generation.name, generation.chunk_head = 'cmpl-"x"', 1700000000, "m/é", None
    choice = {"text": text, "index": 3, "logprobs": None, "finish_reason": reason}
    assert generation.text_chunk(text, 3, reason) == encode_event(generation.envelope([choice]))
