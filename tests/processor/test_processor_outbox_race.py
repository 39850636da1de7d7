"""Two members write the same windows (a meter that is not per subject) while relays publish them:
afterwards the counter topic's latest state equals PostgreSQL for every window. A relay that locked a
queued window and published an older state of it, then deleted the newer queue entry, fails this."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime, timezone

import asyncpg

from tally.meters.definitions import load_meters
from tally.meters.meterset import MeterSet
from tally.schemas.envelope import Envelope
from tally.sinks.base import Record
from tally.sinks.counter_topic import CounterTopicSink
from tally.sinks.kafka import KafkaPublisher
from tally.sinks.outbox import OutboxRelay
from tally.sinks.postgres import PostgresSink
from tally.settings import Settings
from tests.processor.helpers import assert_topic_matches_postgres

METERS = """
meters:
  - {slug: shared, event_type: "*", aggregation: SUM, value_path: data.v, group_by: {g: data.g},
     per_subject: false, windows: [day]}
"""
GROUPS = 400
ROUNDS = 150
PER_ROUND = 40  # each commit is the last update of some windows, so a stale publication of it stays
# Queue entries that sort after the race's windows and have no counter row: every relay statement reads
# them, which widens the moment between its snapshot and its row locks to what a relay with a big outbox
# sees, but there is nothing to publish for them.
BACKLOG = 300000
_BACKLOG = """
insert into counter_outbox (tenant, key)
select '~backlog-' || $1, format('["~backlog-%s",%s]', $1::text, n) from generate_series(1, $2) n
"""


def _records(tenant: str, member: int, round_: int, rng: random.Random) -> list[Record]:
    now = datetime.now(timezone.utc)
    return [Record(Envelope(id=f"{member}-{round_}-{g}", source="race", type="usage", subject=f"s{member}", time=now,
                            received_at=now, data={"g": g, "v": 1}, tenant=tenant), member, round_ * GROUPS + g)
            for g in sorted(rng.sample(range(GROUPS), PER_ROUND))]


async def test_the_topic_ends_equal_to_postgres_with_members_and_relays_racing_on_shared_windows(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"race-{uuid.uuid4().hex[:8]}"
    meters = MeterSet(load_meters(inline=METERS))
    pool = await asyncpg.create_pool(isolated.database_url, min_size=2, max_size=6)
    publishers = [KafkaPublisher(isolated.kafka_bootstrap) for _ in range(2)]
    relays = [OutboxRelay(pool, CounterTopicSink(p, isolated.topics.counters), limit=GROUPS + 1) for p in publishers]
    writing = True

    async def member(n: int) -> None:
        sink = PostgresSink(pool, meters.aggregate)
        rng = random.Random(n)
        for round_ in range(ROUNDS):
            await sink.write(_records(tenant, n, round_, rng))
            await sink.flush()

    async def relay(r: OutboxRelay) -> None:
        while writing:
            await r.publish_all()

    await db.execute(_BACKLOG, tenant, BACKLOG)
    try:
        relay_tasks = [asyncio.create_task(relay(r)) for r in relays]
        await asyncio.gather(member(0), member(1))
        writing = False
        await asyncio.gather(*relay_tasks)
        await db.execute("delete from counter_outbox where key like $1", f'["~backlog-{tenant}"%')
        await relays[0].publish_all()
        assert await db.fetchval("select count(*) from counter_outbox") == 0
        total = await db.fetchval("select sum(value) from counters where tenant = $1", tenant)
        assert total == 2 * ROUNDS * PER_ROUND
        assert await assert_topic_matches_postgres(isolated, db, tenant, "shared") == GROUPS
    finally:
        for p in publishers:
            p.close()
        await pool.close()


async def test_one_relay_round_publishes_more_windows_than_the_lock_table_holds(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    """PostgreSQL's shared lock table holds max_locks_per_transaction × max_connections entries (6,400 by
    default): a relay round must not take a lock per window."""
    tenant = f"wide-{uuid.uuid4().hex[:8]}"
    windows = 25000
    await db.execute("""
        with made as (
            insert into counters (key, tenant, meter, aggregation, window_name, window_start, window_end, value, count,
                                  latest_time)
            select format('["%s",%s]', $1::text, n), $1, 'm', 'COUNT', 'day', now(), now(), 1, 1, now()
            from generate_series(1, $2) n
            returning tenant, key, revision
        )
        insert into counter_outbox (tenant, key, revision) select tenant, key, revision from made""", tenant, windows)
    pool = await asyncpg.create_pool(isolated.database_url, min_size=1, max_size=1)
    publisher = KafkaPublisher(isolated.kafka_bootstrap)
    try:
        states = await OutboxRelay(pool, CounterTopicSink(publisher, isolated.topics.counters)).publish_all()
        assert len([s for s in states if tenant in s.key]) == windows
        assert await db.fetchval("select count(*) from counter_outbox where key like $1", f'["{tenant}"%') == 0
    finally:
        publisher.close()
        await pool.close()
