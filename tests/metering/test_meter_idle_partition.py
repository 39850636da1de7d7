"""A partition that no new event reaches after a meter version is made gets no start from the processor; the
backfill records the version's start there itself, at the partition's end offset (docs/adr/0151), then completes
with exact counters, and events arriving on that partition later are counted live exactly once."""

from __future__ import annotations

import zlib

import asyncpg
from confluent_kafka import Producer

from tally.schemas.envelope import Envelope
from tally.settings import Settings
from tally.sinks.kafka import high_watermarks
from tests.metering.helpers import run_tally
from tests.metering.meters_helpers import (DEFINITIONS, backfilled, counters_of, events_for, expected_windows,
                                           meter_test, new_version)
from tests.processor.helpers import drained, wait_for
from tests.support import running


def _partition(settings: Settings, e: Envelope) -> int:
    return zlib.crc32(e.key()) % settings.events_partitions


def _produce(settings: Settings, events: list[Envelope]) -> None:
    """Each event to its subject's partition, named explicitly: the test decides which partitions get events."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for e in events:
        producer.produce(settings.topics.events, e.to_bytes(), e.key(), partition=_partition(settings, e))
    assert producer.flush(30) == 0


async def _exact(db: asyncpg.Connection, tenant: str) -> None:
    rows = await db.fetch("select type, subject, time, data::text as data, kafka_partition, kafka_offset from events"
                          " where tenant = $1", tenant)
    for slug in DEFINITIONS:
        assert await counters_of(db, tenant, slug) == expected_windows(rows, slug), slug


async def test_a_partition_without_new_events_gets_its_start_from_the_backfill_at_its_end_offset(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings, a, base, now = meter_test(isolated)
    before, after, later = events_for(a, base, now, 120, 0), events_for(a, base, now, 120, 120), \
        events_for(a, base, now, 120, 240)
    idle = _partition(settings, before[0])
    with running("processor", ["process"], settings):
        _produce(settings, before)  # every partition of the tenant's subjects, the idle one included
        await wait_for(lambda: drained(settings, db), 90, "the processor")
        ids = [await new_version(db, a, slug, 1, DEFINITIONS[slug]) for slug in DEFINITIONS]
        busy = [e for e in after if _partition(settings, e) != idle]
        used = {_partition(settings, e) for e in busy}
        assert busy and len(busy) < len(after)
        _produce(settings, busy)  # the version's starts come from the processor on the partitions of `busy` alone
        await wait_for(lambda: drained(settings, db), 90, "the processor")
        await wait_for(lambda: _started(db, a, ids, len(used)), 60, "the processor's starts")
        ends = high_watermarks(settings.kafka_bootstrap, settings.topics.events)
        assert ends[idle] > 0

        await backfilled(settings, db, a, ids)
        starts = await db.fetch("select version_id, kafka_partition, start_offset from meter_starts where tenant = $1"
                                " and kafka_partition <> all($2::int[])", a, list(used))
        assert {(r[0], r[1]): r[2] for r in starts} == {(i, p): ends[p] for i in ids for p in set(ends) - used}
        await _exact(db, a)

        # The formerly idle partition gets events again: counted live, once.
        _produce(settings, later)
        await wait_for(lambda: drained(settings, db), 90, "the processor")
    assert await db.fetchval("select count(*) from events where tenant = $1 and kafka_partition = $2"
                             " and kafka_offset >= $3", a, idle, ends[idle]) > 0
    await _exact(db, a)
    code, out = run_tally(["meters", "status", "--tenant", a], settings)
    assert code == 0 and "waits" not in out, out


async def _started(db: asyncpg.Connection, tenant: str, ids: list[int], partitions: int) -> bool:
    n = await db.fetchval("select count(*) from meter_starts where tenant = $1 and version_id = any($2)", tenant, ids)
    return n == partitions * len(ids)
