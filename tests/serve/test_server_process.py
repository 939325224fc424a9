"""`modelworks serve` as a real uvicorn process on loopback: start, answer, metrics, JSON logs, the demo page in
headless Chromium, and a graceful stop that answers the requests in flight."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from helpers import PYTHON, cli_env, fashion_test_images, png_bomb, png_bytes, start_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# A closed network and a throwaway profile: nothing in the browser may reach out or keep state.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLOW_SERVER = Path(__file__).with_name("slow_server.py")


class ServerProcess:
    """`modelworks serve PACKAGE *extra` on a free loopback port, ready; with `slow_s`, every prediction call
    first sleeps that long (slow_server.py), so requests stay in flight."""

    def __init__(self, package: Path, *extra: str, slow_s: float = 0.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", str(package), "--port", str(self.port), *extra]
        if slow_s:
            self.process = subprocess.Popen([PYTHON, str(SLOW_SERVER), str(slow_s), *args], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, env=cli_env())
        else:
            self.process = start_cli(args)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early: {self.process.communicate()[1][-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.process.kill()
        raise AssertionError("server did not become ready in 90 s")

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.process.send_signal(signum)
        _, stderr = self.process.communicate(timeout=60)
        return self.process.returncode, stderr


def json_lines(stderr: str) -> list[dict]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert len(lines) == len(stderr.strip().splitlines()), stderr[-3000:]  # every log line is JSON
    return lines


def queue_depth(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("modelworks_queue_depth{"))


def post_in_threads(url: str, body: dict, n: int) -> tuple[list[threading.Thread], list]:
    """`n` predictions, each from its own thread and connection; results[i] is (response or error, time)."""
    results: list = [None] * n

    def post(i: int) -> None:
        try:
            results[i] = (httpx.post(f"{url}/v1/models/tiny/predict", json=body, timeout=60), time.time())
        except httpx.HTTPError as exc:
            results[i] = (exc, time.time())

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    return threads, results


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)


def refuses_connections(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except httpx.ConnectError:
        return True
    return False


@pytest.fixture(scope="module")
def image(tiny_run_dir) -> tuple[bytes, int]:
    root = Path(yaml.safe_load((tiny_run_dir / "config.yaml").read_text())["data"]["root"])
    pixels, labels = fashion_test_images(root, n=1)
    return png_bytes(pixels[0]), int(labels[0])


def test_real_server_answers_exports_metrics_and_logs_json(tiny_package, image):
    server = ServerProcess(tiny_package)
    body = {"image": base64.b64encode(image[0]).decode()}
    try:
        response = httpx.post(f"{server.url}/v1/models/tiny/predict", json=body, timeout=10,
                              headers={"X-Request-Id": "first-request"})
        assert response.status_code == 200 and response.json()["version"] == "v1"
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
        assert 'modelworks_requests_total{model="tiny",status="200",version="v1"} 1.0' in metrics
    finally:
        code, stderr = server.stop()
    # uvicorn re-raises the signal it caught once shutdown is complete, so a drained server ends "killed by
    # SIGTERM" like any well-behaved daemon; the "stopped" line shows the drain finished first.
    assert code in (0, -signal.SIGTERM)
    lines = json_lines(stderr)
    requests = [line for line in lines if line["message"] == "request"]
    first = next(line for line in requests if line["request_id"] == "first-request")
    assert first["status"] == 200 and first["model"] == "tiny" and first["version"] == "v1"
    assert any(line["message"] == "stopped" and line["answered_all"] for line in lines)


def test_sigterm_refuses_new_connections_and_answers_every_request_in_flight(tiny_package, image):
    """Six requests on a model taking 2 s a batch (two at a time): SIGTERM arrives with one batch running and
    the other four queued. New connections are refused at once; every accepted request is still answered.
    (SIGTERM is sent once all six are queued or running: a request whose head had not yet arrived would meet
    the drain as an idle connection, closed without an answer, as uvicorn closes idle keep-alive connections.
    The batcher waits up to 200 ms to fill its first batch of two, so "four queued" means all six arrived: with
    --max-wait-ms 0 a first batch of one left a queue of four with the sixth request still on its way, under CI
    load.)"""
    server = ServerProcess(tiny_package, "--max-batch-size", "2", "--max-wait-ms", "200", slow_s=2.0)
    body = {"image": base64.b64encode(image[0]).decode()}
    try:
        threads, results = post_in_threads(server.url, body, 6)
        wait_until(lambda: queue_depth(server.url) >= 4, 20, "requests queued behind the running batch")
    finally:
        sigterm_at = time.time()
        server.process.send_signal(signal.SIGTERM)
    try:
        wait_until(lambda: refuses_connections(server.url), 5, "new connections refused after SIGTERM")
        refused_at = time.time()
        _, stderr = server.process.communicate(timeout=60)
    finally:
        for thread in threads:
            thread.join(timeout=60)
    answers = [result for result, _ in results]
    assert all(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers), answers
    answered_after = sorted(at - sigterm_at for _, at in results)
    assert refused_at - sigterm_at < 1.0 < answered_after[-1]  # refused while the last were still in flight
    assert answered_after[-1] < 10
    assert server.process.returncode in (0, -signal.SIGTERM)
    lines = json_lines(stderr)
    assert sum(line["message"] == "request" and line["status"] == 200 for line in lines) == 6
    assert any(line["message"] == "stopped" and line["answered_all"] for line in lines)


def test_drain_s_bounds_the_wait_for_requests_in_flight(tiny_package, image):
    """--drain-s 1 on a model taking 4 s a batch, one at a time, three requests: the server stops waiting for
    them after about a second (plus the batch already running), not after the 12 s they need."""
    server = ServerProcess(tiny_package, "--max-batch-size", "1", "--max-wait-ms", "0", "--drain-s", "1",
                           slow_s=4.0)
    body = {"image": base64.b64encode(image[0]).decode()}
    try:
        threads, results = post_in_threads(server.url, body, 3)
        wait_until(lambda: queue_depth(server.url) >= 2, 20, "requests queued behind the running one")
    finally:
        sigterm_at = time.time()
        code, stderr = server.stop()
    stopped_after = time.time() - sigterm_at
    for thread in threads:
        thread.join(timeout=60)
    assert stopped_after < 7, stopped_after
    assert code in (0, -signal.SIGTERM)
    assert not any(isinstance(result, httpx.Response) and result.status_code == 200 for result, _ in results)
    assert any("timeout graceful shutdown exceeded" in line.get("message", "") for line in json_lines(stderr))


def test_ctrl_c_stops_the_server_with_exit_code_130(tiny_package, image):
    server = ServerProcess(tiny_package)
    response = httpx.post(f"{server.url}/v1/models/tiny/predict", timeout=10,
                          json={"image": base64.b64encode(image[0]).decode()})
    assert response.status_code == 200
    code, stderr = server.stop(signal.SIGINT)
    assert code == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert any(line["message"] == "stopped" and line["answered_all"] for line in json_lines(stderr))


def server_pid_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def raw_exchange(port: int, head: bytes, chunks=(), pause_s: float = 0.0, read_timeout_s: float = 10) -> bytes:
    """Send `head`, then each of `chunks` (pausing `pause_s` before each), and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout_s) as sock:
        try:
            sock.sendall(head)
            for chunk in chunks:
                time.sleep(pause_s)
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the server refused and closed while we were sending
            pass
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
        return answer


