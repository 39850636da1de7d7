"""What the log benchmarks need beside the seed: a reading key, log records on a topic as the gateway
publishes them, the read indexes to drop and restore for the intake drain without them, and what each of
them costs an insert alone (`python -m benchmarks.logs_bench`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from statistics import median

import asyncpg
import orjson

from benchmarks import log_records
from benchmarks.cpu import process_seconds
from benchmarks.kafka_bench import TENANT, Loaded, Message, load
from benchmarks.stack import OUT, Bench
from tally.ingest import auth
from tally.ingest.publish import headers
from tally.schemas.envelope import LOG_EVENT_TYPE, encode, message_key
from tally.settings import ROOT, Settings

# The migrations that added indexes for reading logs (docs/adr/0035); without them is the intake before them.
# 0080 replaced 0035's full-text index with one scoped by tenant: left out, that index stayed in both drains.
READ_MIGRATIONS = ("0035_log_reads.sql", "0036_log_service_keyset.sql", "0080_log_words_by_tenant.sql")
_INDEX = re.compile(r"(create|drop) index (\w+)", re.I)


def read_indexes() -> list[str]:
    """The indexes those migrations leave in place (a later one may replace an earlier one's)."""
    names: list[str] = []
    for name in READ_MIGRATIONS:
        for verb, index in _INDEX.findall((ROOT / "deploy" / "migrations" / name).read_text()):
            names = [*names, index] if verb.lower() == "create" else [n for n in names if n != index]
    return names


async def reader_key(url: str) -> str:
    """A fresh key of the seed's tenant with `logs:read`; earlier runs' keys are removed."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("delete from api_keys where name = 'bench-logs-reader'")
        _, secret = await auth.create_key(conn, TENANT, "bench-logs-reader", ["logs:read"])
    finally:
        await conn.close()
    return secret


async def drop_read_indexes(url: str, only: Sequence[str] = ()) -> list[str]:
    """Drop the read indexes (or only these of them); returns their definitions, to build them again with."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("select indexname, replace(indexdef, ' ON ONLY ', ' ON ') as indexdef from pg_indexes"
                                " where tablename = 'events' and indexname = any($1::text[])", only or read_indexes())
        for row in rows:
            await conn.execute(f'drop index "{row["indexname"]}"')
    finally:
        await conn.close()
    return [row["indexdef"] for row in rows]


async def create_indexes(url: str, definitions: list[str]) -> None:
    conn = await asyncpg.connect(url)
    try:
        for definition in definitions:
            await conn.execute(definition)
    finally:
        await conn.close()


async def records(url: str, count: int) -> list[asyncpg.Record]:
    """`count` records of the seed's kind, over the last ten minutes (inside the late-event horizon, so counted)."""
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(log_records.ROWS, *log_records.arguments(
            0, count - 1, count, datetime.now(timezone.utc), timedelta(minutes=10)))
    finally:
        await conn.close()


def load_records(bootstrap: str, topic: str, run: str, rows: list[asyncpg.Record],
                 duplicate_share: float) -> Loaded:
    """The records published as the gateway's POST /v1/logs publishes them (key, value, headers)."""
    now = datetime.now(timezone.utc)
    shared = headers(TENANT, now)

    def message(n: int) -> Message:
        row = rows[n]
        event = {"specversion": "1.0", "id": f"{run}-{row['id']}", "source": f"logs/{row['svc']}",
                 "type": LOG_EVENT_TYPE, "time": row["t"], "subject": row["svc"],
                 "datacontenttype": "application/json", "data": orjson.loads(row["data"])}
        return message_key(TENANT, row["svc"]), encode(event, TENANT, now), shared

    return load(bootstrap, topic, run, len(rows), duplicate_share, message)


