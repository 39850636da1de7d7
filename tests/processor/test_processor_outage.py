"""PostgreSQL stopped for a while under load: nothing dead-lettered, the backlog completes when it returns."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from tally.settings import Settings
from tests.processor.helpers import (
    assert_topic_matches_postgres, counter_counts, drained, envelope, event_count, expected_counts, produce, wait_for,
)
from tests.processor.scratch_pg import ScratchPostgres
from tests.support import read_topic, running, wait_until


async def test_postgres_outage_under_load_is_waited_out_without_dead_letters(
    isolated: Settings, scratch_pg: ScratchPostgres
) -> None:
    tenant = f"outage-{uuid.uuid4().hex[:8]}"
    settings = _outage_settings(isolated, scratch_pg)
    events = [envelope(tenant, n) for n in range(1500)]
    produce(settings, events[:500])

    with running("processor", ["process"], settings) as processor:
        await _stop_after_first_events(scratch_pg, tenant)
        produce(settings, events[500:] + events[:300])
        await asyncio.to_thread(wait_until, lambda: "failed (attempt 3)" in processor.output(), 30, 0.2,
                                "the processor to retry")
        assert processor.alive()
        await asyncio.to_thread(scratch_pg.start)

        db = await asyncpg.connect(scratch_pg.url)
        try:
            await wait_for(lambda: drained(settings, db), 90, "the backlog to complete")
            assert await event_count(db, tenant) == 1500
            assert await counter_counts(db, tenant) == expected_counts(events)
            assert await assert_topic_matches_postgres(settings, db, tenant) == len(expected_counts(events))
        finally:
            await db.close()
    assert read_topic(settings.kafka_bootstrap, settings.topics.dlq) == []


def _outage_settings(isolated: Settings, scratch_pg: ScratchPostgres) -> Settings:
    """Small batches and short backoff, so the outage lands mid-stream and retries show quickly."""
    return isolated.model_copy(update={
        "database_url": scratch_pg.url, "batch_max_messages": 200, "retry_max_ms": 1000, "processor_metrics_port": 0,
    })


async def _stop_after_first_events(scratch_pg: ScratchPostgres, tenant: str) -> None:
    db = await asyncpg.connect(scratch_pg.url)
    try:
        await wait_for(lambda: _some(db, tenant), 30, "the first events")
    finally:
        await db.close()
    await asyncio.to_thread(scratch_pg.stop)


async def _some(db: asyncpg.Connection, tenant: str) -> bool:
    return await event_count(db, tenant) > 0


async def test_sigterm_while_postgres_is_down_exits_cleanly_and_loses_nothing(
    isolated: Settings, scratch_pg: ScratchPostgres
) -> None:
    """A processor stuck retrying must still stop on request, commit nothing it did not persist, and leave
    the batch for the next run."""
    tenant = f"term-{uuid.uuid4().hex[:8]}"
    settings = _outage_settings(isolated, scratch_pg)
    events = [envelope(tenant, n) for n in range(600)]
    produce(settings, events[:200])

    with running("processor", ["process"], settings) as processor:
        await _stop_after_first_events(scratch_pg, tenant)
        produce(settings, events[200:])
        await asyncio.to_thread(wait_until, lambda: "failed (attempt 2)" in processor.output(), 30, 0.2,
                                "the processor to retry")
        code = await asyncio.to_thread(processor.stop, 20)
        output = processor.output()
    assert code == 0, output[-3000:]
    assert "processor closed" in output
    assert "never retrieved" not in output  # no task died unseen on the way out

    await asyncio.to_thread(scratch_pg.start)
    with running("processor", ["process"], settings):
        db = await asyncpg.connect(scratch_pg.url)
        try:
            await wait_for(lambda: drained(settings, db), 90, "the backlog to complete")
            assert await event_count(db, tenant) == 600
            assert await counter_counts(db, tenant) == expected_counts(events)
            assert await assert_topic_matches_postgres(settings, db, tenant) == len(expected_counts(events))
        finally:
            await db.close()
    assert read_topic(settings.kafka_bootstrap, settings.topics.dlq) == []
