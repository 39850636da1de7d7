"""WEIGHTED_SUM: store each level change, then re-integrate every window whose integral it changes.

A change at t alters the level from t to the next change, so the windows to integrate again are those
holding a change between the new changes' predecessor and successor, in each of the meter's windows.
Runs under the series' lock (processors/stateful.py); the deltas carry absolute values (docs/adr/0031).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import asyncpg

from processors.meters import MeterSet, StatefulInput
from schemas.counters import CounterDelta, CounterKey, Scalar
from schemas.meters import Meter
from sinks.weighted import INSERT, NEIGHBOURS, SPAN, in_unit, integrate, series_text


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
        text = series_text(i.tenant, i.meter.slug, i.subject, dict(i.group))
        s = out.get(text)
        if s is None:
            s = out[text] = Series(i.meter, i.tenant, i.subject, i.group)
        s.new.append((i.event.time, i.event.source, i.event.id, i.value))
    return out


async def apply(conn: asyncpg.Connection, meters: MeterSet, found: dict[str, Series]) -> list[tuple[str, CounterDelta]]:
    if not found:
        return []
    rows = [(text, at, source, id_, level) for text, s in found.items() for at, source, id_, level in s.new]
    await conn.execute(INSERT, *map(list, zip(*rows)))
    texts = list(found)
    lows = [min(at for at, *_ in found[t].new) for t in texts]
    highs = [max(at for at, *_ in found[t].new) for t in texts]
    spans: dict[str, dict] = {}
    for row in await conn.fetch(NEIGHBOURS, texts, lows, highs):
        s = found[row["series"]]
        lo = row["before"] or min(at for at, *_ in s.new)
        hi = row["after"] or max(at for at, *_ in s.new)
        spans[row["series"]] = {w: (meters.window(w, lo)[0], meters.window(w, hi)[1]) for w in s.meter.windows}
    starts = [min(lo for lo, _ in spans[t].values()) for t in texts]
    ends = [max(hi for _, hi in spans[t].values()) for t in texts]
    points: dict[str, list[tuple[datetime, Decimal]]] = defaultdict(list)
    for row in await conn.fetch(SPAN, texts, starts, ends):
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
            key = CounterKey(s.tenant, s.meter.slug, window.value, start, s.subject, s.group)
            out.append((key.to_text(), CounterDelta(
                key, end, s.meter.aggregation, in_unit(integral.level_seconds, s.meter.unit.seconds), new, latest,
                total=integral.level_seconds, level=integral.level, integrated_until=integral.until)))
    return out
