"""The alert rules and the Grafana dashboard name only metrics the server really exports, and the dashboard is
a well-formed Grafana JSON model. The names are read from a live app's /metrics (the tiny package served in
process, after a good and a bad request) with prometheus_client's own parser."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from helpers import fashion_test_images, png_bytes
from modelworks.inference import open_model
from modelworks.serve.app import ServeSettings, create_app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "modelworks.json"
PROMETHEUS_OWN = {"up"}  # written by Prometheus itself for each scrape target

# PromQL words that look like metric names: keywords, and modifiers that may stand without parentheses.
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
            "inf", "nan"}
TOKEN = re.compile(r"""
    "(?:\\.|[^"\\])*" | '(?:\\.|[^'\\])*' | `[^`]*`       # strings: label values, never names
  | \{[^}]*\}                                              # label matchers
  | \[[^\]]*\]                                             # range and subquery durations
  | \b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)   # label lists of grouping and matching
  | \boffset\s+-?\w+                                       # offset 1h
  | \$\{?\w+\}?                                            # Grafana variables
  | \d+(?:\.\d+)?(?:e[+-]?\d+)?                            # numbers
  | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)                     # a name, and whether it is called: a function, or
    (?P<call>\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\()?      # an aggregation with its grouping first
""", re.X | re.I)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and strings left out)."""
    names = set()
    for match in TOKEN.finditer(expr):
        name = match.group("name")
        if name and not match.group("call") and name.lower() not in KEYWORDS:
            names.add(name)
    return names


def test_metric_names_reads_selectors_and_skips_everything_else():
    expr = ('sum by (job, model) (rate(foo_total{status=~"5..", model="bar_total"}[5m] offset 1h)) / ignoring '
            '(version) group_left histogram_quantile(0.99, sum by (le) (rate(baz_bucket[$__rate_interval]))) '
            '> 1e-3 and on (job) level:recorded:ratio or vector(0) unless absent(up{job="x"}) > bool 0.5')
    assert metric_names(expr) == {"foo_total", "baz_bucket", "level:recorded:ratio", "up"}


def rule_expressions() -> tuple[list[str], set[str]]:
    """(every rule's expression, the names the recording rules define)."""
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    return [rule["expr"] for rule in rules], {rule["record"] for rule in rules if "record" in rule}


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


@pytest.fixture(scope="module")
def exported(tiny_package, tiny_run_dir) -> tuple[set[str], set[str]]:
    """(sample names, metric family names) of a live app's /metrics after a good and a bad prediction, so that
    every labelled series (errors, confidence, batches) exists."""
    root = Path(yaml.safe_load((tiny_run_dir / "config.yaml").read_text())["data"]["root"])
    pixels, _ = fashion_test_images(root, n=1)
    app = create_app([open_model(tiny_package, "onnx")], None, ServeSettings(admin_token=""))
    with TestClient(app) as client:
        image = base64.b64encode(png_bytes(pixels[0])).decode()
        assert client.post("/v1/models/tiny/predict", json={"image": image}).status_code == 200
        assert client.post("/v1/models/tiny/predict", json={"image": "%%%"}).status_code == 422
        text = client.get("/metrics").text
    families = list(text_string_to_metric_families(text))
    # A labelled metric no request has touched yet (the streaming ones, for this image model) exports its HELP and
    # TYPE lines but no sample: its series' names follow from its type.
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    declared = {family.name + suffix for family in families for suffix in suffixes.get(family.type, ("",))}
    return ({sample.name for family in families for sample in family.samples} | declared,
            {family.name for family in families})


def test_the_rules_use_only_exported_or_recorded_names(exported):
    samples, _ = exported
    expressions, recorded = rule_expressions()
    used = set().union(*map(metric_names, expressions))
    assert used, "no metric name found in the rules"
    assert used - samples - recorded - PROMETHEUS_OWN == set()
    # the server's names are really used (histograms through their _bucket/_sum/_count series)
    assert {"modelworks_requests_total", "modelworks_request_seconds_bucket", "modelworks_queue_depth",
            "modelworks_queue_capacity", "modelworks_ready", "modelworks_traffic_weight",
            "modelworks_prediction_confidence_sum", "modelworks_prediction_confidence_count"} <= used


def test_the_dashboard_uses_only_exported_names_and_shows_every_metric(exported):
    samples, families = exported
    used = set().union(*map(metric_names, dashboard_expressions()))
    assert used - samples == set()
    shown = {family for family in families if any(name == family or name.startswith(f"{family}_")
                                                  for name in used)}
    # prometheus_client also exports each counter's and histogram's creation time as a `_created` gauge
    meant_for_panels = {f for f in families if f.startswith("modelworks_") and not f.endswith("_created")}
    assert len(meant_for_panels) == 19 and meant_for_panels - shown == set(), "metrics no panel shows"


def test_a_misspelled_name_would_be_caught(exported):
    samples, _ = exported
    assert metric_names("rate(modelworks_request_total[5m])") - samples == {"modelworks_request_total"}


# ---------------------------------------------------------------------------------------------- the dashboard


def test_the_dashboard_is_a_grafana_model_with_a_prometheus_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in panels:
        where = f"panel {panel['id']} ({panel['title']})"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in "xywh") and grid["w"] > 0 and grid["h"] > 0, where
        assert grid["x"] + grid["w"] <= 24, f"{where}: wider than Grafana's 24 columns"
        covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                   for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not covered & cells, f"{where}: overlaps another panel"
        cells |= covered
        assert panel["targets"], where
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{where}: refIds must be unique"
        assert all(target["expr"].strip() for target in panel["targets"]), where
    # every variable a query uses is defined (Grafana's own $__ variables aside)
    used = {v for expr in dashboard_expressions() for v in re.findall(r"\$\{?(\w+)", expr)}
    assert {v for v in used if not v.startswith("__")} <= set(variables)
