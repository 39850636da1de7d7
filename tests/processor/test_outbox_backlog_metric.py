"""Counter windows the relay cannot publish show on the processor's /metrics as tally_processor_outbox_backlog,
while the relay retries, and the gauge falls to zero once the counter topic takes them."""

from __future__ import annotations

import asyncpg
from confluent_kafka.admin import AdminClient

from tally.settings import Settings
from tally.topics import create_topics
from tests.metering.helpers import calls, metered
from tests.processor.helpers import produce, wait_for
from tests.support import free_port, running, wait_until
from tests.tally_stack import sample

GAUGE = "tally_processor_outbox_backlog"


async def test_windows_left_unpublished_show_in_the_backlog_gauge(isolated: Settings,
                                                                  db: asyncpg.Connection) -> None:
    port = free_port()
    settings = metered(isolated).model_copy(update={"processor_metrics_port": port})
    url = f"http://127.0.0.1:{port}/metrics"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.delete_topics([settings.topics.counters])[settings.topics.counters].result(30)  # the relay cannot publish
    tenant = f"t-outbox-{settings.consumer_group[-8:]}"
    with running("processor", ["process"], settings):
        produce(settings, calls(tenant, "acme", 5))

        async def queued() -> bool:  # hour and day windows of api_calls
            return await db.fetchval("select count(*) from counter_outbox where key like $1", f'%"{tenant}"%') >= 2

        await wait_for(queued, 90, "the processor to store the events and queue their windows")

        async def shown() -> bool:
            value = sample(url, GAUGE)
            return value is not None and value >= 2 and value == await db.fetchval("select count(*) from counter_outbox")

        await wait_for(shown, 60, f"{GAUGE} to show the queued windows")

        create_topics(settings)  # the topic is back: the relay's next attempt publishes the windows

        wait_until(lambda: sample(url, GAUGE) == 0, 180, 0.5, f"{GAUGE} to fall to 0 once the windows are published")
    assert await db.fetchval("select count(*) from counter_outbox") == 0
