"""`bash benchmarks/run.sh --side-by-side --base REV [--rounds N] [--seconds N] [--only gateway|usage]`: a
gateway of revision REV and one of this checkout, side by side in one run, so that other work on the machine
weighs on both alike.

One slice (database, topics, Redis prefix), migrated and prepared by this checkout as the harness's usage
part prepares it, and on it two gateways started the same way with the same environment: REV's code from
`git archive` in a temporary directory, this checkout's where it is, each run by this checkout's virtual
environment from its own directory (`python -m tally.cli`), so each finds its own packages first. Both
revisions' settings ignore TALLY_ variables they do not know (pydantic-settings, extra="ignore"), so a
setting only one of them has is harmless to the other. REV's gateway reads this checkout's schema, which
holds while the migrations since REV only add.

- usage: single events for the 500 subscribed subjects, counted by one processor of this checkout; each
  gateway reads each subject once (a subject's first read computes its figures), then k6 reads
  `GET /v1/usage` at a constant 1,000 req/s: p50, p99 and gateway CPU µs per read.
- gateway: with the processor stopped, single events as the harness's gateway part measures them (wrk,
  1 thread, 64 connections, at the highest rate it reaches): requests/s and gateway CPU µs per event.

Each of --rounds measures both gateways in turn, the order alternating between rounds. Prints the
ratio this/base of each figure per round and the median of those ratios, and rewrites the side-by-side
section of benchmarks/RESULTS.md with the command, the revisions and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from benchmarks import loadgen, usage_bench
from benchmarks.cpu import CpuMeter
from benchmarks.harness import UNLIMITED
from benchmarks.report import aim, fill, fmt, machine_load
from benchmarks.stack import OUT, ROOT, Bench, Service
from tally.settings import Settings

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "side-by-side"
PARTS = ("usage", "gateway")
SIDES = ("base", "this")


def checkout_of(rev: str, into: Path) -> Path:
    """REV's files in `into`, from `git archive`."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


async def measured(bench: Bench, gateway: Service, call: Callable[[], loadgen.Load],
                   per_request: bool) -> dict[str, Any]:
    """One load run and the gateway's CPU meanwhile, per accepted event (or per request, for reads)."""
    meter = CpuMeter({"gateway": lambda: [gateway.process.pid]}, bench.base.database_url, bench.db_name, False)
    before = await meter.snapshot()
    load = await asyncio.to_thread(call)
    cpu = CpuMeter.per_event(before, await meter.snapshot(),
                             load.requests if per_request else load.events_accepted)["gateway"]
    return {"req_s": load.req_s, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms, "failed": load.failed, "cpu_us": cpu}


def events(bench: Bench, gateway: Service, slug: str, seconds: int) -> Callable[[], loadgen.Load]:
    return partial(loadgen.wrk, slug, f"http://127.0.0.1:{gateway.port}/v1/events", bench.key, f"{bench.run}-{slug}",
                   seconds)


def reads(bench: Bench, gateway: Service, slug: str, key: str, seconds: int) -> Callable[[], loadgen.Load]:
    return partial(loadgen.k6, slug, OUT / f"k6-side-{slug}.json", URL=f"http://127.0.0.1:{gateway.port}", KEY=key,
                   RUN=f"{bench.run}-{slug}", DURATION=f"{seconds}s", **usage_bench.READS)


async def rounds(bench: Bench, part: str, args: argparse.Namespace, gateways: dict[str, Service],
                 load: Callable[[Service, str], Callable[[], loadgen.Load]]) -> list[dict[str, Any]]:
    """Both gateways per round, the order alternating: base first in odd rounds, this checkout's in even ones."""
    out = []
    for n in range(1, args.rounds + 1):
        order = SIDES if n % 2 else SIDES[::-1]
        row: dict[str, Any] = {"round": n, "order": list(order)}
        for side in order:
            row[side] = f = await measured(bench, gateways[side], load(gateways[side], f"{part}-{side}-{n}"),
                                           per_request=part == "usage")
            print(f"[side-by-side] {part}, round {n}, {side}: {f['req_s']:,.0f} req/s, p50 {f['p50_ms']:.1f} ms, "
                  f"p99 {f['p99_ms']:.1f} ms, failed {f['failed']:.2%}, gateway CPU {fmt(f['cpu_us'])} µs", flush=True)
        out.append(row)
    return out


