"""`bash benchmarks/run.sh --side-by-side --base REV [--this REV] [--rounds N] [--seconds N] [--events N]
[--only usage|gateway|batch|processor ...] [--profile]`: revision REV and this checkout side by side in one run,
so that other work on the machine weighs on both alike.

One slice (database, topics, Redis prefix), migrated and prepared by this checkout as the harness prepares
it, and on it the processes of both revisions, started the same way with the same environment: REV's code
from `git archive` in a temporary directory, this checkout's where it is (or, with --this, another revision's
from `git archive`), each run by this checkout's virtual environment from its own directory (`python -m
tally.cli`), so each finds its own packages first, whether they live under `tally/` or, before ADR 0120, at
the top level. Both revisions' settings ignore TALLY_ variables they do not know (pydantic-settings,
extra="ignore"), so a setting only one of them has is harmless to the other. REV's processes read this
checkout's schema, which holds while the migrations since REV only add.

- usage: single events for the 500 subscribed subjects, counted by one processor of this checkout; each
  gateway reads each subject once (a subject's first read computes its figures), then k6 reads
  `GET /v1/usage` at a constant 1,000 req/s: p50, p99 and gateway CPU µs per read.
- gateway: with the processor stopped, single events as the harness's gateway part measures them (wrk,
  1 thread, 64 connections, at the highest rate it reaches): requests/s and gateway CPU µs per event.
- batch: with the processor stopped, batches of 100 events to POST /v1/events/batch as the harness's
  gateway part posts them (k6, 8 closed-loop users, at the highest rate): events/s and gateway CPU µs per
  event.
- processor: --events events loaded once into a topic of their own as the harness's processor part loads
  them (10% duplicates); each drain empties the tables, reads the topic from the start in a consumer group
  of its own and is checked as the harness checks it (every distinct event persisted and counted once):
  events/s and CPU µs per event of the processor process and of the run's PostgreSQL backends, over the
  whole drain and once running (from the first commit seen, leaving out start-up).

Each of --rounds measures both sides in turn, the order alternating between rounds. Prints the ratio
this/base of each figure per round and the median of those ratios, and rewrites the side-by-side section
of benchmarks/RESULTS.md with the command, the revisions and the load average. With --profile each
measured run is sampled with py-spy (benchmarks/out/profile-side-PART-SIDE-ROUND.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from cryptography.fernet import Fernet

from benchmarks import kafka_bench, loadgen, pg_bench, usage_bench
from benchmarks.cpu import CpuMeter
from benchmarks.harness import BATCHES, UNLIMITED, profiling
from benchmarks.report import aim, fill, fmt, machine_load
from benchmarks.stack import OUT, ROOT, TALLY, Bench, Service
from tally.settings import Settings

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "side-by-side"
PARTS = ("usage", "gateway", "batch", "processor")
SIDES = ("base", "this")
# One side's figures in one round, by the keys of COLUMNS, and "check": failed requests or exact counts.
Figures = dict[str, Any]


def checkout_of(rev: str, into: Path) -> Path:
    """REV's files in `into`, from `git archive`."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def profiled(args: argparse.Namespace, service: Service, slug: str) -> contextlib.AbstractContextManager[None]:
    """With --profile: py-spy on the measured process meanwhile."""
    return profiling(service, OUT / f"profile-side-{slug}") if args.profile else contextlib.nullcontext()


async def rounds(part: str, args: argparse.Namespace,
                 measure: Callable[[str, str], Awaitable[Figures]]) -> list[dict[str, Any]]:
    """Both sides per round, the order alternating: base first in odd rounds, this checkout's in even ones."""
    out = []
    for n in range(1, args.rounds + 1):
        order = SIDES if n % 2 else SIDES[::-1]
        row: dict[str, Any] = {"round": n, "order": list(order)}
        for side in order:
            row[side] = f = await measure(side, f"{part}-{side}-{n}")
            print(f"[side-by-side] {part}, round {n}, {side}: "
                  + ", ".join(f"{c.label} {fmt(f[c.key], c.digits)}" for c in COLUMNS[part])
                  + f", {CHECKS[part]} {f['check']}", flush=True)
        out.append(row)
    return out


# -- the gateway's parts: usage reads, single events, batches -------------------------------------------


async def measured(args: argparse.Namespace, bench: Bench, gateway: Service, slug: str,
                   call: Callable[[], loadgen.Load], per_request: bool = False) -> Figures:
    """One load run and the gateway's CPU meanwhile, per accepted event (or per request, for reads)."""
    meter = CpuMeter({"gateway": lambda: [gateway.process.pid]}, bench.base.database_url, bench.db_name, False)
    before = await meter.snapshot()
    with profiled(args, gateway, slug):
        load = await asyncio.to_thread(call)
    cpu = CpuMeter.per_event(before, await meter.snapshot(),
                             load.requests if per_request else load.events_accepted)["gateway"]
    return {"req_s": load.req_s, "events_s": load.events_s, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms,
            "cpu_us": cpu, "check": f"{load.failed:.2%}"}


