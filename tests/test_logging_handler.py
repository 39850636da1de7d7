"""Two lines ship an application's logs: the handler batches records to /v1/logs through the client."""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg

from tally.ingest.auth import create_key
from tally.logging import TallyHandler, level_name
from tally.settings import Settings
from tests.processor.helpers import drained, wait_for
from tests.gateway.helpers import healthy
from tests.support import free_port, running, wait_until



def test_python_levels_map_to_the_nearest_tally_level() -> None:
    assert [level_name(n) for n in (5, 10, 15, 20, 25, 30, 40, 50, 60)] == [
        "trace", "debug", "debug", "info", "info", "warn", "error", "fatal", "fatal"]


async def test_records_arrive_as_log_events_with_level_attributes_and_exception(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"logs-{uuid.uuid4().hex[:8]}"
    _, secret = await create_key(db, tenant, "logging-test", ["logs:write"])
    settings = isolated.model_copy(update={"processor_metrics_port": 0})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running("gateway", ["gateway", "--port", str(port)], settings), running("processor", ["process"], settings):
        await asyncio.to_thread(wait_until, lambda: healthy(url), 30, 0.1, "the gateway")
        handler = TallyHandler(url, secret, service="checkout")
        log = logging.getLogger(f"test.{tenant}")
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
        log.propagate = False
        for n in range(120):
            log.info("order %d placed", n, extra={"order": n})
        try:
            raise ValueError("card declined")
        except ValueError:
            log.exception("payment failed")
        handler.close()
        log.removeHandler(handler)
        await wait_for(lambda: drained(settings, db), 60, "the processor to drain the topic")

    rows = await db.fetch("select type, subject, data from events where tenant = $1", tenant)
    assert len(rows) == 121 and {(r["type"], r["subject"]) for r in rows} == {("tally.log", "checkout")}
    by_message = {r["data"]: r for r in rows}
    assert handler.client.metrics.sent == 121 and handler.client.metrics.dropped == 0
    failure = next(r for m, r in by_message.items() if "payment failed" in m)
    assert '"level": "error"' in failure["data"] and "card declined" in failure["data"]
    assert any('"order": 7' in m for m in by_message)