def run_secrets(settings: Settings) -> dict[str, str]:
    """The secrets `up.sh` makes (deploy/local/secrets.sh), made for the run where the environment has none, so
    that a gateway which needs them starts as it would there; both gateways get the same."""
    made = {"secrets_key": Fernet.generate_key().decode(), "usage_link_secret": secrets.token_urlsafe(32),
            "query_cursor_secret": secrets.token_urlsafe(32)}
    return {name: value for name, value in made.items() if not getattr(settings, name)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loads = {"before": os.getloadavg()[0]}
    results: dict[str, Any] = {"args": vars(args), "cpus": os.cpu_count(), "notes": [],
                               "base": git("rev-parse", "--short", args.base),
                               "this": git("describe", "--always", "--dirty")}
    parts = [args.only] if args.only else PARTS
    bench = Bench.create(Settings())
    await bench.setup()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            settings = bench.scoped("side", meters=usage_bench.METERS, **run_secrets(bench.settings))
            bench.topics(settings)
            gateways = {"base": bench.gateway(settings, "gateway-base", checkout_of(args.base, Path(scratch)),
                                              **UNLIMITED),
                        "this": bench.gateway(settings, "gateway-this", **UNLIMITED)}
            if "usage" in parts:
                keys = await usage_bench.prepare(settings)
                processor = bench.processor(settings, "usage-processor")
                print(f"[side-by-side] posting events for the usage reads for {args.seconds}s, then counting them",
                      flush=True)
                await asyncio.to_thread(loadgen.wrk, "usage-events", f"http://127.0.0.1:{gateways['this'].port}"
                                        "/v1/events", keys.free, f"{bench.run}-usage", args.seconds)
                if not await usage_bench.drained(settings, 120):
                    results["notes"].append("the processor had not counted every posted event when the reads started")
                for gateway in gateways.values():
                    await asyncio.to_thread(usage_bench.warm, f"http://127.0.0.1:{gateway.port}", keys.reader)
                results["usage"] = await rounds(bench, "usage", args, gateways, lambda gateway, slug: reads(
                    bench, gateway, slug, keys.reader, args.seconds))
                bench.stop(processor)  # single events are measured as the harness's gateway part does: no processor
            if "gateway" in parts:
                results["gateway"] = await rounds(bench, "gateway", args, gateways, lambda gateway, slug: events(
                    bench, gateway, slug, args.seconds))
        finally:
            await bench.teardown()
    loads["after"] = os.getloadavg()[0]
    results["load_average"] = loads
    return results


# The figures of each part: (key, label, digits). Requests/s is better higher, the others lower.
COLUMNS = {"usage": (("req_s", "req/s", 0), ("p50_ms", "p50 ms", 1), ("p99_ms", "p99 ms", 1),
                     ("cpu_us", "gateway CPU µs per read", 0)),
           "gateway": (("req_s", "req/s", 0), ("cpu_us", "gateway CPU µs per event", 0))}


def ratio(this: float | None, base: float | None) -> float | None:
    return this / base if this is not None and base else None


def median(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def table(part: str, rows: list[dict[str, Any]]) -> list[str]:
    """A row per round: each figure of base and this checkout and their ratio; then the medians of each
    (of the ratios per round, not the ratio of the medians)."""
    columns = COLUMNS[part]
    lines = ["| round | first |" + "".join(f" {label} base | this | this/base |" for _, label, _ in columns)
             + " failed base / this |", "|---:|---|" + "---:|---:|---:|" * len(columns) + "---|"]
    for row in rows:
        cells = [c for key, _, digits in columns for c in (
            fmt(row["base"][key], digits), fmt(row["this"][key], digits),
            fmt(ratio(row["this"][key], row["base"][key]), 2))]
        lines.append(f"| {row['round']} | {row['order'][0]} | " + " | ".join(cells)
                     + f" | {row['base']['failed']:.2%} / {row['this']['failed']:.2%} |")
    cells = [c for key, _, digits in columns for c in (
        fmt(median([r["base"][key] for r in rows]), digits), fmt(median([r["this"][key] for r in rows]), digits),
        f"**{fmt(median([ratio(r['this'][key], r['base'][key]) for r in rows]), 2)}**")]
    lines.append("| median | | " + " | ".join(cells) + " | |")
    return lines


def report(results: dict[str, Any], command: str) -> list[str]:
    lines = [f"`{command}`: this checkout at {results['this']} against {results['base']}, {results['cpus']} cores, "
             + machine_load(results["load_average"], results["cpus"]) + "."]
    if "usage" in results:
        lines += ["", "**GET /v1/usage at a constant 1,000 req/s** (k6; after one read of each of the 500 subjects per "
                  "gateway; lower is better but for req/s):", "", *table("usage", results["usage"])]
    if "gateway" in results:
        rows = results["gateway"]
        best = median([ratio(r["this"]["req_s"], r["base"]["req_s"]) for r in rows])
        lines += ["", "**Single events, highest rate** (wrk, 1 thread, 64 connections; no processor running; "
                  "gateway CPU per accepted event):", "", *table("gateway", rows), "",
                  f"Single-event requests/s within 5% of {results['base']} (median ratio at least 0.95): "
                  + aim(None if best is None else best >= 0.95) + "."]
    lines += [f"- {note}" for note in results["notes"]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="bash benchmarks/run.sh --side-by-side", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare with (e.g. 4a19251)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of both gateways, in alternating order")
    parser.add_argument("--seconds", type=int, default=10, help="length of each load run")
    parser.add_argument("--only", choices=PARTS, help="measure one part only (default both)")
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