def k6(bench: Bench, gateway: Service, slug: str, seconds: int, key: str, **env: str | int) -> Callable[[], loadgen.Load]:
    return partial(loadgen.k6, slug, OUT / f"k6-side-{slug}.json", URL=f"http://127.0.0.1:{gateway.port}", KEY=key,
                   RUN=f"{bench.run}-{slug}", DURATION=f"{seconds}s", **env)


def run_secrets(settings: Settings) -> dict[str, str]:
    """The secrets `up.sh` makes (deploy/local/secrets.sh), made for the run where the environment has none, so
    that a gateway which needs them starts as it would there; both gateways get the same."""
    made = {"secrets_key": Fernet.generate_key().decode(), "usage_link_secret": secrets.token_urlsafe(32),
            "query_cursor_secret": secrets.token_urlsafe(32)}
    return {name: value for name, value in made.items() if not getattr(settings, name)}


async def gateway_parts(bench: Bench, args: argparse.Namespace, parts: list[str], checkouts: dict[str, Path],
                        results: dict[str, Any]) -> None:
    settings = bench.scoped("side", meters=usage_bench.METERS, **run_secrets(bench.settings))
    bench.topics(settings)
    gateways = {side: bench.gateway(settings, f"gateway-{side}", checkouts[side], **UNLIMITED) for side in SIDES}

    def measure(call: Callable[[Service, str], Callable[[], loadgen.Load]], per_request: bool = False
                ) -> Callable[[str, str], Awaitable[Figures]]:
        return lambda side, slug: measured(args, bench, gateways[side], slug, call(gateways[side], slug), per_request)

    if "usage" in parts:
        keys = await usage_bench.prepare(settings)
        processor = bench.processor(settings, "usage-processor")
        print(f"[side-by-side] posting events for the usage reads for {args.seconds}s, then counting them", flush=True)
        await asyncio.to_thread(loadgen.wrk, "usage-events", f"http://127.0.0.1:{gateways['this'].port}/v1/events",
                                keys.free, f"{bench.run}-usage", args.seconds)
        if not await usage_bench.drained(settings, 120):
            results["notes"].append("the processor had not counted every posted event when the reads started")
        for gateway in gateways.values():
            await asyncio.to_thread(usage_bench.warm, f"http://127.0.0.1:{gateway.port}", keys.reader)
        results["usage"] = await rounds("usage", args, measure(lambda gateway, slug: k6(
            bench, gateway, slug, args.seconds, keys.reader, **usage_bench.READS), per_request=True))
        bench.stop(processor)  # events are measured as the harness's gateway part does: no processor
    if "gateway" in parts:
        results["gateway"] = await rounds("gateway", args, measure(lambda gateway, slug: partial(
            loadgen.wrk, slug, f"http://127.0.0.1:{gateway.port}/v1/events", bench.key, f"{bench.run}-{slug}",
            args.seconds)))
    if "batch" in parts:
        results["batch"] = await rounds("batch", args, measure(lambda gateway, slug: k6(
            bench, gateway, slug, args.seconds, bench.key, **BATCHES)))
    for gateway in gateways.values():
        bench.stop(gateway)


# -- the processor's part: drains of one loaded topic ----------------------------------------------------


async def drain(args: argparse.Namespace, bench: Bench, settings: Settings, loaded: kafka_bench.Loaded,
                checkout: Path, slug: str, prepare: Callable[[], Awaitable[None]] | None = None) -> Figures:
    """One processor of `checkout` drains the topic from the start; its CPU and its backends' per event.
    `prepare` runs once the tables are empty, before the processor starts."""
    await pg_bench.clear(settings.database_url)
    if prepare is not None:
        await prepare()
    lag = kafka_bench.Lag(settings.kafka_bootstrap, settings.consumer_group, loaded.topic)
    services: list[Service] = []
    meter = CpuMeter({"processor": lambda: [s.process.pid for s in services]}, bench.base.database_url,
                     urlsplit(settings.database_url).path.lstrip("/"), False)
    before = await meter.snapshot()
    began = time.monotonic()
    service = bench.start(slug, [*TALLY, "process"], settings, checkout=checkout)
    services.append(service)
    cpu: dict[str, float | None] = {}
    running: dict[str, float | None] = {}
    first: tuple[dict[str, dict[int, float]], int] | None = None
    try:
        with profiled(args, service, slug):
            while time.monotonic() < began + args.drain_timeout:
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
                    raise RuntimeError(f"{service.name} exited; see benchmarks/out/logs/{service.name}.log")
                await asyncio.sleep(0.2)
    finally:
        seconds = time.monotonic() - began
        bench.stop(service)
        lag.close()
    if not cpu:
        raise RuntimeError(f"{service.name} did not drain {loaded.messages:,} events within {args.drain_timeout}s")
    check = await pg_bench.verify(settings.database_url, loaded.distinct)
    if not check["exact"]:
        raise RuntimeError(f"{service.name}: not exact: {check}")
    return {"events_s": loaded.messages / seconds, "processor_us": cpu["processor"],
            "postgresql_us": cpu["postgresql"], "processor_running_us": running.get("processor"),
            "postgresql_running_us": running.get("postgresql"), "check": "yes"}