def test_request_heads_are_bounded_in_size_and_time(tiny_package, image):
    """uvicorn's httptools protocol buffered a 100 MB header (+380 MB) and waited forever for a head that never
    ended; the protocol now answers 431 past --max-header-bytes and 408 past --timeout-s, closing the connection."""
    server = ServerProcess(tiny_package, "--max-header-bytes", "8192", "--timeout-s", "1.5", "--log-level",
                           "warning")
    try:
        before = server_pid_rss_mb(server.process.pid)
        # 20 MB of X-Caller-Id, sent in 1 MB pieces: refused once 8 KB have arrived without the head's end.
        head = b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: x\r\nX-Caller-Id: "
        answer = raw_exchange(server.port, head, [b"u" * (1 << 20)] * 20)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "headers_too_large" and "limit of 8192 bytes" in error["message"]
        assert server_pid_rss_mb(server.process.pid) - before < 30
        # A head that starts and stalls: 408 after --timeout-s.
        tic = time.time()
        answer = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert answer.startswith(b"HTTP/1.1 408 ") and b"header_timeout" in answer
        assert 1.3 < time.time() - tic < 5
        # A body that stalls: 408 from the app once --timeout-s has passed since its head arrived.
        body = json.dumps({"image": base64.b64encode(image[0]).decode()}).encode()
        head = (b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        answer = raw_exchange(server.port, head + body[:100])
        assert answer.startswith(b"HTTP/1.1 408 ") and b"body_timeout" in answer, answer[:300]
        # Ordinary requests with ordinary headers are untouched.
        response = httpx.post(f"{server.url}/v1/models/tiny/predict", content=body, timeout=10,
                              headers={"Content-Type": "application/json", "X-Caller-Id": "user-1",
                                       "User-Agent": "a" * 2000})
        assert response.status_code == 200, response.text
    finally:
        server.stop()


def multipart_body(field: str, file: bytes, **values: str) -> tuple[bytes, bytes]:
    """(body, content type) of a multipart form: text `values` first, then `file` as `field`."""
    boundary = b"modelworks-test-boundary"
    parts = [b"--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n" % (boundary, k.encode(), v.encode())
             for k, v in values.items()]
    parts.append(b"--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"x.png\"\r\n"
                 b"Content-Type: image/png\r\n\r\n%s\r\n--%s--\r\n" % (boundary, field.encode(), file, boundary))
    return b"".join(parts), b"multipart/form-data; boundary=" + boundary


def test_a_bomb_is_refused_from_the_start_of_its_upload_without_reading_the_rest(tiny_package, image):
    """The soak saw a 3.5 MB PNG bomb take 233 ms (p99) to refuse under load: the whole body was read first. Now
    the file's header is judged from the body's first bytes: a client that sends 64 KB and stalls is answered
    413 at once (not 408 after --timeout-s), and the connection is closed, so the rest is never read."""
    server = ServerProcess(tiny_package, "--timeout-s", "6", "--log-level", "warning")
    try:
        bomb = png_bomb(20000, 20000)
        multipart, content_type = multipart_body("image", bomb, resize="true")
        json_body = json.dumps({"resize": True, "image": base64.b64encode(bomb).decode()}).encode()
        for body, kind in ((multipart, content_type), (json_body, b"application/json")):
            assert len(body) > 300_000
            head = (b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n"
                    b"Content-Length: %d\r\n\r\n" % (kind, len(body)))
            tic = time.time()
            answer = raw_exchange(server.port, head + body[:65536])  # then silence: the rest never comes
            assert time.time() - tic < 2, kind  # not the 6 s body timeout
            assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower(), answer[:300]
            error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
            assert error["code"] == "input_too_large" and "400,000,000 pixels" in error["message"]
        # A large good file arriving in pieces passes the screen and is answered as before.
        noise = np.random.default_rng(0).integers(0, 256, (400, 400), dtype=np.uint8)
        good, content_type = multipart_body("image", png_bytes(noise), resize="true")
        assert len(good) > 150_000
        head = (b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % (content_type, len(good)))
        pieces = [good[i:i + 30_000] for i in range(0, len(good), 30_000)]
        answer = raw_exchange(server.port, head + pieces[0], pieces[1:], pause_s=0.02)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        # Bodies that arrive whole, and requests without one, keep their connection.
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/v1/models/nope").status_code == 404
            response = client.post("/v1/models/tiny/predict", files={"image": ("x.png", png_bytes(noise[:28, :28]))})
            assert response.status_code == 200 and response.headers.get("connection") != "close"
    finally:
        server.stop()


def skip_without_chromium():
    if CHROMIUM is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed, so the browser tests cannot run here (apt-get install chromium); "
                    "CI installs it and runs them")


