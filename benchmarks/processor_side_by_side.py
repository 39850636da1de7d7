"""`python -m benchmarks.processor_side_by_side --base REV`: one processor of revision REV and one of this
checkout draining the same events, taking turns, so that other work on the machine weighs on both alike.

One slice (database, topic) loaded once as the harness's processor part loads it (10% duplicates); each
drain empties the tables, reads the topic from the start in a consumer group of its own, and is checked
as the harness checks it (every distinct event persisted and counted once). The figure to compare is
CPU µs per event of the processor process and of the database's PostgreSQL backends: throughput on a
shared machine mostly measures the sharing. With --profile each drain is sampled with py-spy
(out/profile-side-NAME-N.txt). REV's code is taken with `git archive`, run with this checkout's
virtual environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import harness, kafka_bench, pg_bench
from benchmarks.cpu import CpuMeter
from benchmarks.side_by_side import checkout_of
from benchmarks.stack import OUT, ROOT, TALLY, Bench
from tally.settings import Settings


async def drain(bench: Bench, settings: Settings, loaded: kafka_bench.Loaded, name: str, checkout: Path,
                profile: Path | None, timeout_s: float) -> dict[str, float]:
    """One processor of `checkout` drains the topic from the start; its CPU and its backends' per event."""
    await pg_bench.clear(settings.database_url)
    lag = kafka_bench.Lag(settings.kafka_bootstrap, settings.consumer_group, loaded.topic)
    service = bench.start(name, [*TALLY, "process"], settings, checkout=checkout)
    meter = CpuMeter({"processor": lambda: [service.process.pid]}, bench.base.database_url, bench.db_name, False)
    before = await meter.snapshot()
    began = time.monotonic()
    cpu: dict[str, float | None] = {}
    running: dict[str, float | None] = {}
    first: tuple[dict[str, dict[int, float]], int] | None = None
    try:
        with harness.profiling(service, profile) if profile else contextlib.nullcontext():
            while time.monotonic() < began + timeout_s:
                end, committed = lag.sample()
                if committed >= end:
                    after = await meter.snapshot()
                    cpu = CpuMeter.per_event(before, after, loaded.messages)
                    if first is not None and end > first[1]:
                        running = CpuMeter.per_event(first[0], after, end - first[1])
                    break
                if committed and first is None:
                    # Once running: from the first commit seen, leaving out start-up (imports, connections).
                    first = (await meter.snapshot(), committed)
                if service.process.poll() is not None:
                    raise RuntimeError(f"{name} exited; see benchmarks/out/logs/{name}.log")
                await asyncio.sleep(0.2)
    finally:
        seconds = time.monotonic() - began
        bench.stop(service)
        lag.close()
    if not cpu:
        raise RuntimeError(f"{name} did not drain {loaded.messages:,} events within {timeout_s:.0f}s")
    check = await pg_bench.verify(settings.database_url, loaded.distinct)
    if not check["exact"]:
        raise RuntimeError(f"{name}: not exact: {check}")
    return {"processor": cpu["processor"] or 0.0, "postgresql": cpu["postgresql"] or 0.0,
            "processor_running": running.get("processor") or 0.0, "postgresql_running": running.get("postgresql") or 0.0,
            "events_s": loaded.messages / seconds}


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.processor_side_by_side", description=__doc__)
    parser.add_argument("--base", required=True, help="the revision to compare with (e.g. main)")
    parser.add_argument("--this", help="a revision to run instead of this checkout's files")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--drain-timeout", type=int, default=300)
    parser.add_argument("--profile", action="store_true", help="sample every drain with py-spy")
    args = parser.parse_args()

    def rev(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()

    this = rev("rev-parse", "--short", args.this) if args.this else rev("describe", "--always", "--dirty")
    names = {"base": f"base {rev('rev-parse', '--short', args.base)}", "this": f"this {this}"}
    OUT.mkdir(parents=True, exist_ok=True)
    bench = Bench.create(Settings())
    await bench.setup()
    figures: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    with tempfile.TemporaryDirectory() as scratch:
        try:
            settings = bench.scoped("drain")
            bench.topics(settings)
            loaded = kafka_bench.load(settings.kafka_bootstrap, settings.topics.events, bench.run, args.events, 0.1)
            print(f"loaded {loaded.messages:,} events ({loaded.distinct:,} distinct); load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
            checkouts = {"base": checkout_of(args.base, Path(scratch) / "base"),
                         "this": checkout_of(args.this, Path(scratch) / "this") if args.this else ROOT}
            print("| round | processor | CPU µs/event: processor | PostgreSQL | once running: processor | PostgreSQL "
                  "| events/s | load avg (1 min) |")
            print("|---:|---|---:|---:|---:|---:|---:|---:|")
            for n in range(1, args.rounds + 1):
                # Each round starts with the other one, so neither always runs first.
                order = ["base", "this"] if n % 2 else ["this", "base"]
                for which in order:
                    group = settings.model_copy(update={"consumer_group": f"{settings.consumer_group}-{which}-{n}"})
                    profile = OUT / f"profile-side-{which}-{n}" if args.profile else None
                    found = await drain(bench, group, loaded, f"processor-{which}-{n}", checkouts[which], profile,
                                        args.drain_timeout)
                    figures[which].append(found)
                    print(f"| {n} | {names[which]} | {found['processor']:.1f} | {found['postgresql']:.1f} | "
                          f"{found['processor_running']:.1f} | {found['postgresql_running']:.1f} | "
                          f"{found['events_s']:,.0f} | {os.getloadavg()[0]:.2f} |", flush=True)
            for which, runs in figures.items():
                print(f"{names[which]}: medians (ranges) in CPU µs/event: " + ", ".join(
                    f"{figure} {statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"
                    for figure in ("processor", "postgresql", "processor_running", "postgresql_running")
                    for values in ([r[figure] for r in runs],)))
        finally:
            await bench.teardown()


if __name__ == "__main__":
    asyncio.run(main())
