"""A real Prometheus (Debian's package, deploy/local/prometheus.sh) scrapes a running gateway, processor,
jobs worker and alert evaluator with the alert rules of deploy/prometheus/tally-rules.yml: every target is
up, every rule evaluates without error, every dashboard query runs, and stopping the processor makes
TallyProcessDown pending for its job."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest
import yaml

from tally.settings import ROOT, Settings
from tests.support import free_port, wait_until
from tests.tally_stack import Target, tally_stack

RULES = ROOT / "deploy" / "prometheus" / "tally-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tally.json"


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        build = subprocess.run(["bash", str(ROOT / "deploy" / "local" / "prometheus.sh")], capture_output=True,
                               text=True, timeout=900)
        found = shutil.which("prometheus")
        if found is None:
            pytest.fail(f"prometheus could not be installed by deploy/local/prometheus.sh: {build.stderr[-800:]}")
    return found


def _api(base: str, path: str, **params: str) -> dict:
    try:
        response = httpx.get(f"{base}/api/v1/{path}", params=params, timeout=5)
    except httpx.HTTPError:
        return {}
    return response.json() if response.status_code == 200 else {}


@pytest.fixture(scope="module")
def prometheus(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Target]]]:
    binary = _prometheus_binary()
    home = tmp_path_factory.mktemp("prometheus")
    with tally_stack(settings, "prom") as targets:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": t.job, "static_configs": [{"targets": [t.url.split("/")[2]]}]}
                               for t in targets.values()],
        }
        (home / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        with (home / "prometheus.log").open("wb") as log:
            server = subprocess.Popen([binary, f"--config.file={home / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={home / 'data'}",
                                       f"--web.listen-address=127.0.0.1:{port}"],
                                      stdout=log, stderr=subprocess.STDOUT)
            try:
                base = f"http://127.0.0.1:{port}"
                wait_until(lambda: bool(_api(base, "status/buildinfo")), 60, 0.2, "prometheus to answer")
                yield base, targets
            finally:
                server.terminate()
                server.wait(30)


def test_every_tally_process_is_scraped_and_every_rule_evaluates(prometheus: tuple[str, dict[str, Target]]) -> None:
    base, targets = prometheus

    def all_up() -> bool:
        active = _api(base, "targets").get("data", {}).get("activeTargets", [])
        return {t["labels"]["job"] for t in active if t["health"] == "up"} == {t.job for t in targets.values()}

    wait_until(all_up, 60, 0.5, "every Tally target up")
    expected = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}

    def evaluated() -> list[dict]:
        groups = _api(base, "rules").get("data", {}).get("groups", [])
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if {r["name"] for r in rules} == expected and all(
            not r["lastEvaluation"].startswith("0001") for r in rules) else []

    wait_until(lambda: bool(evaluated()), 60, 0.5, "every rule evaluated")
    assert [(r["name"], r["lastError"]) for r in evaluated() if r["health"] != "ok"] == []

    def quiet() -> bool:  # the evaluator takes its lock a moment after it starts serving /metrics
        alerts = _api(base, "alerts").get("data", {}).get("alerts", [])
        return not {a["labels"]["alertname"] for a in alerts} & {"TallyNoActiveAlertEvaluator", "TallyProcessDown"}

    wait_until(quiet, 30, 0.5, "no evaluator or process alert while all run")


def test_every_dashboard_query_runs(prometheus: tuple[str, dict[str, Target]]) -> None:
    base, _ = prometheus
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            answer = _api(base, "query", query=target["expr"].replace("$__rate_interval", "1m"))
            assert answer.get("status") == "success", (panel["title"], target["expr"], answer)


def test_a_stopped_processor_makes_process_down_pending(prometheus: tuple[str, dict[str, Target]]) -> None:
    base, targets = prometheus
    targets["process"].process.stop()

    def pending() -> bool:
        alerts = _api(base, "alerts").get("data", {}).get("alerts", [])
        return any(a["labels"]["alertname"] == "TallyProcessDown" and a["labels"]["job"] == "tally-processor"
                   and a["state"] in ("pending", "firing") for a in alerts)

    wait_until(pending, 60, 0.5, "TallyProcessDown pending for tally-processor")
