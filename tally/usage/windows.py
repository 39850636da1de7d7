"""Hour windows of a subject's meters, read from the Redis counter cache or from PostgreSQL.

Both give the same figures: the cache holds the states the processor committed, published and then
cached. Windows older than the cache keeps them (`redis_counter_ttl_s` after their end) are read from
PostgreSQL either way, and a Redis failure falls back to PostgreSQL. Only ungrouped meters are
billable (a plan's meter has one window per hour and subject; docs/adr/0041).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import orjson
import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from tally.schemas.counters import CounterKey
from tally.sinks.redis_cache import cache_key
from tally.usage.periods import hours

log = logging.getLogger("tally.usage")

HOUR = "hour"
_MARGIN = timedelta(minutes=5)
# The cached state of each window in one round trip and one reply (a pipeline of HGETs cost ~50 us each
# in the client); false where the cache holds none.
_STATES = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGET', key, 'state') or false
end
return out
"""


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
                        start: datetime, end: datetime, counters: Mapping[str, str] | None = None) -> Windows:
    """Per meter; `counters` names the counters a meter is read under (its readable version's, `Catalog.counters`),
    by default the meter's own name."""
    named = {(counters or {}).get(m, m): m for m in meters}
    out: Windows = {m: {} for m in meters}
    if start >= end:
        return out
    for r in await pool.fetch(_SELECT, tenant, subject, list(named), start, end):
        out[named[r["meter"]]][r["window_start"]] = HourWindow(r["window_start"], r["aggregation"], r["value"],
                                                               r["updated_at"])
    return out


class WindowReader:
    """Hour windows of a period, read in three parts:

    - *settled* windows (ended more than `settle_s`, the late-event horizon plus an hour, ago) change
      only by a reconciliation fix: they are read from PostgreSQL, folded per bucket (the period, or
      each local day for history) and kept in memory for `settled_ttl_s`, and only while the caller's
      `ended` mark (the subject's count of changes to ended windows, `tally.usage.changes`) is the same;
    - *recent* windows from Redis, or from PostgreSQL where the cache may have dropped them or Redis
      fails;
    - none beyond the next hour: the gateway refuses events further ahead, so no window exists there.
    """

    def __init__(self, pool: asyncpg.Pool, client: redis.Redis | None, prefix: str, cache_ttl_s: int,
                 settle_s: int = 86400 + 3600, settled_ttl_s: float = 60.0, settled_max: int = 10_000) -> None:
        self._pool = pool
        self._client = client
        self._prefix = prefix
        self._cache_ttl = timedelta(seconds=cache_ttl_s)
        self._settle = timedelta(seconds=settle_s)
        self._settled_ttl_s = settled_ttl_s
        self._settled_max = settled_max
        self._settled: dict[tuple, tuple[float, bytes, Windows]] = {}
        self._states: AsyncScript | None = None
        self._key_lists: dict[tuple, tuple[list[tuple[str, datetime]], list[str]]] = {}
        self.source = "postgres"  # where the last read's recent windows came from, for tests and logs

    async def read(self, tenant: str, subject: str, meters: list[str], start: datetime, end: datetime,
                   now: datetime | None = None, buckets: list[tuple[datetime, datetime]] | None = None,
                   ended: bytes = b"", counters: Mapping[str, str] | None = None) -> Windows:
        """The period's windows per meter; settled ones come folded into one window per bucket. `counters` as
        for `from_postgres`."""
        if counters:
            named = {m: counters.get(m, m) for m in meters}
            found = await self.read(tenant, subject, list(named.values()), start, end, now, buckets, ended)
            return {m: found[c] for m, c in named.items()}
        now = now or datetime.now(timezone.utc)
        upto = max(start, min(end, hour_start(now) + timedelta(hours=2)))
        settled_until = max(start, min(upto, hour_start(now - self._settle)))
        settled = await self._settled_part(tenant, subject, meters, start, settled_until, buckets or [(start, end)],
                                           ended)
        recent = await self._recent(tenant, subject, meters, settled_until, upto, now)
        return {m: {**settled[m], **recent[m]} for m in meters}

    async def _settled_part(self, tenant: str, subject: str, meters: list[str], start: datetime, until: datetime,
                            buckets: list[tuple[datetime, datetime]], ended: bytes) -> Windows:
        key = (tenant, subject, tuple(meters), start, until, tuple(buckets))
        hit = self._settled.get(key)
        if hit is not None and hit[0] > time.monotonic() and hit[1] == ended:
            return hit[2]
        windows = await from_postgres(self._pool, tenant, subject, meters, start, until)
        folded: Windows = {m: {} for m in meters}
        for m in meters:
            for lo, hi in buckets:
                inside = [w for at, w in windows[m].items() if lo <= at < hi]
                if inside:
                    at = max(lo, start)
                    folded[m][at] = HourWindow(at, inside[0].aggregation, combine(inside),
                                               max(w.updated_at for w in inside))
        if len(self._settled) >= self._settled_max:
            self._settled.clear()
        self._settled[key] = (time.monotonic() + self._settled_ttl_s * random.uniform(0.5, 1.0), ended, folded)
        return folded

    async def _recent(self, tenant: str, subject: str, meters: list[str], start: datetime, end: datetime,
                      now: datetime) -> Windows:
        # Hour windows ending before this instant may have left the cache already.
        cached_from = max(start, min(end, hour_start(now - self._cache_ttl + _MARGIN)))
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
        if self._states is None:
            self._states = self._client.register_script(_STATES)
        wanted, keys = self._keys(tenant, subject, tuple(meters), start, end)
        out: Windows = {m: {} for m in meters}
        for (m, at), raw in zip(wanted, await self._states(keys=keys) if keys else []):
            if raw:
                state = orjson.loads(raw)
                out[m][at] = HourWindow(at, state["aggregation"], Decimal(state["value"]),
                                        datetime.fromisoformat(state["updated_at"]))
        return out


    def _keys(self, tenant: str, subject: str, meters: tuple[str, ...], start: datetime,
              end: datetime) -> tuple[list[tuple[str, datetime]], list[str]]:
        """The windows wanted and their cache keys, memoised: they change once an hour per subject."""
        found = self._key_lists.get((tenant, subject, meters, start, end))
        if found is None:
            wanted = [(m, at) for m in meters for at in hours(start, end)]
            keys = [cache_key(self._prefix, CounterKey(tenant, m, HOUR, at, subject, ()).to_text())
                    for m, at in wanted]
            if len(self._key_lists) >= self._settled_max:
                self._key_lists.clear()
            found = self._key_lists[(tenant, subject, meters, start, end)] = (wanted, keys)
        return found


def hour_start(at: datetime) -> datetime:
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
