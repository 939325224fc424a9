"""A real Prometheus (Debian's `prometheus` package) scraping a real `modelworks serve` process with
deploy/prometheus's configuration and rules: the scrape job, the label sets the rules match on (which the
promtool unit tests can only assume) and every rule's evaluation, on live data."""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import fashion_test_images, png_bytes, start_cli

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            value = condition()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout_s} s")


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed: `apt-get install prometheus` (Debian); "
                    ".ci/run installs it")
def test_prometheus_scrapes_the_server_and_evaluates_every_rule(tiny_package, tiny_run_dir, tmp_path):
    root = Path(yaml.safe_load((tiny_run_dir / "config.yaml").read_text())["data"]["root"])
    pixels, _ = fashion_test_images(root, n=4)
    serve_port, prometheus_port = free_port(), free_port()
    server = start_cli(["serve", str(tiny_package), "--port", str(serve_port), "--log-level", "warning"])
    prometheus = None
    try:
        url = f"http://127.0.0.1:{serve_port}"
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200 or server.poll() is not None,
                 90, "the server ready")
        assert server.poll() is None, server.communicate()[1][-3000:]
        # deploy's configuration as it is, but for the target and a 1 s cadence (the test cannot wait 15 s)
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{serve_port}"]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
        prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Prometheus answers 503 "Service Unavailable" to queries until its TSDB has started (slow under load).
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{prometheus_port}/-/ready", timeout=2).status_code == 200
                 or prometheus.poll() is not None, 60, "prometheus ready")
        assert prometheus.poll() is None, f"prometheus exited with {prometheus.returncode}"
        api = f"http://127.0.0.1:{prometheus_port}/api/v1"

        def query(expr: str) -> dict[tuple, float]:
            answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=5)
            assert answer.status_code == 200, f"prometheus answered {answer.status_code} to {expr!r}: {answer.text[:300]}"
            result = answer.json()["data"]["result"]
            return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(r["value"][1])
                    for r in result}

        images = [base64.b64encode(png_bytes(p)).decode() for p in pixels]

        def predict(n: int) -> None:
            for i in range(n):
                answer = httpx.post(f"{url}/v1/models/tiny/predict", json={"image": images[i % 4]}, timeout=10)
                assert answer.status_code == 200
            assert httpx.post(f"{url}/v1/models/tiny/predict", json={"image": "%%%"}, timeout=10).status_code == 422

        # A labelled series appears with its first request, and a rate needs it to grow after a first scrape
        # saw it: requests, a scrape, more requests.
        predict(1)
        wait_for(lambda: query("modelworks_prediction_confidence_count"), 30, "a scrape after the first requests")
        predict(12)
        job, instance = ("job", "modelworks"), ("instance", f"127.0.0.1:{serve_port}")
        rates = wait_for(lambda: query("job_model:modelworks_requests:rate5m > 0"), 30, "a request rate")
        assert list(rates) == [(job, ("model", "tiny"))]
        assert query("modelworks_ready") == {(instance, job): 1.0}
        saturation = query("instance_model_version:modelworks_queue_saturation:avg5m")
        assert list(saturation) == [(instance, job, ("model", "tiny"), ("version", "v1"))]
        assert 0 <= saturation[(instance, job, ("model", "tiny"), ("version", "v1"))] < 0.05  # one at a time
        p99 = query("job_model:modelworks_request_seconds:p99_rate5m")[(job, ("model", "tiny"))]
        assert 0 < p99 < 10
        confidence = query("job_model_version:modelworks_prediction_confidence:mean1h")
        assert 0 < confidence[(job, ("model", "tiny"), ("version", "v1"))] <= 1
        assert query("job_model:modelworks_server_errors:ratio_rate5m") == {}  # no 5xx: nothing to divide
        # Every rule evaluates without error on the server's real series, and on healthy traffic every alert
        # settles inactive. (Before the first rates exist, ModelworksNoTraffic is rightly pending: a server
        # that has answered nothing yet.)
        def rules_settled() -> list[dict]:
            groups = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            settled = all(rule["health"] != "unknown" and rule.get("state", "inactive") == "inactive"
                          for rule in rules)
            return rules if settled else []

        try:
            rules = wait_for(rules_settled, 30, "every rule evaluated and every alert inactive")
        except AssertionError:
            groups = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
            active = [(r["name"], r.get("state")) for g in groups for r in g["rules"]
                      if r.get("state", "inactive") != "inactive"]
            raise AssertionError(f"alerts active on healthy traffic: {active}") from None
        assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load((tmp_path / "alerts.yml").read_text())
                                 ["groups"])
        assert [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []
    finally:
        for process in (prometheus, server):
            if process is not None:
                process.terminate()
                process.communicate(timeout=30)
