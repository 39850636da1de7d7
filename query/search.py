"""Event and log search: one tenant's rows, filtered, in pages by keyset over (time, source, id).

Logs are events of type `tally.log` (ADR 0035): the filters read the columns and `data` fields that
partial indexes cover, and message words use a full-text index, so a page costs an index range
scan, never a scan of the range.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from query.cursor import Position
from query.filters import EventQuery, LogQuery, Page
from schemas.envelope import LOG_EVENT_TYPE


class Where:
    """A WHERE clause built one condition at a time, with its positional arguments."""

    def __init__(self, tenant: str) -> None:
        self.args: list[Any] = [tenant]
        self.terms = ["tenant = $1"]

    def add(self, term: str, *values: Any) -> None:
        """`term` names its arguments as {0}, {1}, ... in the order given."""
        first = len(self.args) + 1
        self.args.extend(values)
        self.terms.append(term.format(*(f"${first + n}" for n in range(len(values)))))

    def sql(self) -> str:
        return " and ".join(self.terms)


def log_filters(tenant: str, query: LogQuery) -> Where:
    where = Where(tenant)
    where.add("type = {0}", LOG_EVENT_TYPE)
    if query.service is not None:
        where.add("subject = {0}", query.service)
    if query.level is not None:
        where.add("data->>'level' = any({0}::text[])", query.level.and_above())
    if query.trace_id is not None:
        where.add("data->>'trace_id' = {0}", query.trace_id.lower())
    if query.q is not None:
        where.add("to_tsvector('simple', data->>'message') @@ plainto_tsquery('simple', {0})", query.q)
    return where


def event_filters(tenant: str, query: EventQuery) -> Where:
    where = Where(tenant)
    for column in ("type", "subject", "source"):
        value = getattr(query, column)
        if value is not None:
            where.add(f"{column} = {{0}}", value)
    return where


async def page(conn: asyncpg.Connection, where: Where, query: Page, after: Position | None) -> list[asyncpg.Record]:
    """Up to `limit + 1` rows from the cursor on: one more than a page tells whether another follows."""
    where.add("time >= {0} and time < {1}", query.start, query.end)
    descending = query.order == "desc"
    if after is not None:
        where.add(f"(time, source, id) {'<' if descending else '>'} ({{0}}, {{1}}, {{2}})", *after)
    direction = "desc" if descending else "asc"
    return await conn.fetch(
        f"select source, id, type, subject, time, received_at, data::text as data from events where {where.sql()}"
        f" order by time {direction}, source {direction}, id {direction} limit {query.limit + 1}", *where.args)


def log_record(row: asyncpg.Record) -> dict[str, Any]:
    data = orjson.loads(row["data"]) if row["data"] else {}
    return {"id": row["id"], "time": row["time"], "service": row["subject"], "level": data.get("level"),
            "message": data.get("message"), "attributes": data.get("attributes", {}),
            **{k: data[k] for k in ("trace_id", "span_id") if k in data}}


def event_record(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "source": row["source"], "type": row["type"], "subject": row["subject"],
            "time": row["time"], "received_at": row["received_at"],
            "data": orjson.loads(row["data"]) if row["data"] else None}
