"""Hour windows of a subject's meters, read from the Redis counter cache or from PostgreSQL.

Both give the same figures: the cache holds the states the processor committed, published and then
cached. Windows older than the cache keeps them (`redis_counter_ttl_s` after their end) are read from
PostgreSQL either way, and any Redis failure falls back to PostgreSQL for the whole read. Only
ungrouped meters are billable (a plan's meter has one window per hour and subject; docs/adr/0041).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError

from schemas.counters import CounterKey
from sinks.redis_cache import cache_key
from usage.periods import hours

log = logging.getLogger("tally.usage")

HOUR = "hour"
_MARGIN = timedelta(minutes=5)


@dataclass(frozen=True)
class HourWindow:
    start: datetime
    aggregation: str
    value: Decimal
    updated_at: datetime


Windows = dict[str, dict[datetime, HourWindow]]  # meter -> hour start -> window

_SELECT = """
select meter, window_start, aggregation, value, updated_at from counters
where tenant = $1 and subject = $2 and meter = any($3::text[]) and window_name = 'hour' and grp = '{}'::jsonb
  and window_start >= $4 and window_start < $5
"""


async def from_postgres(pool: asyncpg.Pool | asyncpg.Connection, tenant: str, subject: str, meters: list[str],
                        start: datetime, end: datetime) -> Windows:
    out: Windows = {m: {} for m in meters}
    if start >= end:
        return out
    for r in await pool.fetch(_SELECT, tenant, subject, meters, start, end):
        out[r["meter"]][r["window_start"]] = HourWindow(r["window_start"], r["aggregation"], r["value"],
                                                        r["updated_at"])
    return out


class WindowReader:
    """Redis first for the windows it still caches, PostgreSQL for older ones and whenever Redis fails."""

    def __init__(self, pool: asyncpg.Pool, client: redis.Redis | None, prefix: str, cache_ttl_s: int) -> None:
        self._pool = pool
        self._client = client
        self._prefix = prefix
        self._cache_ttl = timedelta(seconds=cache_ttl_s)
        self.source = "postgres"  # where the last read came from, for tests and logs

    async def read(self, tenant: str, subject: str, meters: list[str], start: datetime, end: datetime,
                   now: datetime | None = None) -> Windows:
        now = now or datetime.now(timezone.utc)
        # Hour windows ending before this instant may have left the cache already.
        cached_from = max(start, min(end, _hour(now - self._cache_ttl + _MARGIN)))
        if self._client is None or cached_from >= end:
            self.source = "postgres"
            return await from_postgres(self._pool, tenant, subject, meters, start, end)
        try:
            recent = await self._from_redis(tenant, subject, meters, cached_from, end)
        except (RedisError, OSError) as exc:
            log.warning("usage read falls back to PostgreSQL: %s", exc)
            self.source = "postgres"
            return await from_postgres(self._pool, tenant, subject, meters, start, end)
        older = await from_postgres(self._pool, tenant, subject, meters, start, cached_from)
        self.source = "redis"
        return {m: {**older[m], **recent[m]} for m in meters}

    async def _from_redis(self, tenant: str, subject: str, meters: list[str], start: datetime,
                          end: datetime) -> Windows:
        assert self._client is not None
        starts = hours(start, end)
        wanted = [(m, at) for m in meters for at in starts]
        pipe = self._client.pipeline(transaction=False)
        for m, at in wanted:
            pipe.hget(cache_key(self._prefix, CounterKey(tenant, m, HOUR, at, subject, ()).to_text()), "state")
        out: Windows = {m: {} for m in meters}
        for (m, at), raw in zip(wanted, await pipe.execute()):
            if raw is not None:
                state = orjson.loads(raw)
                out[m][at] = HourWindow(at, state["aggregation"], Decimal(state["value"]),
                                        datetime.fromisoformat(state["updated_at"]))
        return out


def _hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def combine(windows: list[HourWindow]) -> Decimal:
    """A meter's value over several hour windows: exact for COUNT and SUM (the sum), MAX and MIN."""
    if not windows:
        return Decimal(0)
    aggregation = windows[0].aggregation
    values = [w.value for w in windows]
    if aggregation == "MAX":
        return max(values)
    if aggregation == "MIN":
        return min(values)
    if aggregation == "LATEST":
        return max(windows, key=lambda w: w.start).value
    return sum(values, Decimal(0))
