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
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from helpers import fashion_test_images, png_bytes, start_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# A closed network and a throwaway profile: nothing in the browser may reach out or keep state.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, package: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = start_cli(["serve", str(package), "--port", str(self.port), *extra])
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

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=60)
        return self.process.returncode, stderr


@pytest.fixture(scope="module")
def image(tiny_run_dir) -> tuple[bytes, int]:
    root = Path(yaml.safe_load((tiny_run_dir / "config.yaml").read_text())["data"]["root"])
    pixels, labels = fashion_test_images(root, n=1)
    return png_bytes(pixels[0]), int(labels[0])


def test_real_server_answers_exports_metrics_logs_json_and_drains_on_sigterm(tiny_package, image):
    # A 1.5 s batch window keeps a request in flight while SIGTERM arrives.
    server = ServerProcess(tiny_package, "--max-wait-ms", "1500", "--max-batch-size", "64")
    body = {"image": base64.b64encode(image[0]).decode()}
    try:
        response = httpx.post(f"{server.url}/v1/models/tiny/predict", json=body, timeout=10,
                              headers={"X-Request-Id": "first-request"})
        assert response.status_code == 200 and response.json()["version"] == "v1"
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
        assert 'modelworks_requests_total{model="tiny",status="200",version="v1"} 1.0' in metrics

        in_flight = {}
        thread = threading.Thread(target=lambda: in_flight.update(
            response=httpx.post(f"{server.url}/v1/models/tiny/predict", json=body, timeout=30)))
        thread.start()
        time.sleep(0.5)  # the request is waiting for its batch
    finally:
        code, stderr = server.stop()
    thread.join(timeout=30)
    assert in_flight["response"].status_code == 200  # answered although SIGTERM came first
    # uvicorn re-raises the signal it caught once shutdown is complete, so a drained server ends "killed by
    # SIGTERM" like any well-behaved daemon; the "stopped" line below shows the drain finished first.
    assert code in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert len(lines) == len(stderr.strip().splitlines())  # every log line is JSON
    requests = [line for line in lines if line["message"] == "request"]
    first = next(line for line in requests if line["request_id"] == "first-request")
    assert first["status"] == 200 and first["model"] == "tiny" and first["version"] == "v1"
    assert any(line["message"] == "stopped" and line["answered_all"] for line in lines)


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


@contextlib.contextmanager
def demo_page(package, tmp_path):
    """`modelworks serve package` in a real process and its demo page open in headless Chromium, models listed."""
    from playwright.sync_api import sync_playwright

    server = ServerProcess(package)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page()
                page.goto(server.url + "/")
                page.wait_for_function("document.querySelectorAll('#model option').length > 0", timeout=20000)
                yield page
            finally:
                browser.close()
    finally:
        server.stop()


def test_demo_page_in_headless_chromium(tiny_package, image, tmp_path):
    if CHROMIUM is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
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
    if CHROMIUM is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    png = tmp_path / "photo.png"
    png.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 256, (48, 80, 3), np.uint8)))
    with demo_page(tiny_detection_package, tmp_path) as page:
        info = page.inner_text("#model-info")
        offered = (page.is_visible("#resize-option"), page.is_visible("#score-option"), page.input_value("#score"))
        page.fill("#score", "0")  # the tiny model is barely trained: ask for every box
        page.set_input_files("#file", str(png))
        page.wait_for_function("document.getElementById('boxes').style.display === 'block'", timeout=20000)
        rows = page.locator("#results li").all_inner_texts()
        canvas = page.evaluate("[document.getElementById('boxes').width, "
                               "document.getElementById('boxes').height]")
        error = page.inner_text("#error")
    assert "boxes: detection, input 3x64x64" in info
    assert offered == (False, True, "0.25")
    assert 0 < len(rows) <= 100 and all(row.strip().endswith("%") for row in rows)
    assert canvas == [320, 192]  # an 80x48 upload, enlarged 4x to stay legible
    assert error == ""
