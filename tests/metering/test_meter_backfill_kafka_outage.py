"""Kafka stopped while the jobs worker backfills new meter versions (ADR 0145, 0151): the job cannot read the
processors' committed offsets or the partitions' end offsets, so its runs fail; the worker stays alive, and once the
broker returns the backfill completes with counters equal to the stored events, none counted twice.

The test runs a broker of its own (tests.scratch_kafka), so stopping it leaves the shared one alone. The versions
are made while the broker is down, so every read of offsets the backfill makes for them meets the outage first (a
run is due each minute: the first fails at the next minute). Events produced once it is done are counted live.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from confluent_kafka import KafkaException

from tally.settings import Settings
from tally.topics import create_topics
from tests.metering.meters_helpers import (DEFINITIONS, counters_of, events_for, expected_windows, meter_test,
                                           new_version)
from tests.processor.helpers import assert_topic_matches_postgres, drained, produce, wait_for
from tests.scratch_kafka import ScratchKafka
from tests.support import running, wait_until


@pytest.mark.slow
async def test_a_backfill_waits_out_a_kafka_outage_and_counts_each_event_once(
        settings: Settings, db: asyncpg.Connection, scratch_kafka: ScratchKafka) -> None:
    run = uuid.uuid4().hex[:8]
    own, tenant, base, now = meter_test(settings.model_copy(update={
        "kafka_bootstrap": scratch_kafka.bootstrap, "topic_prefix": f"{settings.topic_prefix}{run}.",
        "consumer_group": f"{settings.consumer_group}-{run}", "jobs_tick_s": 1.0, "retry_max_ms": 1000,
        "publish_timeout_ms": 2000, "processor_metrics_port": 0,
    }))
    await asyncio.to_thread(create_topics, own)
    before, after = events_for(tenant, base, now, 150, 0), events_for(tenant, base, now, 150, 150)

    with running("processor", ["process"], own) as processor, running("jobs", ["jobs"], own) as jobs:
        await asyncio.to_thread(produce, own, before)
        await wait_for(lambda: _drained(own, db), 90, "the processor")
        await asyncio.to_thread(wait_until, lambda: "job meters_backfill for" in jobs.output(), 60, 0.2,
                                "the jobs worker's first backfill run")

        await asyncio.to_thread(scratch_kafka.stop)
        ids = [await new_version(db, tenant, slug, 1, DEFINITIONS[slug]) for slug in DEFINITIONS]
        await asyncio.to_thread(wait_until, lambda: _failed_runs(jobs.output()) >= 2 or not jobs.alive(), 90, 0.5,
                                "the backfill to fail on the missing broker twice")
        assert jobs.alive(), jobs.output()[-4000:]
        assert processor.alive(), processor.output()[-4000:]
        assert {r[0] for r in await db.fetch("select state from meter_backfills where tenant = $1", tenant)} == {
            "waiting"}
        assert await db.fetchval("select count(*) from meter_starts where tenant = $1", tenant) == 0

        await asyncio.to_thread(scratch_kafka.start)
        await wait_for(lambda: _done(db, tenant, ids), 120, "the backfill to complete after the outage")
        await asyncio.to_thread(produce, own, after + before[:40])  # counted live, and old ones again
        await wait_for(lambda: _drained(own, db), 90, "the processor")
        assert await assert_topic_matches_postgres(own, db, tenant, "calls") > 0
        assert jobs.alive(), jobs.output()[-4000:]
        assert processor.alive(), processor.output()[-4000:]

    rows = await db.fetch("select type, subject, time, data::text as data from events where tenant = $1", tenant)
    assert len(rows) == len(before) + len(after)
    for slug in DEFINITIONS:
        assert await counters_of(db, tenant, slug) == expected_windows(rows, slug), slug
    counted = await db.fetchval("select sum(counted) from meter_backfills where tenant = $1", tenant)
    below = await db.fetchval(
        "select count(*) from meter_starts s join meter_versions v on v.id = s.version_id join events e on"
        " e.tenant = s.tenant and e.type = v.definition->>'event_type' and e.kafka_partition = s.kafka_partition"
        " and e.kafka_offset < s.start_offset where s.tenant = $1", tenant)
    assert counted == below  # each version read its events below its starts once; the rest were counted live


async def _drained(settings: Settings, db: asyncpg.Connection) -> bool:
    """As tests.processor.helpers.drained, false while the broker, new or back, has no group coordinator yet."""
    try:
        return await drained(settings, db)
    except KafkaException:
        return False


def _failed_runs(output: str) -> int:
    return sum("job meters_backfill for" in line and ": failed" in line for line in output.splitlines())


async def _done(db: asyncpg.Connection, tenant: str, ids: list[int]) -> bool:
    states = await db.fetch("select state from meter_backfills where tenant = $1 and version_id = any($2)", tenant, ids)
    return len(states) == len(ids) and all(r[0] == "done" for r in states)
