"""`python -m benchmarks.logs_seed`: the database the log-read benchmarks query, 10 million log records,
made once and reused (a finished seed leaves a row in `bench_logs_seed`; a run finding it is done in seconds).

Rows are what the processor writes for log records (tally/sinks/postgres.py): an `events` row of type
tally.log in its monthly partition, its `event_keys` claim, and the built-in `logs` meter's minute and
hour windows, here derived in SQL from the stored rows so that the stats endpoint reads counters exactly
as in production. Indexes on `events` are dropped for the load and rebuilt from their own definitions
after it (faster than growing them row by row, and a little more compact than grown ones); then the
tables are vacuumed and analysed, as autovacuum would have done by the time anyone searches them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from benchmarks import log_records
from tally.schemas.counters import CounterKey
from tally.sinks.migrations import migrate
from tally.settings import Settings

DATABASE = "tally_bench_logs"
TENANT = "bench"
ROWS = 10_000_000
SPAN = timedelta(days=7)
CHUNK = 500_000
VERSION = 2  # bumped when the generator changes: a seed of another version is made again

_COLUMNS = "tenant, source, id, type, subject, time, received_at, persisted_at, data, kafka_partition, kafka_offset"
_INSERT = f"""
insert into events ({_COLUMNS})
select $16, 'logs/' || svc, id, 'tally.log', svc, t, received_at,
       received_at + make_interval(secs => 0.02 + (n % 200) / 1000.0), data, abs(hashtext($16 || '/' || svc)) % 4, n
from ({log_records.ROWS}) as made
"""
# The processor's claim of each key; the digest has the sink's shape (16 bytes of the content), from md5
# because PostgreSQL has no blake2b. Inserted in key order, so the primary key grows at its right edge.
_KEYS = """
insert into event_keys (tenant, source, id, first_seen, digest, kafka_partition, kafka_offset)
select tenant, source, id, persisted_at,
       decode(md5(concat_ws('|', type, subject, time, data::text)), 'hex'),
       kafka_partition, kafka_offset
from events where tenant = $1 order by tenant, source, id
"""
# The logs meter (meters.definitions.LOGS_METER): COUNT per tenant, service and level, minute and hour windows,
# keyed by CounterKey.to_text(); the session runs in UTC, so date_trunc gives the UTC windows. Inserted in
# time order, as the processor creates windows while time passes, so one hour's windows share pages.
_WINDOWS = """
insert into counters (key, tenant, meter, aggregation, window_name, window_start, window_end, subject, grp, value,
                      count, latest_time, total)
