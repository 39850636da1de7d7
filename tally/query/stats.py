"""Counts over time from counter windows, not from raw rows: the built-in `logs` meter (per service and
level, per minute and hour) and the default `events` meter (per type and subject, per hour and day).

A window is counted where its start lies in [start, end); the answer says which windows it summed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import asyncpg

from tally.edge.problems import Problem
from tally.query.filters import EventStatsQuery, LogStatsQuery
from tally.query.search import Where
from tally.schemas.envelope import LOG_EVENT_TYPE

_DIMENSIONS = {"service": "subject", "level": "grp->>'level'", "type": "grp->>'type'", "subject": "subject"}


async def log_stats(conn: asyncpg.Connection, tenant: str, query: LogStatsQuery,
                    max_points: int) -> list[dict[str, Any]]:
    where = Where(tenant)
    where.add("meter = 'logs' and window_name = {0}", query.step)
    if query.service is not None:
        where.add("subject = {0}", query.service)
    return await _series(conn, where, query.start, query.end, query.by.split(","), max_points)


async def event_stats(conn: asyncpg.Connection, tenant: str, query: EventStatsQuery,
                      max_points: int) -> list[dict[str, Any]]:
    where = Where(tenant)
    where.add("meter = 'events' and window_name = {0} and grp->>'type' <> {1}", query.step, LOG_EVENT_TYPE)
    if query.type is not None:
        where.add("grp->>'type' = {0}", query.type)
    if query.subject is not None:
        where.add("subject = {0}", query.subject)
    return await _series(conn, where, query.start, query.end, query.by.split(","), max_points)


async def _series(conn: asyncpg.Connection, where: Where, start: Any, end: Any, by: list[str],
                  max_points: int) -> list[dict[str, Any]]:
    """One series per combination of the `by` dimensions, each a list of (window start, count); at most
    `max_points` points in all, so an answer (kept in Redis) has a bounded size (security review M4)."""
    where.add("window_start >= {0} and window_start < {1}", start, end)
    columns = ", ".join(f"{_DIMENSIONS[name]} as {name}" for name in by)
    positions = ", ".join(str(n) for n in range(1, len(by) + 2))
    rows = await conn.fetch(
        f"select {columns}, window_start, sum(value)::bigint as count from counters where {where.sql()}"
        f" group by {positions} order by {positions} limit {max_points + 1}", *where.args)
    if len(rows) > max_points:
        raise Problem(400, "Query too broad", f"the answer would have more than {max_points} points; narrow it with a"
                      " filter, a shorter range, a coarser step or fewer dimensions",
                      errors=[{"field": "by", "message": f"more than {max_points} points"}])
    series: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        series[tuple(row[name] for name in by)].append({"start": row["window_start"], "count": row["count"]})
    return [{**dict(zip(by, key)), "points": points, "total": sum(p["count"] for p in points)}
            for key, points in series.items()]