@contextlib.contextmanager
def browser_page(package, tmp_path, path: str, outside: list[str] | None = None):
    """`modelworks serve package` in a real process and `path` open in headless Chromium. Requests to any other
    host are refused, as on a closed network, and their URLs appended to `outside`."""
    from playwright.sync_api import sync_playwright

    skip_without_chromium()
    outside = [] if outside is None else outside
    server = ServerProcess(package)

    def only_loopback(route):
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page()
                page.route("**/*", only_loopback)
                page.goto(server.url + path)
                yield page
            finally:
                browser.close()
    finally:
        server.stop()


@contextlib.contextmanager
def demo_page(package, tmp_path):
    """The demo page in headless Chromium, models listed."""
    with browser_page(package, tmp_path, "/") as page:
        page.wait_for_function("document.querySelectorAll('#model option').length > 0", timeout=20000)
        yield page


def test_api_docs_render_offline_in_headless_chromium(tiny_package, tmp_path):
    """/docs draws Swagger UI from files the server holds: with every other host unreachable, the page lists the
    predict route and its request schema, and asks nothing of the network."""
    outside: list[str] = []
    with browser_page(tiny_package, tmp_path, "/docs", outside) as page:
        page.wait_for_selector(".opblock-summary-path[data-path='/v1/models/tiny/predict']", timeout=30000)
        page.click(".opblock-summary-path[data-path='/v1/models/tiny/predict']")
        page.wait_for_selector(".opblock-body", timeout=10000)
        body = page.inner_text(".opblock-body")
        title = page.title()
    assert "modelworks model server" in title
    assert "application/json" in body and "multipart/form-data" in body
    assert outside == []