async def side_database(bench: Bench, settings: Settings, checkout: Path, side: str) -> Settings:
    """Settings with a database of the side's own, made by its own migrations: a base from before a change of
    the schema drains into the schema its code was written for (the run's database has this checkout's)."""
    url = await bench.create_database(f"{bench.db_name}_{side}")
    own = settings.model_copy(update={"database_url": url, "migrations_dir": checkout / "deploy" / "migrations"})
    migrate = bench.start(f"migrate-{side}", [*TALLY, "migrate"], own, checkout=checkout)
    if await asyncio.to_thread(migrate.process.wait) != 0:
        raise RuntimeError(f"{side}'s migrations failed; see benchmarks/out/logs/migrate-{side}.log")
    return own


async def processor_part(bench: Bench, args: argparse.Namespace, checkouts: dict[str, Path],
                         results: dict[str, Any]) -> None:
    settings = bench.scoped("drain")
    bench.topics(settings)
    loaded = kafka_bench.load(settings.kafka_bootstrap, settings.topics.events, bench.run, args.events, 0.1)
    results["loaded"] = {"messages": loaded.messages, "distinct": loaded.distinct}
    print(f"[side-by-side] loaded {loaded.messages:,} events ({loaded.distinct:,} distinct) for the drains",
          flush=True)

    databases = {side: await side_database(bench, settings, checkouts[side], side) for side in SIDES}

    async def measure(side: str, slug: str) -> Figures:
        group = databases[side].model_copy(update={"consumer_group": f"{settings.consumer_group}-{slug}"})
        return await drain(args, bench, group, loaded, checkouts[side], slug)

    results["processor"] = await rounds("processor", args, measure)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loads = {"before": os.getloadavg()[0]}
    results: dict[str, Any] = {"args": vars(args), "cpus": os.cpu_count(), "notes": [],
                               "base": git("rev-parse", "--short", args.base),
                               "this": git("rev-parse", "--short", args.this) if args.this
                               else git("describe", "--always", "--dirty")}
    parts = [part for part in PARTS if part in (args.only or PARTS)]
    bench = Bench.create(Settings())
    await bench.setup()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            checkouts = {"base": checkout_of(args.base, Path(scratch) / "base"),
                         "this": checkout_of(args.this, Path(scratch) / "this") if args.this else ROOT}
            if set(parts) - {"processor"}:
                await gateway_parts(bench, args, parts, checkouts, results)
            if "processor" in parts:
                await processor_part(bench, args, checkouts, results)
        finally:
            await bench.teardown()
    loads["after"] = os.getloadavg()[0]
    results["load_average"] = loads
    return results


# -- the report ----------------------------------------------------------------------------------------


class Column(NamedTuple):
    key: str
    label: str
    digits: int


# The figures of each part. Requests/s and events/s are better higher, the others lower.
COLUMNS = {"usage": (Column("req_s", "req/s", 0), Column("p50_ms", "p50 ms", 1), Column("p99_ms", "p99 ms", 1),
                     Column("cpu_us", "gateway CPU µs per read", 0)),
           "gateway": (Column("req_s", "req/s", 0), Column("cpu_us", "gateway CPU µs per event", 0)),
           "batch": (Column("events_s", "events/s", 0), Column("cpu_us", "gateway CPU µs per event", 0)),
           "processor": (Column("events_s", "events/s", 0), Column("processor_us", "processor CPU µs/event", 1),
                         Column("postgresql_us", "PostgreSQL CPU µs/event", 1),
                         Column("processor_running_us", "processor CPU µs/event once running", 1),
                         Column("postgresql_running_us", "PostgreSQL CPU µs/event once running", 1))}
CHECKS = {"usage": "failed", "gateway": "failed", "batch": "failed", "processor": "exact counts"}
# What each part must keep within 5% of base: (figure, what it is, better higher). On a shared machine the
# processor's drain rate mostly measures the sharing, so its own CPU per event is the figure that decides.
AIMS = {"gateway": ("req_s", "Single-event requests/s", True), "batch": ("events_s", "Batch events/s", True),
        "processor": ("processor_running_us", "Processor CPU µs per event once running", False)}


