"""PostgreSQL's side: the COPY ceiling, clearing data between drains, and the exact-count checks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

import asyncpg
import orjson

from benchmarks.kafka_bench import TENANT


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


_KEEP = ("api_keys", "meter_catalog", "schema_migrations")  # meter_catalog: one row every process reads


async def tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("select tablename from pg_tables where schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def clear(url: str) -> None:
    """Empty every data table (events, dedup keys, counters, outbox ...) so the next drain starts clean."""
    async with connected(url) as conn:
        names = sorted(await tables(conn) - set(_KEEP))
        partitions = {r["c"] for r in await conn.fetch("select inhrelid::regclass::text as c from pg_inherits")}
        names = [n for n in names if n not in partitions]
        # One at a time: the server's lock table is shared with everything else on it. Cascade: tables that
        # refer to another (a plan's meters to its plan) are emptied with it.
        for name in names:
            await conn.execute(f"truncate {name} cascade")


def event_rows(run: str, count: int) -> list[tuple[object, ...]]:
    """The rows the processor writes for `count` distinct drained events, in the events table's columns."""
    now = datetime.now(timezone.utc)
    return [
        (TENANT, "bench/drain", f"{run}-{n}", "api.request", f"customer-{n % 500}", now, now,
         orjson.dumps({"tokens": 1 + n % 50, "model": "m-small", "region": "eu"}).decode(), n % 4, n)
        for n in range(count)
    ]


COLUMNS = ("tenant", "source", "id", "type", "subject", "time", "received_at", "data", "kafka_partition", "kafka_offset")


async def copy_ceiling(url: str, run: str, count: int) -> dict[str, float]:
    """COPY the same rows into a table shaped like events (same columns and indexes), in one transaction."""
    rows = event_rows(run, count)
    async with connected(url) as conn:
        await conn.execute("drop table if exists copy_ceiling")
        await conn.execute("create table copy_ceiling (like events including defaults including indexes)")
        start = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table("copy_ceiling", records=rows, columns=COLUMNS)
        seconds = time.perf_counter() - start
        await conn.execute("drop table copy_ceiling")
    return {"rows": count, "events_s": count / seconds, "seconds": seconds}


async def persisted(url: str) -> int:
    async with connected(url) as conn:
        return int(await conn.fetchval("select count(*) from event_keys"))


async def verify(url: str, distinct: int) -> dict[str, object]:
    """Every distinct accepted event persisted exactly once; counters, where they exist, equal to it."""
    async with connected(url) as conn:
        found = {
            "events": await conn.fetchval("select count(*) from events"),
            "distinct_events": await conn.fetchval("select count(*) from (select distinct tenant, source, id from events) d"),
            "event_keys": await conn.fetchval("select count(*) from event_keys"),
        }
        found.update(await counted_events(conn) or {})
    exact = all(v == distinct for v in found.values())
    return {"expected": distinct, **found, "exact": exact}


async def counted_events(conn: asyncpg.Connection) -> dict[str, int] | None:
    """Events held by the default `events` COUNT meter, per window kind (None while there are no counters)."""
    if "counters" not in await tables(conn):
        return None
    rows = await conn.fetch("select window_name, sum(count) as n from counters where meter = 'events'"
                            " group by window_name")
    return {f"counted_{r['window_name']}": int(r["n"]) for r in rows}


async def counting(url: str) -> bool:
    """Whether this schema keeps counters, so that the peer must keep them too."""
    async with connected(url) as conn:
        return "counters" in await tables(conn)


async def verify_quix(url: str, distinct: int) -> dict[str, object]:
    """The same checks on the tables of the Quix Streams peer, and one counter row per hour, subject and type."""
    async with connected(url) as conn:
        found = {
            "events": await conn.fetchval("select count(*) from quix_events"),
            "distinct_events": await conn.fetchval(
                "select count(*) from (select distinct tenant, source, id from quix_events) d"),
            "event_keys": await conn.fetchval("select count(*) from quix_event_keys"),
        }
        rows = await conn.fetch("select window_name, sum(value) as n from quix_counters group by window_name")
        found.update({f"counted_{r['window_name']}": int(r["n"]) for r in rows})
        # one counter row per hour, subject and type, as Tally's default meter keeps them
        windows = await conn.fetchval(
            "select count(*) from (select distinct tenant, date_trunc('hour', time at time zone 'UTC'),"
            " coalesce(subject, ''), type from quix_events) w")
        hourly = await conn.fetchval("select count(*) from quix_counters where window_name = 'hour'")
    exact = all(v == distinct for v in found.values()) and windows == hourly
    return {"expected": distinct, **found, "hour_subject_type_windows": windows, "hourly_counter_rows": hourly,
            "exact": exact}


async def e2e_latency(url: str, id_prefix: str) -> dict[str, object]:
    """From the gateway's receipt to the processor's commit, for the events whose id has this prefix:
    percentiles overall (ms) and p50/p99 per second of receipt."""
    latency = "extract(epoch from persisted_at - received_at) * 1000"
    async with connected(url) as conn:
        overall = await conn.fetchrow(
            f"select count(*) as n, percentile_cont(array[0.5, 0.95, 0.99]) within group (order by {latency}) as p,"
            f" max({latency}) as max from events where id like $1", f"{id_prefix}%")
        rows = await conn.fetch(
            f"select extract(epoch from date_trunc('second', received_at)) as t, count(*) as n,"
            f" percentile_cont(array[0.5, 0.99]) within group (order by {latency}) as p"
            f" from events where id like $1 group by 1 order by 1", f"{id_prefix}%")
    p = overall["p"] or [None, None, None]
    return {"events": overall["n"], "p50_ms": p[0], "p95_ms": p[1], "p99_ms": p[2], "max_ms": overall["max"],
            "series": [(float(r["t"]), r["n"], r["p"][0], r["p"][1]) for r in rows]}
