"""`python -m benchmarks.meters_backfill [--rows N]`: the meter backfill's rate in events/s (issue 21).

A database of its own (`tally_bench_backfill`, made again each run) holds N log records of one tenant in the
shape of the log seed (benchmarks/logs_seed.py: tally.log events over 7 days, 4 partitions, a level per record);
a tenant meter version counting them per level (COUNT, hour and day windows) has its starts above every stored
offset, and the backfill job (tally/meters/backfill.py) counts them all with its default chunk and pause. The
processors' group is not involved: the readiness it would report is given as met.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from benchmarks.cpu import CpuMeter
from tally.meters.backfill import BackfillConfig, run
from tally.meters.catalog import Catalog
from tally.meters.definitions import DEFAULT_METERS
from tally.settings import Settings
from tally.sinks.migrations import migrate

DATABASE = "tally_bench_backfill"
TENANT = "bench"

_SEED = """
insert into events (tenant, source, id, type, subject, time, received_at, data, kafka_partition, kafka_offset)
select $1, 'logs/svc' || (n % 20), 'r' || n, 'tally.log', 'svc' || (n % 20), t, t,
       jsonb_build_object('level', (array['info', 'warn', 'error', 'debug'])[1 + n % 4], 'message', 'record ' || n),
       n % 4, n / 4
from generate_series(0, $2 - 1) as n, lateral (select now() - interval '7 days' * (n::float / $2) as t) as at
"""


def _progress(rows: int, chunk: int, started: float, chunks: list[int], point: str) -> None:
    """Every million events counted, where the backfill stands (a 10-million run takes minutes)."""
    if point != "backfill_after_chunk":
        return
    chunks[0] += 1
    if chunks[0] * chunk % 1_000_000 < chunk:
        done = chunks[0] * chunk
        rate = done / (time.perf_counter() - started)
        print(f"  {done:,} of {rows:,} counted, {rate:,.0f} events/s, about {(rows - done) / rate:.0f} s left",
              flush=True)


async def main(rows: int) -> None:
    base = Settings()
    url = urlunsplit(urlsplit(base.database_url)._replace(path=f"/{DATABASE}"))
    conn = await asyncpg.connect(base.database_url)
    await conn.execute(f'drop database if exists "{DATABASE}" with (force)')
    await conn.execute(f'create database "{DATABASE}"')
    await conn.close()
    await migrate(url, base.migrations_dir)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        started = time.perf_counter()
        print(f"seeding {rows:,} log records (a 10-million seed takes some minutes)", flush=True)
        await pool.execute(_SEED, TENANT, rows)
        await pool.execute("analyze events")
        print(f"seeded {rows:,} log records in {time.perf_counter() - started:.0f} s")
        definition = {"event_type": "tally.log", "aggregation": "COUNT", "group_by": {"level": "data.level"}}
        vid = await pool.fetchval("insert into meter_versions (tenant, slug, version, definition) values ($1, 'records',"
                                  " 1, $2::jsonb) returning id", TENANT, orjson.dumps(definition).decode())
        await pool.execute("insert into meter_backfills (tenant, version_id) values ($1, $2)", TENANT, vid)
        starts = {r[0]: r[1] + 1 for r in await pool.fetch("select kafka_partition, max(kafka_offset) from events"
                                                           " group by 1")}
        await pool.executemany("insert into meter_starts (tenant, version_id, kafka_partition, start_offset)"
                               " values ($1, $2, $3, $4)", [(TENANT, vid, p, o) for p, o in starts.items()])
        config = BackfillConfig(budget_s=24 * 3600.0)
        meter = CpuMeter({"backfill": lambda: [os.getpid()]}, base.database_url, DATABASE, False)
        before = await meter.snapshot()
        started = time.perf_counter()
        figures = await run(pool, Catalog(DEFAULT_METERS), config, lambda: starts, lambda: starts,
                            partial(_progress, rows, config.chunk, started, [0]))
        seconds = time.perf_counter() - started
        cpu = CpuMeter.per_event(before, await meter.snapshot(), figures["counted"])
        print(f"backfill: {figures['counted']:,} events in {seconds:.1f} s = {figures['counted'] / seconds:,.0f} events/s"
              f" (chunk {config.chunk}, pause {config.pause_s} s); CPU per event: backfill {cpu['backfill']:.1f} µs,"
              f" PostgreSQL {cpu['postgresql']:.1f} µs")
    finally:
        await pool.close()
        conn = await asyncpg.connect(base.database_url)
        await conn.execute(f'drop database if exists "{DATABASE}" with (force)')
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    asyncio.run(main(parser.parse_args().rows))
