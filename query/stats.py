"""Counts over time from counter windows, not from raw rows: the built-in `logs` meter (per service and
level, per minute and hour) and the default `events` meter (per type and subject, per hour and day).

A window is counted where its start lies in [start, end); the answer says which windows it summed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import asyncpg

from query.filters import EventStatsQuery, LogStatsQuery
from query.search import Where
from schemas.envelope import LOG_EVENT_TYPE

_DIMENSIONS = {"service": "subject", "level": "grp->>'level'", "type": "grp->>'type'", "subject": "subject"}


async def log_stats(conn: asyncpg.Connection, tenant: str, query: LogStatsQuery) -> list[dict[str, Any]]:
    where = Where(tenant)
    where.add("meter = 'logs' and window_name = {0}", query.step)
    if query.service is not None:
        where.add("subject = {0}", query.service)
    return await _series(conn, where, query.start, query.end, query.by.split(","))


async def event_stats(conn: asyncpg.Connection, tenant: str, query: EventStatsQuery) -> list[dict[str, Any]]:
    where = Where(tenant)
    where.add("meter = 'events' and window_name = {0} and grp->>'type' <> {1}", query.step, LOG_EVENT_TYPE)
    if query.type is not None:
        where.add("grp->>'type' = {0}", query.type)
    if query.subject is not None:
        where.add("subject = {0}", query.subject)
    return await _series(conn, where, query.start, query.end, query.by.split(","))


async def _series(conn: asyncpg.Connection, where: Where, start: Any, end: Any, by: list[str]) -> list[dict[str, Any]]:
    """One series per combination of the `by` dimensions, each a list of (window start, count)."""
    where.add("window_start >= {0} and window_start < {1}", start, end)
    columns = ", ".join(f"{_DIMENSIONS[name]} as {name}" for name in by)
    positions = ", ".join(str(n) for n in range(1, len(by) + 2))
    rows = await conn.fetch(
        f"select {columns}, window_start, sum(value)::bigint as count from counters where {where.sql()}"
        f" group by {positions} order by {positions}", *where.args)
    series: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        series[tuple(row[name] for name in by)].append({"start": row["window_start"], "count": row["count"]})
    return [{**dict(zip(by, key)), "points": points, "total": sum(p["count"] for p in points)}
            for key, points in series.items()]