# What each read index costs an insert alone: PostgreSQL's CPU per row for `insert … select` of the same rows into a
# table of events' columns with the core indexes (0001) and one read index (or one form of the words index) beside
# them, against the core indexes alone. A GIN index's pending list is flushed before the clock stops.
CORE = ("events_tenant_time", "events_tenant_type_time")
_WORDS_INDEX = "events_logs_tenant_words"
_ON_EVENTS = re.compile(r"^CREATE INDEX \w+ ON ONLY public\.events ")
WORDS_FORMS = {  # other forms of the words index: (text of its definition, replaced by)
    "words without tenant (0035's form)": ("gin (tenant, ", "gin ("),
    "words, fastupdate off": (" WHERE ", " WITH (fastupdate = off) WHERE "),
    "words, pending list 64 MB": (" WHERE ", " WITH (gin_pending_list_limit = 65536) WHERE "),
}
_STAGED_COLUMNS = "tenant, source, id, type, subject, time, received_at, persisted_at, data, kafka_partition, kafka_offset"
_STAGED = """
create table index_cost_rows as select 'bench'::text as tenant, 'logs/' || svc as source, id, 'tally.log'::text as type,
    svc as subject, t as time, received_at, now() as persisted_at, data, 0 as kafka_partition, n as kafka_offset
from ({rows}) as made
union all
select 'bench', 'bench/drain', 'event-' || n, 'api.request', 'customer-' || n % 500, now(), now(), now(),
    jsonb_build_object('tokens', 1 + n % 50, 'model', 'm-small', 'region', 'eu'), 0, n
from generate_series(1, $3::bigint) as n
"""


async def index_costs(url: str, count: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """µs of PostgreSQL CPU per row, per kind of row (log records, ordinary events) and index set, each round."""
    conn = await asyncpg.connect(url)
    try:
        pid = await conn.fetchval("select pg_backend_pid()")
        await conn.execute(_STAGED.format(rows=log_records.ROWS), *log_records.arguments(
            0, count - 1, count, datetime.now(timezone.utc), timedelta(minutes=10)))
        found = {r["indexname"]: _ON_EVENTS.sub("CREATE INDEX ON index_costs ", r["indexdef"])
                 for r in await conn.fetch("select indexname, indexdef from pg_indexes where tablename = 'events'")}
        sets = {"core": [], **{name: [found[name]] for name in read_indexes()},
                **{form: [found[_WORDS_INDEX].replace(*change)] for form, change in WORDS_FORMS.items()},
                "all read indexes": [found[name] for name in read_indexes()]}
        costs: dict[str, dict[str, list[float]]] = {"tally.log": {}, "api.request": {}}
        for _ in range(rounds):
            for name, extra in sets.items():
                for kind in costs:
                    await conn.execute("drop table if exists index_costs;"
                                       " create table index_costs (like events including defaults)")
                    for definition in [found[n] for n in CORE] + extra:
                        await conn.execute(definition)
                    before = process_seconds(pid)
                    await conn.execute(f"insert into index_costs ({_STAGED_COLUMNS}) select * from index_cost_rows"
                                       " where type = $1", kind)
                    await conn.execute("select gin_clean_pending_list(indexrelid::regclass) from pg_index i join pg_class c"
                                       " on c.oid = i.indexrelid join pg_am a on a.oid = c.relam"
                                       " where indrelid = 'index_costs'::regclass and amname = 'gin'")
                    spent = (process_seconds(pid) or 0.0) - (before or 0.0)
                    costs[kind].setdefault(name, []).append(spent * 1e6 / count)
    finally:
        await conn.close()
    return costs


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.logs_bench", description=index_costs.__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="rows of each kind inserted per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    bench = Bench.create(Settings())
    await bench.setup()
    try:
        costs = await index_costs(bench.settings.database_url, args.rows, args.rounds)
    finally:
        await bench.teardown()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "index-costs.json").write_text(json.dumps(costs, indent=1))
    core = {kind: median(figures["core"]) for kind, figures in costs.items()}
    print(f"PostgreSQL CPU µs per row, median of {args.rounds} rounds ({args.rows:,} rows of each kind); "
          "+ is beside the core indexes alone")
    for name in costs["tally.log"]:
        print(f"{name:45s} " + "  ".join(f"{kind} {median(f[name]):6.1f} ({median(f[name]) - core[kind]:+5.1f})"
                                         for kind, f in costs.items()))


if __name__ == "__main__":
    asyncio.run(main())
