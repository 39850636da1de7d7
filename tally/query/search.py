"""Event and log search: one tenant's rows, filtered, in pages by keyset over (time, source, id).

Logs are events of type `tally.log` (ADR 0035): the filters read the columns and `data` fields that
partial indexes cover, so a page costs an index range scan, never a scan of the range. Message words
are matched on the newest rows first and through the full-text index only for rare words (ADR 0036):
the index alone cannot keep to the time range and fetches every match the partition holds.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from tally.query.cursor import Position
from tally.query.filters import EventQuery, LogQuery, Page
from tally.schemas.envelope import LOG_EVENT_TYPE

_COLUMNS = "source, id, type, subject, time, received_at, data::text as data"
_WORDS = "to_tsvector('simple', data->>'message') @@ plainto_tsquery('simple', {0})"
# A word search reads this many rows of the range in page order first, twice as many at each step after;
# once fewer than one row in RARE matches, the rest of the range is searched through the full-text index.
FIRST_SCAN = 5000
RARE = 600
# The steps together read at most this many rows (5,000 + 10,000 + ... + 80,000); past it the rest of the range
# is searched through the full-text index, scoped by tenant, so one search's work is bounded (security review H4).
MAX_SCAN = 155_000


class Where:
    """A WHERE clause built one condition at a time, with its positional arguments."""

    def __init__(self, tenant: str) -> None:
        self.args: list[Any] = [tenant]
        self.terms = ["tenant = $1"]
        self.words: str | None = None  # message words: page() chooses how to match them

    def plus(self, term: str, *values: Any) -> "Where":
        """A copy with one more condition."""
        other = Where(self.args[0])
        other.args, other.terms, other.words = list(self.args), list(self.terms), self.words
        other.add(term, *values)
        return other

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
    where.words = query.q
    return where


def event_filters(tenant: str, query: EventQuery) -> Where:
    """Events other than log records: those are read with `logs:read` (security review M1, ADR 0080)."""
    where = Where(tenant)
    where.add("type <> {0}", LOG_EVENT_TYPE)
    for column in ("type", "subject", "source"):
        value = getattr(query, column)
        if value is not None:
            where.add(f"{column} = {{0}}", value)
    return where


async def page(conn: asyncpg.Connection, where: Where, query: Page, after: Position | None) -> list[asyncpg.Record]:
    """Up to `limit + 1` rows from the cursor on: one more than a page tells whether another follows."""
    where.add("time >= {0} and time < {1}", query.start, query.end)
    if where.words is None:
        return await _rows(conn, where, query, after, query.limit + 1)
    return await _with_words(conn, where, query, after)


def _from(where: Where, query: Page, after: Position | None) -> Where:
    if after is None:
        return where
    return where.plus(f"(time, source, id) {'<' if query.order == 'desc' else '>'} ({{0}}, {{1}}, {{2}})", *after)


def _order(query: Page) -> str:
    return ", ".join(f"{column} {query.order}" for column in ("time", "source", "id"))


async def _rows(conn: asyncpg.Connection, where: Where, query: Page, after: Position | None,
                limit: int) -> list[asyncpg.Record]:
    where = _from(where, query, after)
    return await conn.fetch(f"select {_COLUMNS} from events where {where.sql()} order by {_order(query)} limit {limit}",
                            *where.args)


async def _with_words(conn: asyncpg.Connection, where: Where, query: Page,
                      after: Position | None) -> list[asyncpg.Record]:
    """Rows whose message has the words, read in page order (newest first by default) in growing steps while
    they match often enough; below one in RARE, the rest through the full-text index, whose cost grows with
    the matches it holds (rare words are few there), not with the rows read."""
    wanted, scan, order = query.limit + 1, FIRST_SCAN, _order(query)
    read = 0
    found: list[asyncpg.Record] = []
    while True:
        step = _from(where, query, after)
        # The step's matching rows, and its last row (`edge`) to go on from; no edge: the range ends here.
        rows = await conn.fetch(
            f"select * from (select {_COLUMNS}, {_WORDS.format(f'${len(step.args) + 1}')} as matched,"
            f" row_number() over (order by {order}) = {scan} as edge"
            f" from (select * from events where {step.sql()} order by {order} limit {scan}) as next_rows) as scanned"
            f" where matched or edge order by {order}", *step.args, where.words)
        matched = [row for row in rows if row["matched"]]
        found += matched[:wanted - len(found)]
        edge = next((row for row in rows if row["edge"]), None)
        if len(found) == wanted or edge is None:
            return found
        after = (edge["time"], edge["source"], edge["id"])
        read += scan
        if len(matched) * RARE < scan or read + 2 * scan > MAX_SCAN:
            return found + await _rows(conn, where.plus(_WORDS, where.words), query, after, wanted - len(found))
        scan *= 2


def log_record(row: asyncpg.Record) -> dict[str, Any]:
    data = orjson.loads(row["data"]) if row["data"] else {}
    return {"id": row["id"], "time": row["time"], "service": row["subject"], "level": data.get("level"),
            "message": data.get("message"), "attributes": data.get("attributes", {}),
            **{k: data[k] for k in ("trace_id", "span_id") if k in data}}


def event_record(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "source": row["source"], "type": row["type"], "subject": row["subject"],
            "time": row["time"], "received_at": row["received_at"],
            "data": orjson.loads(row["data"]) if row["data"] else None}
