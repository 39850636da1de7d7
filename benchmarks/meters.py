"""`python -m benchmarks.meters`: the processor's drain rate with the minute meter of event-type alert rules,
or a UNIQUE_COUNT meter, beside the `events` meter, next to the `events` meter alone, in one run.

Each configuration gets its own database, topics and consumer group on the running services, the same
events (with duplicates), and one `tally process`; the rate is taken from its committed offsets, from
the first commit to the last. Every configuration is checked exact against a recomputation in SQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import asyncpg

from benchmarks import kafka_bench, pg_bench
from benchmarks.stack import VENV_BIN, Bench
from tally.settings import Settings

DEFAULT = {"slug": "events", "event_type": "*", "group_by": {"type": "type"}, "windows": ["hour", "day"]}
CONFIGS: dict[str, dict[str, Any] | None] = {
    "default": None,
    # The built-in meter event-type alert rules read: per type and minute, tenant-wide.
    "default+event_types": {"slug": "event_types", "event_type": "*", "group_by": {"type": "type"},
                            "per_subject": False, "windows": ["minute"]},
    # Active customers per tenant: few distinct values, every window shared by both writers.
    "default+unique_subject": {"slug": "unique", "aggregation": "UNIQUE_COUNT", "value_path": "subject",
                               "per_subject": False, "windows": ["hour", "day"]},
    # The worst case for storage: every event a new value in each of its windows.
    "default+unique_id": {"slug": "unique", "aggregation": "UNIQUE_COUNT", "value_path": "id",
                          "per_subject": False, "windows": ["hour", "day"]},
}


def scoped_bench(base: Settings, run: str, name: str) -> Bench:
    """A Bench of its own (database, topics, group) for one configuration."""
    bench = Bench.create(base)
    bench.run = f"{run}{name.replace('+', '_')}"
    tag = bench.run.replace("_", "-")
    database = bench.settings.database_url.rsplit("/", 1)[0] + f"/tally_bench_{bench.run}"
    bench.settings = bench.settings.model_copy(update={
        "database_url": database, "topic_prefix": f"bench.{tag}.", "redis_prefix": f"bench:{tag}:",
        "consumer_group": f"bench-{tag}",
    })
    return bench


async def drain(bench: Bench, settings: Settings, messages: int, timeout_s: float) -> dict[str, float]:
    lag = kafka_bench.Lag(settings.kafka_bootstrap, settings.consumer_group, settings.topics.events)
    began = time.monotonic()
    # `python -m tally.cli` from the checkout, like the tests: the code under test, whatever `tally` is installed.
    service = bench.start("processor-meters", [str(VENV_BIN / "python"), "-m", "tally.cli", "process"], settings)
    first = first_count = 0.0
    committed = 0
    try:
        while time.monotonic() - began < timeout_s:
            end, committed = lag.sample()
            now = time.monotonic()
            if committed and not first:
                first, first_count = now, committed
            if committed >= end:
                if committed == first_count:
                    raise RuntimeError("drained in one commit: give more --events to measure a rate")
                return {"events_s": (committed - first_count) / (now - first), "seconds": now - began,
                        "first_commit_s": first - began, "messages": messages}
            if service.process.poll() is not None:
                raise RuntimeError("the processor exited; see benchmarks/out/logs/")
            await asyncio.sleep(0.1)
        raise RuntimeError(f"not drained in {timeout_s}s ({committed} of {messages})")
    finally:
        bench.stop(service)
        lag.close()


async def unique_exact(url: str, value_path: str) -> bool:
    """The UNIQUE_COUNT windows equal count(distinct …) over the stored events, per hour and day."""
    column = {"subject": "subject", "id": "id"}[value_path]
    conn = await asyncpg.connect(url)
    try:
        for window in ("hour", "day"):
            expected = {r[0]: r[1] for r in await conn.fetch(
                f"select date_trunc('{window}', time at time zone 'UTC') at time zone 'UTC', count(distinct {column})"
                " from events where counted group by 1")}
            found = {r[0]: int(r[1]) for r in await conn.fetch(
                "select window_start, value from counters where meter = 'unique' and window_name = $1", window)}
            if found != expected:
                return False
        return True
    finally:
        await conn.close()


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000, help="messages per configuration (10%% duplicates)")
    parser.add_argument("--drain-timeout", type=int, default=300)
    args = parser.parse_args(argv)
    base = Settings()
    run = time.strftime("%m%d%H%M%S")
    results: dict[str, dict[str, Any]] = {}
    for name, extra in CONFIGS.items():
        bench = scoped_bench(base, run, name)
        meters = {"meters": [DEFAULT] + ([extra] if extra else [])}
        settings = bench.settings.model_copy(update={"meters": json.dumps(meters), "processor_metrics_port": 0})
        try:
            await bench.setup()
            bench.topics(settings)
            loaded = await asyncio.to_thread(kafka_bench.load, settings.kafka_bootstrap, settings.topics.events,
                                             bench.run, args.events, 0.1)
            figures = await drain(bench, settings, loaded.messages, args.drain_timeout)
            check = await pg_bench.verify(settings.database_url, loaded.distinct)
            exact = check["exact"] and (extra is None or "value_path" not in extra
                                        or await unique_exact(settings.database_url, extra["value_path"]))
            results[name] = {**figures, "exact": exact}
            print(f"{name:24s} {figures['events_s']:>9,.0f} events/s once running, "
                  f"{figures['seconds']:5.1f} s in all, exact: {exact}", flush=True)
        finally:
            await bench.teardown()
    baseline = results["default"]["events_s"]
    for name, figures in results.items():
        print(f"{name:24s} {figures['events_s'] / baseline:6.2f} × the default meter alone")
    return 0 if all(f["exact"] for f in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
