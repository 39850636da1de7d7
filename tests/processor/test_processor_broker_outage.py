"""The Kafka broker stopped while a batch is in flight: the processor waits it out, nothing is
dead-lettered, lost or counted twice, and it carries on by itself when the broker returns.

The test runs a broker of its own (tests.scratch_kafka), so stopping it leaves the shared one
alone. A table lock holds one batch in its PostgreSQL step until the broker is down, so that
batch's counter publication always meets the outage rather
than the outage falling between batches by chance; the outage outlasts the consumer's session, so
the partitions are lost while the batch is held and must be fetched again once they come back.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from tally.settings import Settings
from tally.topics import create_topics
from tests.processor.helpers import (
    assert_topic_matches_postgres, counter_counts, drained, envelope, event_count, expected_counts, produce, wait_for,
)
from tests.scratch_kafka import ScratchKafka
from tests.support import read_topic, running, wait_until


@pytest.mark.slow
async def test_broker_outage_with_a_batch_in_flight_is_waited_out_without_dead_letters(
    settings: Settings, scratch_kafka: ScratchKafka
) -> None:
    run = uuid.uuid4().hex[:8]
    tenant = f"broker-outage-{run}"
    own = settings.model_copy(update={
        "kafka_bootstrap": scratch_kafka.bootstrap, "topic_prefix": f"{settings.topic_prefix}{run}.",
        "consumer_group": f"{settings.consumer_group}-{run}", "batch_max_messages": 200, "retry_max_ms": 1000,
        "publish_timeout_ms": 2000, "processor_metrics_port": 0,
    })
    await asyncio.to_thread(create_topics, own)
    events = [envelope(tenant, n) for n in range(1500)]
    await asyncio.to_thread(produce, own, events[:400])

    with running("processor", ["process"], own) as processor:
        db = await asyncpg.connect(own.database_url)
        try:
            await wait_for(lambda: _done(own, db, tenant, 400), 30, "the first part")

            # Hold the next batch in its PostgreSQL step, take the broker away, then let the batch go on.
            lock = await asyncpg.connect(own.database_url)
            try:
                tx = lock.transaction()
                await tx.start()
                await lock.execute("lock table event_keys in exclusive mode")
                await asyncio.to_thread(produce, own, events[400:1000] + events[:150] + events[400:450])
                await wait_for(lambda: _blocked(db), 30, "a batch to wait for the table lock")
                await asyncio.to_thread(scratch_kafka.stop)
                await tx.rollback()
            finally:
                await lock.close()
            await asyncio.to_thread(wait_until, lambda: "publish counters failed (attempt 2)" in processor.output(),
                                    30, 0.2, "the processor to retry the counter publication")
            # Longer than the session timeout: the group takes the partitions away while the batch is held.
            await asyncio.to_thread(wait_until, lambda: "lost [" in processor.output(), 30, 0.2,
                                    "the partitions to be lost")
            assert processor.alive(), processor.output()[-4000:]
            await asyncio.to_thread(scratch_kafka.start)

            await wait_for(lambda: _done(own, db, tenant, 1000), 45, "the batch held over the outage")
            await asyncio.to_thread(produce, own, events[1000:] + events[900:1000])
            await wait_for(lambda: _done(own, db, tenant, 1500), 30, "the events produced after the outage")

            assert await event_count(db, tenant) == 1500
            assert await counter_counts(db, tenant) == expected_counts(events)
            assert await assert_topic_matches_postgres(own, db, tenant) == len(expected_counts(events))
        finally:
            await db.close()
        assert processor.alive(), processor.output()[-4000:]
    assert read_topic(own.kafka_bootstrap, own.topics.dlq) == []


async def _done(settings: Settings, db: asyncpg.Connection, tenant: str, events: int) -> bool:
    return await event_count(db, tenant) == events and await drained(settings, db)


async def _blocked(db: asyncpg.Connection) -> bool:
    return await db.fetchval(
        "select count(*) from pg_locks where not granted and relation = 'event_keys'::regclass") > 0