def test_demo_page_in_headless_chromium(tiny_package, image, tmp_path):
    png = tmp_path / "upload.png"
    png.write_bytes(image[0])
    with demo_page(tiny_package, tmp_path) as page:
        assert "tiny: classification, input 1x28x28" in page.inner_text("#model-info")
        page.set_input_files("#file", str(png))
        page.wait_for_selector("#results li", timeout=20000)
        rows = page.locator("#results li").all_inner_texts()
        latency = page.inner_text("#latency")
        # a picture of the wrong size: the page shows the server's explanation
        wrong = tmp_path / "wrong.png"
        wrong.write_bytes(png_bytes(np.zeros((40, 40, 3), np.uint8)))
        page.uncheck("#resize")
        page.set_input_files("#file", str(wrong))
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=20000)
        error = page.inner_text("#error")
    labels = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert len(rows) == 5
    assert rows[0].split("\n")[0].strip() == labels[image[1]]
    assert all(row.strip().endswith("%") for row in rows)
    assert "version v1" in latency and "server" in latency and "ms" in latency
    assert error.startswith("422 invalid_input: image: the model takes 28x28 grayscale")


def test_demo_page_draws_detections_in_headless_chromium(tiny_detection_package, tmp_path):
    """The same page on a detection model: it offers the model's request fields (a score threshold, no resize)
    and draws the returned boxes over the upload on a canvas."""
    png = tmp_path / "photo.png"
    png.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 256, (48, 80, 3), np.uint8)))
    with demo_page(tiny_detection_package, tmp_path) as page:
        info = page.inner_text("#model-info")
        offered = (page.is_visible("#resize-option"), page.is_visible("#score-option"), page.input_value("#score"))
        page.fill("#score", "0")  # the tiny model is barely trained: ask for every box
        page.set_input_files("#file", str(png))
        page.wait_for_function("document.getElementById('boxes').style.display === 'block'", timeout=20000)
        rows = page.locator("#results li").all_inner_texts()
        # Each row wears its box's colour; labels on the canvas do not overlap while there is room (labelPlace).
        row_colours = page.evaluate("[...document.querySelectorAll('#results li .bar')].map(b => b.style.background)")
        overlaps = page.evaluate("""() => {
            const placed = [], canvas = {width: 320, height: 192};
            for (let i = 0; i < 10; i++) placed.push(labelPlace(placed, 10, 20, 60, 70, 16, canvas));
            const hit = (a, b) => !(a.x + a.w <= b.x || b.x + b.w <= a.x || a.y + a.h <= b.y || b.y + b.h <= a.y);
            return placed.flatMap((a, i) => placed.slice(i + 1).filter((b) => hit(a, b))).length; }""")
        canvas = page.evaluate("[document.getElementById('boxes').width, "
                               "document.getElementById('boxes').height]")
        error = page.inner_text("#error")
    assert "boxes: detection, input 3x64x64" in info
    assert offered == (False, True, "0.25")
    assert 0 < len(rows) <= 100 and all(row.strip().endswith("%") for row in rows)
    assert all(colour.startswith("rgb(") for colour in row_colours) and len(row_colours) == len(rows)
    assert overlaps == 0  # 10 boxes in one place: their 16-px labels share the 192-px canvas without overlapping
    assert canvas == [320, 192]  # an 80x48 upload, enlarged 4x to stay legible
    assert error == ""