def ratio(this: float | None, base: float | None) -> float | None:
    return this / base if this is not None and base else None


def median(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def table(part: str, rows: list[dict[str, Any]]) -> list[str]:
    """A row per round: each figure of base and this checkout and their ratio; then the medians of each
    (of the ratios per round, not the ratio of the medians)."""
    columns = COLUMNS[part]
    lines = ["| round | first |" + "".join(f" {c.label} base | this | this/base |" for c in columns)
             + f" {CHECKS[part]} base / this |", "|---:|---|" + "---:|---:|---:|" * len(columns) + "---|"]
    for row in rows:
        cells = [cell for c in columns for cell in (
            fmt(row["base"][c.key], c.digits), fmt(row["this"][c.key], c.digits),
            fmt(ratio(row["this"][c.key], row["base"][c.key]), 2))]
        lines.append(f"| {row['round']} | {row['order'][0]} | " + " | ".join(cells)
                     + f" | {row['base']['check']} / {row['this']['check']} |")
    cells = [cell for c in columns for cell in (
        fmt(median([r["base"][c.key] for r in rows]), c.digits), fmt(median([r["this"][c.key] for r in rows]), c.digits),
        f"**{fmt(median([ratio(r['this'][c.key], r['base'][c.key]) for r in rows]), 2)}**")]
    lines.append("| median | | " + " | ".join(cells) + " | |")
    return lines


def verdict(part: str, rows: list[dict[str, Any]], base: str) -> str:
    key, what, higher = AIMS[part]
    found = median([ratio(r["this"][key], r["base"][key]) for r in rows])
    ok = None if found is None else (found >= 0.95 if higher else found <= 1.05)
    return (f"{what} within 5% of {base} (median ratio at {'least 0.95' if higher else 'most 1.05'}): "
            f"{aim(ok)}.")


def headings(results: dict[str, Any]) -> dict[str, str]:
    loaded = results.get("loaded") or {"messages": 0, "distinct": 0}
    return {
        "usage": "**GET /v1/usage at a constant 1,000 req/s** (k6; after one read of each of the 500 subjects per "
                 "gateway; lower is better but for req/s):",
        "gateway": "**Single events, highest rate** (wrk, 1 thread, 64 connections; no processor running; "
                   "gateway CPU per accepted event):",
        "batch": "**Batches of 100 events, highest rate** (k6, 8 closed-loop users, POST /v1/events/batch; no "
                 "processor running; gateway CPU per accepted event):",
        "processor": f"**Processor drains of {loaded['messages']:,} events ({loaded['distinct']:,} distinct, 10% "
                     "duplicates)** (one topic loaded once; each drain empties the tables and reads it from the start "
                     "in a consumer group of its own, checked exact; events/s over the whole drain; CPU µs per "
                     "event from /proc, of the processor process and the run's PostgreSQL backends, over the whole "
                     "drain and once running, from the first commit seen; lower is better but for events/s):",
    }


def report(results: dict[str, Any], command: str) -> list[str]:
    lines = [f"`{command}`: {results['this']} (this) against {results['base']} (base), {results['cpus']} cores, "
             + machine_load(results["load_average"], results["cpus"]) + "."]
    for part, heading in headings(results).items():
        if part in results:
            lines += ["", heading, "", *table(part, results[part])]
            if part in AIMS:
                lines += ["", verdict(part, results[part], results["base"])]
    lines += [f"- {note}" for note in results["notes"]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="bash benchmarks/run.sh --side-by-side", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare with (e.g. 4a19251)")
    parser.add_argument("--this", help="a revision to run instead of this checkout's files")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of both sides, in alternating order")
    parser.add_argument("--seconds", type=int, default=10, help="length of each load run")
    parser.add_argument("--events", type=int, default=200_000, help="events loaded for the processor's drains")
    parser.add_argument("--drain-timeout", type=int, default=300, help="seconds a drain may take")
    parser.add_argument("--only", action="append", choices=PARTS, help="measure these parts only (repeatable; "
                        "default all)")
    parser.add_argument("--profile", action="store_true", help="sample every measured run with py-spy")
    args = parser.parse_args()
    if f"<!-- section: {SECTION} -->" not in RESULTS.read_text():
        parser.error(f"benchmarks/RESULTS.md lacks the {SECTION} section's markers")
    OUT.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args))
    (OUT / "side-by-side.json").write_text(json.dumps(results, indent=1, default=str))
    lines = report(results, " ".join(["bash benchmarks/run.sh --side-by-side", *sys.argv[1:]]))
    print("\n".join(lines), flush=True)
    RESULTS.write_text(fill(RESULTS.read_text(), SECTION, lines))
    print(f"[side-by-side] wrote benchmarks/out/side-by-side.json and the {SECTION} section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
