"""What meters defined for other tenants cost the processor (issue 21), with 0, 1, 10 and 100 of them:

    python -m benchmarks.other_tenants [--seconds 3]
        CPU only, no services: the validation checks and the counter fold of a 20,000-event batch of one tenant,
        through LiveMeters.
    python -m benchmarks.other_tenants --drain [--events 200000] [--rounds 3]
        Side by side in one run: --events events of one tenant (10% duplicates) loaded once into a topic of their
        own, drained from the start by one processor per count, in a consumer group of its own, the tables emptied
        and the other tenants' meter versions (a SUM each, over the drained event type) written before it starts;
        the order of the counts turns every round. Events/s and CPU µs per event of the processor and of
        PostgreSQL, each drain checked exact (every distinct event persisted and counted once).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import datetime, timezone

import asyncpg
import orjson

from benchmarks import kafka_bench, side_by_side
from benchmarks.report import fmt
from benchmarks.stack import ROOT, Bench
from tally.meters.catalog import MeterVersion, meter_of
from tally.meters.definitions import DEFAULT_METERS
from tally.meters.live import LiveMeters
from tally.processors.decode import decode
from tally.schemas.envelope import Envelope
from tally.settings import Settings
from tally.sinks.base import Record


def _records(n: int) -> list[Record]:
    now = datetime.now(timezone.utc)
    return [Record(decode(Envelope(id=f"e{i}", source="bench", type="api.call", subject=f"c{i % 50}", time=now,
                                   received_at=now, data={"ms": i % 97}, tenant="drained").to_bytes()), i % 4, i, True)
            for i in range(n)]


def _live(others: int) -> LiveMeters:
    live = LiveMeters(DEFAULT_METERS)
    versions: dict[str, list[MeterVersion]] = {}
    for i in range(others):
        tenant = f"other-{i}"
        meter = meter_of(f"m{i}", 1, {"event_type": "api.*", "aggregation": "SUM", "value_path": "data.ms"})
        versions[tenant] = [MeterVersion(tenant, i + 1, meter.slug, 1, meter, "", "", datetime.now(timezone.utc))]
    live.catalog._versions = versions  # as a refresh leaves it; no database in this figure
    live.catalog.revision = 1
    live._own = frozenset(versions)
    live.check = live._check if versions else live.base.check
    return live


COUNTS = (0, 1, 10, 100)
_OTHER = {"event_type": "api.*", "aggregation": "SUM", "value_path": "data.tokens", "windows": ["hour", "day"]}


def cpu_only(seconds: float) -> None:
    records = _records(20_000)
    print("meters of other tenants | events/s (check + fold)")
    for others in COUNTS:
        live = _live(others)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            check = live.check
            for r in records:
                check(r.envelope)
            live.aggregate(records)
            done += len(records)
        print(f"{others:>23} | {done / (time.perf_counter() - started):,.0f}")


async def _define(url: str, others: int) -> None:
    """A meter version for each of `others` tenants, none of whose events are drained."""
    conn = await asyncpg.connect(url)
    try:
        await conn.executemany("insert into meter_versions (tenant, slug, version, definition) values ($1, 'm', 1,"
                               " $2::jsonb)", [(f"other-{i}", orjson.dumps(_OTHER).decode()) for i in range(others)])
    finally:
        await conn.close()


async def _taken_up(url: str) -> int:
    """The versions the drain's processor recorded starts for: proof it had the other tenants' meters."""
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("select count(distinct version_id) from meter_starts")
    finally:
        await conn.close()


async def drains(args: argparse.Namespace) -> dict[int, list[side_by_side.Figures]]:
    bench = Bench.create(Settings())
    await bench.setup()
    found: dict[int, list[side_by_side.Figures]] = {n: [] for n in COUNTS}
    try:
        settings = bench.scoped("others")
        bench.topics(settings)
        loaded = kafka_bench.load(settings.kafka_bootstrap, settings.topics.events, bench.run, args.events, 0.1)
        print(f"[others] loaded {loaded.messages:,} events ({loaded.distinct:,} distinct)", flush=True)
        for n in range(1, args.rounds + 1):
            turn = (n - 1) % len(COUNTS)
            for others in COUNTS[turn:] + COUNTS[:turn]:
                group = settings.model_copy(update={"consumer_group": f"{settings.consumer_group}-{others}-{n}"})
                f = await side_by_side.drain(args, bench, group, loaded, ROOT, f"others-{others}-{n}",
                                             lambda o=others: _define(settings.database_url, o))
                seen = await _taken_up(settings.database_url)
                if seen != others:
                    raise RuntimeError(f"the processor took up {seen} of the {others} meters of other tenants")
                found[others].append(f)
                print(f"[others] round {n}, {others} meters of other tenants: {fmt(f['events_s'])} events/s, "
                      f"processor {fmt(f['processor_us'], 1)} µs/event ({fmt(f['processor_running_us'], 1)} once "
                      "running)", flush=True)
    finally:
        await bench.teardown()
    return found


def report(found: dict[int, list[side_by_side.Figures]]) -> None:
    def med(key: str, others: int) -> float:
        return statistics.median(f[key] for f in found[others] if f[key] is not None)

    print("| meters of other tenants | events/s | vs 0 | processor µs/event | vs 0 | once running | vs 0 |"
          " PostgreSQL µs/event |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for others in COUNTS:
        cells = [f"{fmt(med(key, others), digits)} | {med(key, others) / med(key, 0):.2f}"
                 for key, digits in (("events_s", 0), ("processor_us", 1), ("processor_running_us", 1))]
        print(f"| {others} | {' | '.join(cells)} | {fmt(med('postgresql_us', others), 1)} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="CPU only: seconds per count")
    parser.add_argument("--drain", action="store_true", help="drains through Kafka and PostgreSQL instead")
    parser.add_argument("--events", type=int, default=200_000, help="--drain: events loaded once")
    parser.add_argument("--rounds", type=int, default=3, help="--drain: rounds of every count")
    parser.add_argument("--drain-timeout", type=int, default=300, help="--drain: seconds a drain may take")
    args = parser.parse_args()
    args.profile = False
    if args.drain:
        report(asyncio.run(drains(args)))
    else:
        cpu_only(args.seconds)


if __name__ == "__main__":
    main()
