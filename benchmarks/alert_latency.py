"""`python -m benchmarks.alert_latency`: from a log record's receipt to its alert transition on tally.alerts.v1,
under a steady log load (default 5,000 records/s).

One gateway, one processor and `tally alerts` on an isolated slice of the running services. k6 posts the
load (info, warn and error records of 8 services, 100 per request). Beside it, a probe posts one `fatal`
record for a service of its own every `--every` seconds; a rule fires per service at the first fatal
record, so each probe makes exactly one firing. The latency is the time from the probe's 202 to the
firing's arrival on the topic (read by a consumer in this process). A second rule (errors per service
over a threshold never reached) keeps the evaluator working on the load's windows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import uuid
from datetime import datetime, timezone

import asyncpg
import httpx
import orjson
from confluent_kafka import Consumer, TopicPartition

from tally.alerts import stored
from benchmarks import loadgen
from benchmarks.stack import OUT, TALLY, Bench
from tally.sealed import SecretBox
from tally.schemas.alerts import AlertRule
from tally.settings import Settings

RULES = [
    {"id": "fatal-per-service", "name": "A fatal record", "filter": {"level": "fatal"}, "group_by": ["service"],
     "threshold": 0, "window": "1m", "every": "1s"},
    {"id": "errors-per-service", "name": "Error flood", "filter": {"level": "error"}, "group_by": ["service"],
     "threshold": 10**9, "window": "5m", "every": "1s"},
]


class Arrivals:
    """By probe service, when its first counter window arrived on tally.counters.v1 (the processor's part) and
    when its firing arrived on tally.alerts.v1."""

    def __init__(self, bootstrap: str, alerts_topic: str, counters_topic: str) -> None:
        self.seen: dict[str, float] = {}
        self.counted: dict[str, float] = {}
        self._alerts_topic = alerts_topic
        self._stop = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-alerts-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self._consumer.assign([TopicPartition(topic, p, 0) for topic in (alerts_topic, counters_topic)
                               for p in self._consumer.list_topics(topic, timeout=10).topics[topic].partitions])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(100, 0.05):
                if message.error() is not None:
                    continue
                value = orjson.loads(message.value())
                if message.topic() != self._alerts_topic:
                    if value["meter"] == "logs" and (value["subject"] or "").startswith("probe-"):
                        self.counted.setdefault(value["subject"], time.monotonic())
                elif value["type"] == "alert.firing" and value["rule"]["id"] == "fatal-per-service":
                    self.seen.setdefault(value["group"]["service"], time.monotonic())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


async def probe(url: str, key: str, run: str, seconds: float, every_s: float) -> dict[str, float]:
    """Post one fatal record for a new service every `every_s`; returns the 202's time per service."""
    acked: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
        began = time.monotonic()
        n = 0
        while time.monotonic() - began < seconds:
            service = f"probe-{run}-{n}"
            record = {"service": service, "level": "fatal", "message": "probe", "id": f"{run}-probe-{n}",
                      "time": datetime.now(timezone.utc).isoformat()}
            answer = await client.post("/v1/logs", content=orjson.dumps([record]),
                                       headers={"content-type": "application/json"})
            if answer.status_code == 202:
                acked[service] = time.monotonic()
            n += 1
            await asyncio.sleep(max(0.0, began + n * every_s - time.monotonic()))
    return acked


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=5000, help="log records per second of background load")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between probes")
    args = parser.parse_args(argv)
    bench = Bench.create(Settings())
    settings = bench.settings.model_copy(update={"processor_metrics_port": 0, "jobs_metrics_port": 0,
                                                 "alerts_min_every_s": 1})  # the rules below run every second
    try:
        await bench.setup()
        bench.topics(settings)
        conn = await asyncpg.connect(settings.database_url)
        try:
            for rule in RULES:
                await stored.save(conn, "bench", AlertRule.model_validate(rule), SecretBox(settings.secrets_key))
        finally:
            await conn.close()
        gateway = bench.gateway(settings)
        bench.processor(settings)
        bench.start("alerts", [*TALLY, "alerts"], settings)
        url = f"http://127.0.0.1:{gateway.port}"
        arrivals = Arrivals(settings.kafka_bootstrap, settings.topics.alerts, settings.topics.counters)
        print(f"load {args.rate:,} logs/s for {args.seconds} s, a probe every {args.every} s", flush=True)
        load = asyncio.to_thread(loadgen.k6, "gateway", OUT / "alert-latency-k6.json", SCENARIO="logs", MODE="rate",
                                 URL=url, KEY=bench.key, RUN=bench.run, DURATION=f"{args.seconds}s",
                                 RATE=max(1, args.rate // 100), BATCH=100, P95_MS=1000, P99_MS=5000)
        loaded, acked = await asyncio.gather(load, probe(url, bench.key, bench.run, args.seconds, args.every))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(arrivals.seen) < len(acked):
            await asyncio.sleep(0.2)
        arrivals.close()
        latencies = sorted(arrivals.seen[s] - t for s, t in acked.items() if s in arrivals.seen)
        counted = sorted(arrivals.counted[s] - t for s, t in acked.items() if s in arrivals.counted)
        missing = len(acked) - len(latencies)
        print(f"background: {loaded.events_s:,.0f} logs/s accepted (k6 p99 {loaded.p99_ms:.1f} ms)")
        for leg, values in (("receipt → its counter window on tally.counters.v1", counted),
                            ("receipt → alert on tally.alerts.v1", latencies)):
            print(f"{leg}, {len(values)} probes: p50 {percentile(values, 50) * 1000:,.0f} ms, "
                  f"p95 {percentile(values, 95) * 1000:,.0f} ms, p99 {percentile(values, 99) * 1000:,.0f} ms, "
                  f"max {values[-1] * 1000:,.0f} ms", flush=True)
        print(f"missing alerts: {missing}")
        return 0 if missing == 0 else 1
    finally:
        await bench.teardown()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
