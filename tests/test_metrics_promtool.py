"""The /metrics endpoints, the gateway's, the processor's, the alert evaluator's and the jobs worker's, pass
`promtool check metrics`.

promtool comes from deploy/local/promtool.sh (built from its Go module into .local/bin); the test
builds it when it is missing and skips, saying why, only when it cannot be built."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tally.settings import ROOT, Settings
from tests.gateway.helpers import event, start_gateway
from tests.support import free_port, running, wait_until

SCRIPT = ROOT / "deploy" / "local" / "promtool.sh"


def _promtool() -> Path:
    found = sorted((ROOT / ".local" / "bin").glob("promtool-*"))
    if not found:
        build = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1200)
        found = sorted((ROOT / ".local" / "bin").glob("promtool-*"))
        if not found:
            on_path = shutil.which("promtool")
            if on_path is None:
                pytest.skip(f"promtool could not be built by {SCRIPT.name}: {build.stderr.strip()[-500:]}")
            return Path(on_path)
    return found[-1]


def _check(promtool: Path, exposition: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=60)


def _scrape(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


@pytest.fixture(scope="module")
def promtool() -> Path:
    return _promtool()


async def test_the_gateway_metrics_pass_promtool(promtool: Path, isolated: Settings) -> None:
    with start_gateway("gateway-metrics", isolated) as gateway:
        async with gateway.client("tly_unknown") as client:
            await client.post("/v1/events", json=event())
            exposition = (await client.get("/metrics")).text
    assert "tally_gateway_requests_total" in exposition
    check = _check(promtool, exposition)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(("command", "port_setting", "expected"), [
    ("process", "processor_metrics_port", "tally_processor_consumed_total"),
    ("alerts", "alerts_metrics_port", "tally_alerts_evaluation_seconds"),
    ("jobs", "jobs_metrics_port", "tally_billing_report_rows"),
])
def test_the_processor_alerts_and_jobs_metrics_pass_promtool(promtool: Path, isolated: Settings, command: str,
                                                        port_setting: str, expected: str) -> None:
    port = free_port()
    settings = isolated.model_copy(update={port_setting: port})
    url = f"http://127.0.0.1:{port}/metrics"
    with running(f"{command}-metrics", [command], settings):
        wait_until(lambda: expected in (_scrape(url) or ""), 30, 0.2, f"the {command} /metrics")
        exposition = _scrape(url) or ""
    check = _check(promtool, exposition)
    assert check.returncode == 0, check.stdout + check.stderr
