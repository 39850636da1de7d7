"""The README's first command ends with `tally demo`: it must pass on every run, not only the first."""

from __future__ import annotations

import asyncio
import subprocess
import sys


from tally.demo import key_path
from tally.settings import ROOT, Settings
from tests.gateway.helpers import healthy
from tests.support import env_for, free_port, running, wait_until



async def test_the_demo_passes_twice_in_a_row(isolated: Settings) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = isolated.model_copy(update={"processor_metrics_port": 0})
    with running("gateway", ["gateway", "--port", str(port)], settings), running("processor", ["process"], settings):
        await asyncio.to_thread(wait_until, lambda: healthy(url), 30, 0.1, "the gateway")
        runs = [await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "tally.cli", "demo", "--url", url], env=env_for(settings),
            cwd=ROOT, capture_output=True, text=True, timeout=120) for _ in range(2)]
    key_path(settings).unlink(missing_ok=True)
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
        assert "each event stored once and counted once" in run.stdout
        assert "(+3)" in run.stdout and "(+2)" in run.stdout  # customer-0: events 0, 2, 4; customer-1: 1, 3
