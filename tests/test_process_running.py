"""The processor, the jobs worker and the alert evaluator run the same way (tally/running.py): /metrics on their
configured port, a clean exit (0) on SIGTERM however early it comes once they are up, and a metrics port another
program holds is logged, never a stop."""

from __future__ import annotations

import socket

import httpx
import pytest

from tally.settings import Settings
from tests.support import TallyProcess, free_port, wait_until

PORT_SETTING = {"process": "processor_metrics_port", "jobs": "jobs_metrics_port", "alerts": "alerts_metrics_port"}


def _serves_metrics(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("command", PORT_SETTING)
def test_a_process_serves_metrics_and_exits_cleanly_on_sigterm(command: str, isolated: Settings) -> None:
    port = free_port()
    process = TallyProcess(command, [command], isolated.model_copy(update={PORT_SETTING[command]: port}))
    try:
        wait_until(lambda: _serves_metrics(port) or not process.alive(), 60, what=f"/metrics on {port}")
        assert process.alive(), process.output()[-3000:]
    finally:
        code = process.stop()  # as soon as /metrics answers
    assert code == 0, process.output()[-3000:]


@pytest.mark.parametrize("command", PORT_SETTING)
def test_a_busy_metrics_port_never_stops_a_process(command: str, isolated: Settings) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        process = TallyProcess(command, [command], isolated.model_copy(update={PORT_SETTING[command]: port}))
        try:
            warning = f"metrics port {port} unavailable"
            wait_until(lambda: warning in process.output() or not process.alive(), 60, what="the metrics warning")
            assert process.alive() and warning in process.output(), process.output()[-3000:]
        finally:
            code = process.stop()
    assert code == 0, process.output()[-3000:]
