"""`python -m benchmarks.usage_side_by_side --base REV`: `GET /v1/usage` on a gateway of revision REV and
on one of this checkout, side by side in one run, so that other work on the machine weighs on both alike.

One slice (database, topics, Redis prefix) as the harness's usage part prepares it: 500 subscribed
subjects, single events posted for them and counted by one processor of this checkout. Both gateways
then read each subject once (a subject's first read computes its figures, in either version), and
k6 reads at a constant 1,000 req/s against each in turn, `--rounds` times, with each gateway's CPU per
request. REV's code is taken with `git archive` into a temporary directory and run with this
checkout's virtual environment.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
from pathlib import Path

from benchmarks import loadgen, usage_bench
from benchmarks.cpu import CpuMeter
from benchmarks.harness import UNLIMITED
from benchmarks.stack import OUT, ROOT, Bench, Service
from tally.settings import Settings


def checkout_of(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


async def read(bench: Bench, name: str, gateway: Service, key: str, seconds: int) -> str:
    meter = CpuMeter({"gateway": lambda: [gateway.process.pid]}, bench.base.database_url, bench.db_name, False)
    before = await meter.snapshot()
    slug = name.replace(" ", "-")
    load = await asyncio.to_thread(
        loadgen.k6, slug, OUT / f"k6-side-{slug}.json", URL=f"http://127.0.0.1:{gateway.port}", KEY=key,
        RUN=f"{bench.run}-{slug}", DURATION=f"{seconds}s", SCENARIO="usage", MODE="rate", RATE=1000, P95_MS=10,
        P99_MS=10, VUS=64, MAX_VUS=256)
    cpu = CpuMeter.per_event(before, await meter.snapshot(), load.requests)["gateway"]
    return (f"| {name} | {load.req_s:,.0f} | {load.p50_ms:.1f} | {load.p95_ms:.1f} | {load.p99_ms:.1f} | "
            f"{load.failed:.2%} | {cpu:,.0f} |")


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.usage_side_by_side", description=__doc__)
    parser.add_argument("--base", required=True, help="the revision to compare with (e.g. main)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    this_rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    OUT.mkdir(parents=True, exist_ok=True)
    bench = Bench.create(Settings())
    await bench.setup()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            settings = bench.scoped("usage", meters=usage_bench.METERS)
            bench.topics(settings)
            keys = await usage_bench.prepare(settings)
            base = checkout_of(args.base, Path(scratch))
            gateways = {f"base {base_rev}": bench.gateway(settings, "gateway-base", base, **UNLIMITED),
                        f"this {this_rev}": bench.gateway(settings, **UNLIMITED)}
            bench.processor(settings, "usage-processor")
            first = next(iter(gateways.values()))
            await asyncio.to_thread(loadgen.wrk, "single", f"http://127.0.0.1:{first.port}/v1/events", keys.free,
                                    f"{bench.run}-w", args.seconds)
            if not await usage_bench.drained(settings, 120):
                print("note: the processor had not counted every posted event when the reads started")
            for gateway in gateways.values():
                await asyncio.to_thread(usage_bench.warm, f"http://127.0.0.1:{gateway.port}", keys.reader)
            print("| gateway | req/s | p50 ms | p95 ms | p99 ms | failed | gateway CPU µs per request |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for _ in range(args.rounds):
                for name, gateway in gateways.items():
                    print(await read(bench, name, gateway, keys.reader, args.seconds), flush=True)
        finally:
            await bench.teardown()


if __name__ == "__main__":
    asyncio.run(main())
