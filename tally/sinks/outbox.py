"""The counter outbox relay: publish committed counter windows, then forget what was published.

Queued keys fall into 256 buckets by hash. A relay takes a transaction-level advisory lock per
bucket as it meets the bucket's keys (try, skip the taken: relays never wait on each other, writers
never take them, and a round holds at most 256 locks however many windows it publishes), then reads
the counters in a statement of its own, so under READ COMMITTED it sees every update committed before
it held the keys. It publishes those states, waits for the acks and deletes each key's queue entry
only up to the revision it published: an update committed meanwhile re-queued the key with a higher
revision, which stays for the next relay. One relay at a time publishes a key, each reading a state
no older than the last one published, so the topic's latest state per key ends equal to PostgreSQL.
No row is locked while the relay waits for Kafka; a crash anywhere leaves the keys queued
(docs/adr/0016).
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import orjson

from tally.schemas.counters import EncodedState, encode_state
from tally.sinks.counter_topic import CounterTopicSink

# Advisory lock class of the relay's bucket locks (the two-integer key space does not meet the
# one-bigint locks the migrations and partition upkeep take).
_RELAY_LOCK_CLASS = 0x7A12
_BUCKETS = 256

# Keys in the order of the outbox's key, (tenant, key), whose bucket this transaction holds or could take now: the
# key's index is read in order and the bucket locks tried only until `limit` keys are found.
_CLAIM = """
select tenant, key from counter_outbox
where pg_try_advisory_xact_lock($2, hashtext(key) & ($3 - 1))
order by tenant, key
limit $1
"""

# The columns `state_of` reads, in its order: what the relay publishes, and what a reader that recovers
# counter states from PostgreSQL rather than the topic selects.
STATE_COLUMNS = """key, tenant, meter, aggregation, window_name, window_start, window_end, subject, grp::text as grp,
       value::text as value, count, revision, updated_at,
       total::text as total, level::text as level, integrated_until, sample_level"""

_COUNTERS = f"""
select {STATE_COLUMNS} from counters join unnest($1::text[], $2::text[]) as u(tenant, key) using (tenant, key)
order by key
"""

# Queue windows at the revisions their writers committed, in key order (the writers' lock order). An entry's
# revision only rises, so a relay that published an older state meanwhile keeps the newer entry (_FORGET).
_QUEUE = """
insert into counter_outbox (tenant, key, revision)
select * from unnest($1::text[], $2::text[], $3::bigint[]) as q(tenant, key, revision) order by key
on conflict (tenant, key) do update set revision = greatest(counter_outbox.revision, excluded.revision), queued_at = now()
"""

# Queue entries counted for the backlog gauge, up to a cap: past it the figure changes no decision, and a count of
# a huge queue would read all of it every few seconds.
BACKLOG_CAP = 100_000
_BACKLOG = "select count(*) from (select 1 from counter_outbox limit $1) queued"
_ANY = "select exists (select 1 from counter_outbox)"

_EVERY_REVISION = 2**63 - 1  # for a queued key whose counter row is gone: forget the entry whatever its revision

_FORGET = """
delete from counter_outbox o
using unnest($1::text[], $2::text[], $3::bigint[]) as p(tenant, key, revision)
where o.tenant = p.tenant and o.key = p.key and o.revision <= p.revision
"""


async def queue(conn: asyncpg.Connection, revisions: dict[tuple[str, str], int]) -> None:
    """Queue these windows ((tenant, key) -> revision) for publication at the revisions just written, in the
    writer's transaction."""
    if revisions:
        keys = sorted(revisions, key=lambda tk: tk[1])
        await conn.execute(_QUEUE, [t for t, _ in keys], [k for _, k in keys], [revisions[tk] for tk in keys])


async def pending(pool: asyncpg.Pool) -> bool:
    """Whether any window is queued: one row read, so a job can look on every run."""
    return await pool.fetchval(_ANY)


async def backlog(pool: asyncpg.Pool) -> int:
    """Windows queued and not yet published (up to BACKLOG_CAP)."""
    return await pool.fetchval(_BACKLOG, BACKLOG_CAP)


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, topic: CounterTopicSink, limit: int = 20000,
                 on_published: Callable[[], None] = lambda: None) -> None:
        self._pool = pool
        self._topic = topic
        self._limit = limit
        self._on_published = on_published  # a test hook: states acked, their keys not yet forgotten

    async def publish_once(self) -> list[EncodedState]:
        """Publish up to `limit` queued windows; returns their states (empty when nothing was free)."""
        async with self._pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetch(_CLAIM, self._limit, _RELAY_LOCK_CLASS, _BUCKETS)
            if not claimed:
                return []
            tenants, keys = [row[0] for row in claimed], [row[1] for row in claimed]
            rows = await conn.fetch(_COUNTERS, tenants, keys)
            states = [state_of(r) for r in rows]
            await self._topic.write(states)
            await self._topic.flush()
            self._on_published()
            published = {s.key: s.revision for s in states}
            await conn.execute(_FORGET, tenants, keys, [published.get(k, _EVERY_REVISION) for k in keys])
        return states

    async def publish_all(self) -> list[EncodedState]:
        published: list[EncodedState] = []
        while True:
            states = await self.publish_once()
            published.extend(states)
            if len(states) < self._limit:
                return published


def state_of(row: asyncpg.Record) -> EncodedState:
    """A row of STATE_COLUMNS as the counter topic carries it."""
    (key, tenant, meter, aggregation, window, start, end, subject, grp, value, count, revision, updated_at,
     total, level, integrated_until, sample_level) = row
    return encode_state(key, tenant, meter, aggregation, window, start, end, subject, orjson.loads(grp), value, count,
                        revision, updated_at, total, level, integrated_until,
                        None if sample_level is None else sample_level > 0)
