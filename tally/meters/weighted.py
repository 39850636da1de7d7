"""WEIGHTED_SUM: every level change of a series, and the integral of level × time over any span.

A series is a meter's (tenant, subject, group). Its level changes are kept in `weighted_points`, so a
late or out-of-order change re-integrates exactly the windows it affects, and re-delivery (a dedup
duplicate, never a new point) changes nothing. A change at t alters the level from t to the next change,
so `apply` (under the series' lock, meters.stateful) integrates again the windows holding a change
between the new changes' predecessor and successor, in each of the meter's windows. Integrals are exact
decimals in level × seconds; the value in the meter's unit is that divided by the unit, rounded to 18
decimal places; the deltas carry absolute values (docs/adr/0031).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Context, Decimal
from typing import Any

import asyncpg
import orjson

from tally.meters.definitions import Meter
from tally.meters.meterset import MeterSet, StatefulInput
from tally.schemas.counters import CounterDelta, CounterKey, Scalar, exact_seconds

# Levels are within 1e±100 (meters.meterset) and spans within years of microseconds: 250 digits hold
# every product and sum exactly.
_WIDE = Context(prec=250)
_PLACES = Decimal("1e-18")

_INSERT = """
insert into weighted_points (tenant, series, at, source, id, level)
select * from unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::numeric[])
order by 1, 2, 3, 4, 5
on conflict do nothing
"""

# Per series: the last level change before `lo` and the first after `hi`.
_NEIGHBOURS = """
select u.series,
       (select max(at) from weighted_points w where w.tenant = u.tenant and w.series = u.series and w.at < u.lo)
           as before,
       (select min(at) from weighted_points w where w.tenant = u.tenant and w.series = u.series and w.at > u.hi)
           as after
from unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[]) as u(tenant, series, lo, hi)
"""

# Per series: the level changes in [lo, hi), the last one before lo (the level entering) and the first
# at or after hi (which says the level is known up to hi).
_SPAN = """
select u.series, p.at, p.level
from unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[]) as u(tenant, series, lo, hi)
cross join lateral (
    (select at, source, id, level from weighted_points w
     where w.tenant = u.tenant and w.series = u.series and w.at < u.lo
     order by at desc, source desc, id desc limit 1)
    union all
    (select at, source, id, level from weighted_points w
     where w.tenant = u.tenant and w.series = u.series and w.at >= u.lo and w.at < u.hi)
    union all
    (select at, source, id, level from weighted_points w
     where w.tenant = u.tenant and w.series = u.series and w.at >= u.hi
     order by at, source, id limit 1)
    order by at, source, id
) p
"""


def series_text(tenant: str, meter: str, subject: str | None, group: dict[str, Any]) -> str:
    return orjson.dumps([tenant, meter, subject, group]).decode()


@dataclass(frozen=True)
class Integral:
    """level × seconds over [start, until), and the level from `until` on (None before the first change)."""

    level_seconds: Decimal
    level: Decimal | None
    until: datetime


def integrate(points: Sequence[tuple[datetime, Decimal]], start: datetime, end: datetime) -> Integral:
    """Integrate the level over [start, end) from level changes sorted by time (changes at one instant in
    their (source, id) order, the last holding). Before the first change the level is unknown and counts
    nothing; after the last it is known only up to that change, so `until` stops there."""
    level: Decimal | None = None
    cursor = start
    total = Decimal(0)
    for at, new_level in points:
        if at >= end:
            if level is not None:
                total = _WIDE.add(total, _WIDE.multiply(level, exact_seconds(end - cursor)))
            return Integral(total, level, end)
        if at > cursor:
            if level is not None:
                total = _WIDE.add(total, _WIDE.multiply(level, exact_seconds(at - cursor)))
            cursor = at
        level = new_level
    return Integral(total, level, cursor)


def in_unit(level_seconds: Decimal, unit_seconds: int) -> Decimal:
    """level × seconds in level × unit, rounded half-even to 18 decimal places, trailing zeros dropped."""
    value = _WIDE.divide(level_seconds, Decimal(unit_seconds)).quantize(_PLACES, context=_WIDE)
    return value.normalize(_WIDE).quantize(Decimal(1), context=_WIDE) if value == value.to_integral_value() \
        else value.normalize(_WIDE)


@dataclass
class Series:
    meter: Meter
    tenant: str
    subject: str | None
    group: tuple[tuple[str, Scalar], ...]
    new: list[tuple[datetime, str, str, Decimal]] = field(default_factory=list)  # at, source, id, level


def series(meters: MeterSet, inputs: list[StatefulInput]) -> dict[str, Series]:
    """The new level changes per series, keyed by the series text (also its lock name)."""
    out: dict[str, Series] = {}
    for i in inputs:
        text = series_text(i.tenant, i.meter.counter, i.subject, dict(i.group))
        s = out.get(text)
        if s is None:
            s = out[text] = Series(i.meter, i.tenant, i.subject, i.group)
        s.new.append((i.event.time, i.event.source, i.event.id, i.value))
    return out


async def apply(conn: asyncpg.Connection, meters: MeterSet, found: dict[str, Series]) -> list[tuple[str, CounterDelta]]:
    if not found:
        return []
    rows = [(s.tenant, text, at, source, id_, level) for text, s in found.items() for at, source, id_, level in s.new]
    await conn.execute(_INSERT, *map(list, zip(*rows)))
    texts = list(found)
    tenants = [found[t].tenant for t in texts]
    lows = [min(at for at, *_ in found[t].new) for t in texts]
    highs = [max(at for at, *_ in found[t].new) for t in texts]
    spans: dict[str, dict] = {}
    for row in await conn.fetch(_NEIGHBOURS, tenants, texts, lows, highs):
        s = found[row["series"]]
        lo = row["before"] or min(at for at, *_ in s.new)
        hi = row["after"] or max(at for at, *_ in s.new)
        spans[row["series"]] = {w: (meters.window(w, lo)[0], meters.window(w, hi)[1]) for w in s.meter.windows}
    starts = [min(lo for lo, _ in spans[t].values()) for t in texts]
    ends = [max(hi for _, hi in spans[t].values()) for t in texts]
    points: dict[str, list[tuple[datetime, Decimal]]] = defaultdict(list)
    for row in await conn.fetch(_SPAN, tenants, texts, starts, ends):
        points[row["series"]].append((row["at"], row["level"]))
    out = []
    for text in texts:
        out.extend(_windows(meters, found[text], spans[text], points[text]))
    return out


def _windows(meters: MeterSet, s: Series, spans: dict, points: list[tuple[datetime, Decimal]]
             ) -> list[tuple[str, CounterDelta]]:
    """The series' windows that hold a level change inside their span, integrated again from `points`."""
    out = []
    for window, (lo, hi) in spans.items():
        held: dict[tuple[datetime, datetime], datetime] = {}
        for at, _ in points:
            if lo <= at < hi:
                bounds = meters.window(window, at)
                held[bounds] = max(held.get(bounds, at), at)
        for (start, end), latest in held.items():
            integral = integrate(points, start, end)
            new = sum(1 for at, *_ in s.new if start <= at < end)
            key = CounterKey(s.tenant, s.meter.counter, window.value, start, s.subject, s.group)
            out.append((key.to_text(), CounterDelta(
                key, end, s.meter.aggregation, in_unit(integral.level_seconds, s.meter.unit.seconds), new, latest,
                total=integral.level_seconds, level=integral.level, integrated_until=integral.until)))
    return out


async def weighted_sum_over(conn: asyncpg.Connection, tenant: str, meter: str, subject: str | None,
                            group: dict[str, Any], start: datetime, end: datetime) -> Integral:
    """The exact integral of a WEIGHTED_SUM series over any [start, end), from its level changes."""
    series = series_text(tenant, meter, subject, group)
    rows = await conn.fetch(_SPAN, [tenant], [series], [start], [end])
    return integrate([(r["at"], r["level"]) for r in rows], start, end)
