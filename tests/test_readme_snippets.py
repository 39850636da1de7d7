"""Every snippet of the README's "Sending events" and "Reading counters" sections runs as written,
against a gateway and processor of the test's own (only addresses, key, topic and tenant swapped)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid

import asyncpg

from tally.ingest.auth import create_key
from tally.settings import ROOT, Settings
from tests.processor.helpers import drained, wait_for
from tests.gateway.helpers import healthy
from tests.support import env_for, free_port, running, wait_until


def _sections(*titles: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = []
    for title in titles:
        body = readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
        blocks += re.findall(r"```python\n(.*?)```", body, re.S)
    return blocks


SNIPPETS = _sections("Sending events", "Reading counters")



def test_the_sections_hold_the_snippets_this_test_expects() -> None:
    assert len(SNIPPETS) == 4
    assert "CounterReader" in SNIPPETS[-1]


async def test_every_snippet_runs_and_its_events_arrive(isolated: Settings, db: asyncpg.Connection) -> None:
    tenant = f"readme-{uuid.uuid4().hex[:8]}"
    _, secret = await create_key(db, tenant, "readme", ["events:write", "logs:write"])
    settings = isolated.model_copy(update={"processor_metrics_port": 0})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    swaps = {"http://127.0.0.1:8080": url, "tly_your_key": secret, "127.0.0.1:9092": settings.kafka_bootstrap,
             '"tally.counters.v1"': f'"{settings.topics.counters}"', 'tenant="demo"': f'tenant="{tenant}"'}
    outputs = []
    with running("gateway", ["gateway", "--port", str(port)], settings), running("processor", ["process"], settings):
        await asyncio.to_thread(wait_until, lambda: healthy(url), 30, 0.1, "the gateway")
        for n, snippet in enumerate(SNIPPETS):
            for old, new in swaps.items():
                snippet = snippet.replace(old, new)
            if n == len(SNIPPETS) - 1:
                await wait_for(lambda: drained(settings, db), 60, "the processor to count what the snippets sent")
            run = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", snippet], cwd=ROOT, text=True,
                                          capture_output=True, timeout=120, env=env_for(settings))
            assert run.returncode == 0, f"snippet {n}:\n{snippet}\n{run.stdout}{run.stderr}"
            assert "Traceback" not in run.stderr
            outputs.append(run.stdout)
        await wait_for(lambda: drained(settings, db), 60, "the processor to drain the topic")

    rows = await db.fetch("select type, subject, data->>'message' as message from events where tenant = $1", tenant)
    assert sorted((r["type"], r["subject"]) for r in rows if r["type"] == "order.placed") == [
        ("order.placed", "customer-7")] * 3
    assert sorted(r["subject"] for r in rows if r["type"] == "tally.log") == ["checkout", "checkout"]
    assert "sent=3" in outputs[0]
    assert "('customer-7', 'order.placed'): 3" in outputs[-1]
