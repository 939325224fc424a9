"""The Prometheus rules in deploy/prometheus, checked by Prometheus's own promtool: they load, each alert fires
on synthetic series that should page and stays quiet on ones that should not (deploy/prometheus/tests/*.yml),
and the dashboard's queries parse. promtool comes from Debian's `prometheus` package (.ci/run installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "modelworks.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed: `apt-get install "
                                    "prometheus` (Debian) provides it; .ci/run installs it")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@needs_promtool
def test_rules_load():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    count = sum(len(group["rules"]) for group in groups)
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {count} rules found" in result.stdout


@needs_promtool
def test_each_alert_fires_and_stays_quiet_as_its_unit_tests_expect():
    assert RULE_TESTS
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    output = result.stdout + result.stderr  # promtool reports unit tests on stderr
    assert result.returncode == 0, output
    assert output.count("SUCCESS") == len(RULE_TESTS), output


@needs_promtool
def test_the_unit_tests_catch_a_changed_threshold(tmp_path):
    """The rule tests would fail if an alert's threshold moved: raising the error-rate threshold from 5% to 50%
    silences the alert that errors.yml expects to fire."""
    copy = tmp_path / "prometheus"
    shutil.copytree(DEPLOY / "prometheus", copy)
    rules = copy / "alerts.yml"
    text = rules.read_text()
    changed = text.replace("expr: job_model:modelworks_server_errors:ratio_rate5m > 0.05",
                           "expr: job_model:modelworks_server_errors:ratio_rate5m > 0.5")
    assert changed != text
    rules.write_text(changed)
    result = promtool("test", "rules", "tests/errors.yml", cwd=copy)
    assert result.returncode != 0
    assert "alertname: ModelworksHighErrorRate" in result.stderr + result.stdout


def test_every_alert_has_a_duration_a_severity_and_what_to_do():
    alerts = alert_rules()
    assert {a["alert"] for a in alerts} >= {"ModelworksTargetDown", "ModelworksNotReady", "ModelworksHighErrorRate",
                                            "ModelworksShedding", "ModelworksQueueSaturated", "ModelworksHighLatency",
                                            "ModelworksConfidenceDrift", "ModelworksNoTraffic"}
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"\d+[smh]", alert.get("for", "")), f"{name}: no `for:` duration"
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        assert set(alert["annotations"]) >= {"summary", "description", "runbook"}, name
        assert all(len(alert["annotations"][key]) > 20 for key in ("description", "runbook")), name


def test_every_alert_is_tested_firing_and_quiet():
    """Each alert is expected to fire in some unit test and to stay quiet in another, so a rule that never fires
    (or always does) fails its tests."""
    fires, quiet = set(), set()
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in alert_rules()}
    assert names - fires == set(), "alerts never expected to fire"
    assert names - quiet == set(), "alerts never expected to stay quiet"


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by values Prometheus accepts."""
    return (expr.replace("$__rate_interval", "1m").replace("${datasource}", "")
            .replace("$job", ".*").replace("$model", ".*"))


@needs_promtool
def test_the_dashboards_queries_parse(tmp_path):
    """promtool parses each query (Grafana's variables filled in) as it parses a rule's, so a typo in the
    dashboard fails here rather than as an empty panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    assert queries and not any("$" in grafana_to_promql(q) for q in queries)
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr":
                                                         grafana_to_promql(q)} for i, q in enumerate(queries)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (job (rate(modelworks_requests_total[1m]))"}]}]}))
    assert promtool("check", "rules", str(broken)).returncode != 0


@needs_promtool
def test_the_prometheus_config_loads_with_its_rules():
    result = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout  # alerts.yml, found beside it
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert [job["job_name"] for job in scrape] == ["modelworks"]  # what the rules select


def test_the_compose_file_mounts_files_that_exist():
    """Docker is not needed by the tests; what they can check is that each file the compose file mounts or
    builds from is where it says."""
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert set(services) == {"modelworks", "prometheus", "grafana"}
    assert (DEPLOY / services["modelworks"]["build"]["context"] / services["modelworks"]["build"]["dockerfile"]
            ).is_file()
    mounts = [volume.split(":")[0] for service in services.values() for volume in service.get("volumes", [])]
    local = [mount for mount in mounts if mount.startswith("./")]
    assert len(local) == 4 and all((DEPLOY / mount).exists() for mount in local), local
