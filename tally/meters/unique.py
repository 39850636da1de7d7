"""UNIQUE_COUNT: the distinct values of each counter window, and distinct values over any period.

Each window keeps the 63-bit hashes of its distinct values in `counter_distinct`, claimed with
`on conflict do nothing` in the transaction that counts the events, so the window's value grows by
exactly the values that were new to it. `apply` runs under the window's lock (meters.stateful): it reads
the window's sample level and size and claims the new values' hashes (those below the level's
threshold). Past the meter's `max_distinct` a window keeps a sample: the hashes below 2^(63 - level),
the level rising by one (and halving the sample) until it fits; the value is then sample × 2^level and
published as approximate (docs/adr/0030). The delta carries the absolute value.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from tally.meters.definitions import Meter, Window
from tally.meters.meterset import MeterSet, StatefulInput
from tally.schemas.counters import CounterDelta, CounterKey

_CLAIM = """
insert into counter_distinct (tenant, window_id, hash)
select t, w, h from unnest($1::text[], $2::bytea[], $3::bigint[]) as u(t, w, h)
order by t, w, h
on conflict do nothing
returning window_id
"""

_STATES = """
select key, value, sample_level from counters join unnest($1::text[], $2::text[]) as u(tenant, key) using (tenant, key)
"""

_DROP_ABOVE = "delete from counter_distinct where tenant = $1 and window_id = $2 and hash >= $3"


def window_id(key_text: str) -> bytes:
    """The id of a counter window in counter_distinct (the same as SQL's `tally_window_id`, migration 0088)."""
    return hashlib.sha256(key_text.encode()).digest()[:16]


def value_hash(raw: Any) -> int:
    """A distinct value's 63-bit hash, over its canonical JSON (so "1" and 1 are different values)."""
    canonical = orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)
    return int.from_bytes(hashlib.blake2b(canonical, digest_size=8).digest(), "big") >> 1


def threshold(level: int) -> int:
    """A window at sampling `level` keeps the hashes below this."""
    return 1 << (63 - level)


@dataclass
class Pending:
    """A counter window's share of the new events: their value hashes, how many, the latest time."""

    meter: Meter
    key: CounterKey
    end: datetime
    latest: datetime
    events: int = 0
    hashes: set[int] = field(default_factory=set)


def windows(meters: MeterSet, inputs: list[StatefulInput]) -> dict[str, Pending]:
    """The new events' value hashes per counter window, keyed by the window's key text."""
    out: dict[str, Pending] = {}
    for i in inputs:
        h = value_hash(i.value)
        at = i.event.time
        for name in i.meter.windows:
            start, end = meters.window(name, at)
            key = CounterKey(i.tenant, i.meter.counter, name.value, start, i.subject, i.group)
            text = key.to_text()
            w = out.get(text)
            if w is None:
                w = out[text] = Pending(i.meter, key, end, at)
            w.events += 1
            w.latest = max(w.latest, at)
            w.hashes.add(h)
    return out


async def apply(conn: asyncpg.Connection, found: dict[str, Pending]) -> list[tuple[str, CounterDelta]]:
    if not found:
        return []
    stored = {r["key"]: (r["value"], r["sample_level"] or 0)
              for r in await conn.fetch(_STATES, [w.key.tenant for w in found.values()], list(found))}
    tenants: list[str] = []
    ids: list[bytes] = []
    hashes: list[int] = []
    for text, w in found.items():
        wid = window_id(text)
        keep = threshold(stored.get(text, (0, 0))[1])
        for h in w.hashes:
            if h < keep:
                tenants.append(w.key.tenant)
                ids.append(wid)
                hashes.append(h)
    claimed = Counter(r[0] for r in await conn.fetch(_CLAIM, tenants, ids, hashes)) if ids else Counter()
    out = []
    for text, w in found.items():
        value, level = stored.get(text, (0, 0))
        wid = window_id(text)
        size = (int(value) >> level) + claimed[wid]
        while size > w.meter.max_distinct:
            level += 1
            size -= int((await conn.execute(_DROP_ABOVE, w.key.tenant, wid, threshold(level))).split()[-1])
        out.append((text, CounterDelta(w.key, w.end, w.meter.aggregation, Decimal(size << level),
                                       w.events, w.latest, sample_level=level)))
    return out


@dataclass(frozen=True)
class DistinctCount:
    value: int
    approximate: bool


_WINDOWS = """
select key, window_start, window_end, coalesce(sample_level, 0) as sample_level from counters
where tenant = $1 and meter = $2 and window_name = $3 and subject is not distinct from $4 and grp = $5::jsonb
  and window_start < $7 and window_end > $6
"""

_COUNT = """
select count(distinct hash) from counter_distinct
where tenant = $3
  and window_id = any(select tally_window_id(k) from unnest($1::text[]) k)
  and hash <= $2
"""


async def unique_count_over(conn: asyncpg.Connection, tenant: str, meter: str, subject: str | None,
                            group: dict[str, Any], start: datetime, end: datetime) -> DistinctCount:
    """Distinct values of a UNIQUE_COUNT meter over [start, end), from its finest windows' stored values.

    Exact unless a window in the period was sampled; then the windows are merged at the highest level
    among them (every window keeps at least the hashes below that level's threshold) and the figure is
    approximate. The period must be made of whole finest windows (a billing period of days, say).
    """
    names = {r[0] for r in await conn.fetch(
        "select distinct window_name from counters where tenant = $1 and meter = $2", tenant, meter)}
    finest = next((w.value for w in Window if w.value in names), None)
    if finest is None:
        return DistinctCount(0, False)
    rows = await conn.fetch(_WINDOWS, tenant, meter, finest, subject, orjson.dumps(group).decode(), start, end)
    straddling = [r["key"] for r in rows if r["window_start"] < start or r["window_end"] > end]
    if straddling:
        raise ValueError(f"[{start}, {end}) cuts {finest} windows of meter {meter}; give whole windows")
    level = max((r["sample_level"] for r in rows), default=0)
    n = await conn.fetchval(_COUNT, [r["key"] for r in rows], threshold(level) - 1, tenant)
    return DistinctCount(n << level, level > 0)
