"""The Grafana dashboard and the alert rules ask only for metrics Tally exposes.

The names come from the real /metrics pages of a running gateway, processor, jobs worker and alert
evaluator (a labelled family with no series yet is still announced by its TYPE line); every query is
parsed as PromQL. The committed JSON must equal the generator's output (deploy/grafana/dashboards.py)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from types import ModuleType

import promql_parser
import pytest
import yaml

from tally.settings import ROOT, Settings
from tests.tally_stack import scrape, tally_stack

GENERATOR = ROOT / "deploy" / "grafana" / "dashboards.py"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tally.json"
RULES = ROOT / "deploy" / "prometheus" / "tally-rules.yml"
# the text format's TYPE line names a counter with its _total already
SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"), "info": ("_info",), "stateset": ("",), "unknown": ("",)}
SYNTHETIC = {"up"}  # made by Prometheus for every target, not by a /metrics page


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tally_dashboards", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _series_names(exposition: str) -> set[str]:
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names |= {f"{name}{suffix}" for suffix in SUFFIXES[kind]}
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


@pytest.fixture(scope="module")
def exposed(settings: Settings) -> Iterator[set[str]]:
    with tally_stack(settings, "dash") as targets:
        pages = {command: scrape(target.url) for command, target in targets.items()}
    assert "tally_gateway_requests" in pages["gateway"]
    yield set().union(*(_series_names(page) for page in pages.values()))


def _metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects, from its syntax tree."""
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, promql_parser.Call):
            for arg in node.args:
                walk(arg)
        elif isinstance(node, promql_parser.AggregateExpr):
            walk(node.expr)
        elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
            walk(node.expr)

    walk(promql_parser.parse(expr.replace("$__rate_interval", "5m")))
    return names


def _dashboard_queries(board: dict) -> dict[str, list[str]]:
    return {panel["title"]: [t["expr"] for t in panel.get("targets", [])]
            for panel in board["panels"] if panel["type"] != "row"}


def test_the_committed_dashboard_is_the_generators_output() -> None:
    assert DASHBOARD.read_text() == _generator().render(), "run python deploy/grafana/dashboards.py and commit"


def test_every_dashboard_query_names_exposed_metrics(exposed: set[str]) -> None:
    queries = _dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert all(queries.values()), [title for title, exprs in queries.items() if not exprs]
    unknown = {title: sorted(_metric_names(expr) - exposed - SYNTHETIC)
               for title, exprs in queries.items() for expr in exprs if _metric_names(expr) - exposed - SYNTHETIC}
    assert not unknown


def test_every_alert_rule_names_exposed_metrics(exposed: set[str]) -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    unknown = {rule["alert"]: sorted(_metric_names(rule["expr"]) - exposed - SYNTHETIC)
               for rule in rules if _metric_names(rule["expr"]) - exposed - SYNTHETIC}
    assert not unknown


def test_a_misspelt_metric_is_caught(exposed: set[str]) -> None:
    assert _metric_names("sum(rate(tally_processor_consumd_total[5m])) / sum(up)") - exposed - SYNTHETIC == {
        "tally_processor_consumd_total"}


def test_compose_provisions_the_dashboard_beside_prometheus() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in services["grafana"]["volumes"]}
    assert mounts["./deploy/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services
    assert "./deploy/prometheus/tally-rules.yml:/etc/prometheus/tally-rules.yml:ro" in services["prometheus"]["volumes"]
