"""The counter outbox relay: publish committed counter windows, then forget them.

A relay locks queued keys (skip locked, so relays never wait on each other), publishes the
counters' current committed state, waits for the acks and deletes the keys in the same
transaction. A writer queuing a key a relay holds waits for it, so states of one window reach
the topic in commit order, and a crash anywhere leaves the keys queued for the next relay.
"""

from __future__ import annotations

import asyncpg
import orjson

from schemas.counters import EncodedState, encode_state
from sinks.counter_topic import CounterTopicSink

_PENDING = """
select c.key, c.tenant, c.meter, c.aggregation, c.window_name, c.window_start, c.window_end, c.subject,
       c.grp::text as grp, c.value::text as value, c.count, c.revision, c.updated_at,
       c.total::text as total, c.level::text as level, c.integrated_until, c.sample_level
from counter_outbox o join counters c on c.key = o.key
order by o.key
limit $1
for update of o skip locked
"""


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, topic: CounterTopicSink, limit: int = 20000) -> None:
        self._pool = pool
        self._topic = topic
        self._limit = limit

    async def publish_once(self) -> list[EncodedState]:
        """Publish up to `limit` queued windows; returns their states (empty when nothing was free)."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_PENDING, self._limit)
            if not rows:
                return []
            states = [_state(r) for r in rows]
            await self._topic.write(states)
            await self._topic.flush()
            await conn.execute("delete from counter_outbox where key = any($1::text[])", [s.key for s in states])
        return states

    async def publish_all(self) -> list[EncodedState]:
        published: list[EncodedState] = []
        while True:
            states = await self.publish_once()
            published.extend(states)
            if len(states) < self._limit:
                return published


def _state(row: asyncpg.Record) -> EncodedState:
    (key, tenant, meter, aggregation, window, start, end, subject, grp, value, count, revision, updated_at,
     total, level, integrated_until, sample_level) = row
    return encode_state(key, tenant, meter, aggregation, window, start, end, subject, orjson.loads(grp), value, count,
                        revision, updated_at, total, level, integrated_until,
                        None if sample_level is None else sample_level > 0)