select format('[%s,"logs",%s,%s,%s,{{"level":%s}}]', to_json(tenant)::text, to_json($1::text)::text,
              to_json(to_char(start, 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'))::text, to_json(subject)::text,
              to_json(level)::text),
       tenant, 'logs', 'COUNT', $1, start, start + $2::interval, subject, jsonb_build_object('level', level),
       n, n, latest, n
from ({source}) as w
order by start, subject, level
"""
_MINUTES = _WINDOWS.format(source="""
    select tenant, subject, data->>'level' as level, date_trunc('minute', time) as start, count(*) as n,
           max(time) as latest
    from events where tenant = $3 and type = 'tally.log' group by 1, 2, 3, 4""")
_HOURS = _WINDOWS.format(source="""
    select tenant, subject, grp->>'level' as level, date_trunc('hour', window_start) as start, sum(count) as n,
           max(latest_time) as latest
    from counters where tenant = $3 and meter = 'logs' and window_name = 'minute' group by 1, 2, 3, 4""")


@dataclass(frozen=True)
class Seeded:
    """A finished seed: where it is, how many records, the time range they span, how long it took."""

    url: str
    rows: int
    since: datetime
    until: datetime
    seconds: float


def database_url(base: Settings) -> str:
    return urlunsplit(urlsplit(base.database_url)._replace(path=f"/{DATABASE}"))


async def found(base: Settings, rows: int = ROWS) -> Seeded | None:
    """The finished seed of this size and version, if there is one (its schema brought up to date)."""
    conn = await asyncpg.connect(base.database_url)
    try:
        exists = await conn.fetchval("select 1 from pg_database where datname = $1", DATABASE)
    finally:
        await conn.close()
    if not exists:
        return None
    url = database_url(base)
    await migrate(url, base.migrations_dir)
    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("select to_regclass('bench_logs_seed')") is None:
            return None
        row = await conn.fetchrow("select rows, since, until, seconds from bench_logs_seed where version = $1",
                                  VERSION)
    finally:
        await conn.close()
    return Seeded(url, row["rows"], row["since"], row["until"], row["seconds"]) if row and row["rows"] == rows else None


async def ensure(base: Settings, rows: int = ROWS) -> Seeded:
    """The seed, reused when finished, else made from scratch (a half-made one is dropped first)."""
    seeded = await found(base, rows)
    if seeded is not None:
        say(f"reusing {DATABASE}: {seeded.rows:,} log records from {seeded.since:%Y-%m-%d %H:%M} to "
            f"{seeded.until:%Y-%m-%d %H:%M} UTC (seeded in {seeded.seconds:.0f} s)")
        return seeded
    return await seed(base, rows)


async def seed(base: Settings, rows: int) -> Seeded:
    began = time.monotonic()
    conn = await asyncpg.connect(base.database_url)
    try:
        await conn.execute(f'drop database if exists "{DATABASE}" with (force)')
        await conn.execute(f'create database "{DATABASE}"')
    finally:
        await conn.close()
    url = database_url(base)
    await migrate(url, base.migrations_dir)
    until = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    since = until - SPAN
    conn = await asyncpg.connect(url, command_timeout=None)
    try:
        await conn.execute("set timezone = 'UTC'; set maintenance_work_mem = '512MB'; set work_mem = '256MB'")
        await conn.execute("select tally_ensure_event_partition(m::date) from generate_series("
                           "date_trunc('month', $1::timestamptz), $2::timestamptz, '1 month') as m", since, until)
        indexes = await conn.fetch("select indexname, replace(indexdef, ' ON ONLY ', ' ON ') as indexdef"
                                   " from pg_indexes where tablename = 'events'")
        for index in indexes:
            await conn.execute(f'drop index "{index["indexname"]}"')
        say(f"seeding {DATABASE}: {rows:,} log records over {SPAN.days} days, {len(indexes)} indexes rebuilt after")
        loading = time.monotonic()
        for first in range(0, rows, CHUNK):
            last = min(first + CHUNK, rows) - 1
            await conn.execute(_INSERT, *log_records.arguments(first, last, rows, until, SPAN), TENANT)
            done, spent = last + 1, time.monotonic() - loading
            say(f"  {done:,} of {rows:,} records ({done / spent:,.0f}/s, about {(rows - done) * spent / done:.0f} s"
                " of loading left)")
        await step(conn, "event_keys (the dedup claims)", _KEYS, TENANT)
        await step(conn, "logs meter, minute windows", _MINUTES, "minute", timedelta(minutes=1), TENANT)
        await step(conn, "logs meter, hour windows", _HOURS, "hour", timedelta(hours=1), TENANT)
        for index in indexes:
            await step(conn, f"index {index['indexname']}", index["indexdef"])
        await step(conn, "vacuum and analyse", "vacuum (analyze) events, event_keys, counters")
        await check(conn, rows)
        seconds = time.monotonic() - began
        await conn.execute("create table bench_logs_seed (version int primary key, rows bigint not null,"
                           " since timestamptz not null, until timestamptz not null, seconds float8 not null)")
        await conn.execute("insert into bench_logs_seed values ($1, $2, $3, $4, $5)", VERSION, rows, since, until,
                           seconds)
    finally:
        await conn.close()
    say(f"seeded {DATABASE} in {seconds:.0f} s")
    return Seeded(url, rows, since, until, seconds)


async def step(conn: asyncpg.Connection, what: str, sql: str, *args: object) -> None:
    """One statement of a minute or more, said when it starts and when it is done."""
    say(f"  {what} ...")
    began = time.monotonic()
    status = await conn.execute(sql, *args)
    say(f"  {what}: {status.lower()} in {time.monotonic() - began:.0f} s")


async def check(conn: asyncpg.Connection, rows: int) -> None:
    """Every record stored, claimed and counted once per window kind, under the key the processor gives it."""
    counts = [await conn.fetchval(sql) for sql in (
        "select count(*) from events", "select count(*) from event_keys",
        "select sum(count) from counters where window_name = 'minute'",
        "select sum(count) from counters where window_name = 'hour'")]
    if counts != [rows] * 4:
        raise RuntimeError(f"the seed is not whole: events, keys, minute and hour counts are {counts}, not {rows}")
    invalid = await conn.fetchval("select count(*) from pg_index where not indisvalid")
    if invalid:
        raise RuntimeError(f"{invalid} indexes are not valid")
    row = await conn.fetchrow("select * from counters limit 1")
    key = CounterKey(row["tenant"], row["meter"], row["window_name"], row["window_start"], row["subject"],
                     (("level", orjson.loads(row["grp"])["level"]),))
    if key.to_text() != row["key"]:
        raise RuntimeError(f"counter key {row['key']} is not the processor's {key.to_text()}")


def say(text: str) -> None:
    print(f"[logs-seed {time.strftime('%H:%M:%S')}] {text}", flush=True)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.logs_seed", description=__doc__)
    parser.add_argument("--rows", type=int, default=ROWS)
    args = parser.parse_args(argv)
    await ensure(Settings(), args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
