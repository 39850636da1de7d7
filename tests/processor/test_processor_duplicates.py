"""A duplicate storm: the same events many times, within a batch, across batches and across restarts."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import redis

from tally.schemas.counters import CounterState
from tally.sinks.redis_cache import cache_key
from tally.settings import Settings
from tests.processor.helpers import (
    assert_topic_matches_postgres, counter_counts, drained, envelope, event_count, expected_counts, produce, wait_for,
)
from tests.support import free_port, running


async def test_each_event_is_persisted_and_counted_once_through_a_duplicate_storm(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"storm-{uuid.uuid4().hex[:8]}"
    events = [envelope(tenant, n) for n in range(400)]
    settings = isolated.model_copy(update={"batch_max_messages": 300})
    # Every event three times in a row (same batch), then the whole set again (later batches).
    produce(settings, [e for e in events for _ in range(3)] + events)

    with running("processor", ["process"], settings, TALLY_PROCESSOR_METRICS_PORT="0"):
        await wait_for(lambda: drained(settings, db), 60, "the first processor to drain the topic")
        assert await event_count(db, tenant) == 400

    # After a restart the producer retries everything once more, and a subset twice.
    produce(settings, events + events[:100] + events[:100])
    with running("processor", ["process"], settings, TALLY_PROCESSOR_METRICS_PORT="0") as processor:
        await wait_for(lambda: drained(settings, db), 60, "the restarted processor to drain the topic")
        assert processor.alive()

    assert await event_count(db, tenant) == 400
    assert await db.fetchval("select count(*) from event_keys where tenant = $1", tenant) == 400
    assert await counter_counts(db, tenant) == expected_counts(events)
    assert await assert_topic_matches_postgres(settings, db, tenant) == len(expected_counts(events))

    cache = redis.Redis.from_url(settings.redis_url)
    try:
        rows = await db.fetch("select key, value::text as value, revision from counters where tenant = $1", tenant)
        for row in rows:
            cached = CounterState.from_bytes(cache.hget(cache_key(settings.redis_prefix, row["key"]), "state"))
            assert (cached.value, cached.revision) == (row["value"], row["revision"])
    finally:
        cache.close()


async def test_redis_down_never_stops_the_pipeline_and_late_events_are_stored_not_counted(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"noredis-{uuid.uuid4().hex[:8]}"
    settings = isolated.model_copy(update={
        "redis_url": f"redis://127.0.0.1:{free_port()}/0", "late_horizon_s": 4 * 3600, "processor_metrics_port": 0,
    })
    on_time = [envelope(tenant, n) for n in range(200)]
    late = [envelope(tenant, 1000 + n, time_=datetime.now(timezone.utc) - timedelta(hours=5)) for n in range(7)]
    produce(settings, on_time + late)

    with running("processor", ["process"], settings) as processor:
        await wait_for(lambda: drained(settings, db), 60, "the processor to drain the topic without Redis")
        assert "redis cache skipped" in processor.output()

    assert await event_count(db, tenant) == 207
    assert await db.fetchval("select count(*) from events where tenant = $1 and not counted", tenant) == 7
    assert await counter_counts(db, tenant) == expected_counts(on_time)
