"""UNIQUE_COUNT: each window's value grows by the values new to it, claimed in `counter_distinct`.

Runs under the window's lock (processors/stateful.py): reads the window's sample level and size, claims
the new values' hashes (those below the level's threshold), and if the sample outgrew the meter's
`max_distinct`, raises the level until it fits (docs/adr/0030). The delta carries the absolute value.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import asyncpg

from processors.meters import MeterSet, StatefulInput
from schemas.counters import CounterDelta, CounterKey
from schemas.meters import Meter
from sinks.distinct import CLAIM, DROP_ABOVE, STATES, threshold, value_hash, window_id


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
            key = CounterKey(i.tenant, i.meter.slug, name.value, start, i.subject, i.group)
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
    stored = {r["key"]: (r["value"], r["sample_level"] or 0) for r in await conn.fetch(STATES, list(found))}
    ids: list[bytes] = []
    hashes: list[int] = []
    for text, w in found.items():
        wid = window_id(text)
        keep = threshold(stored.get(text, (0, 0))[1])
        for h in w.hashes:
            if h < keep:
                ids.append(wid)
                hashes.append(h)
    claimed = Counter(r[0] for r in await conn.fetch(CLAIM, ids, hashes)) if ids else Counter()
    out = []
    for text, w in found.items():
        value, level = stored.get(text, (0, 0))
        wid = window_id(text)
        size = (int(value) >> level) + claimed[wid]
        while size > w.meter.max_distinct:
            level += 1
            size -= int((await conn.execute(DROP_ABOVE, wid, threshold(level))).split()[-1])
        out.append((text, CounterDelta(w.key, w.end, w.meter.aggregation, Decimal(size << level),
                                       w.events, w.latest, sample_level=level)))
    return out
