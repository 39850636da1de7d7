"""UNIQUE_COUNT and WEIGHTED_SUM: deltas computed against what is stored, inside the writing transaction.

Their window value is not a fold of the new events alone (a value is new to a window or not; a level
change re-integrates its neighbours), so each transaction first takes a transaction-scoped advisory
lock per UNIQUE_COUNT window and per WEIGHTED_SUM series, all in one statement in lock-id order (so
writers never deadlock on them), then reads the committed state, and its deltas set absolute values.
Two members sharing a window take turns; the second sees what the first committed.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from tally.meters import unique, weighted
from tally.meters.live import LiveMeters
from tally.meters.meterset import MeterSet
from tally.schemas.counters import Aggregation, CounterDelta
from tally.sinks.base import Record

_LOCK = """
select pg_advisory_xact_lock(id)
from (select distinct hashtextextended(k, 0) as id from unnest($1::text[]) as k order by id) as ids
"""


async def apply(meters: MeterSet | LiveMeters, conn: asyncpg.Connection, records: Sequence[Record]) -> list[tuple[str, CounterDelta]]:
    inputs = meters.stateful_inputs(records)
    if not inputs:
        return []
    compiled = meters.base if isinstance(meters, LiveMeters) else meters  # whose window bounds are memoised
    distinct = unique.windows(compiled, [i for i in inputs if i.meter.aggregation is Aggregation.UNIQUE_COUNT])
    series = weighted.series(compiled, [i for i in inputs if i.meter.aggregation is Aggregation.WEIGHTED_SUM])
    await conn.execute(_LOCK, [*distinct, *series])
    return [*await unique.apply(conn, distinct), *await weighted.apply(conn, compiled, series)]
