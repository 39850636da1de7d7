"""The producer client and OTLP logs beside k6, against one running gateway, in one run.

    .venv/bin/python -m benchmarks.clients [--url http://127.0.0.1:8080] [--seconds 15] [--repeat 3]

Needs the local stack (bash deploy/local/up.sh) and k6 (bash benchmarks/install.sh). Each round runs
k6 with batches of 100 (8 closed-loop users), then `tally.client.TallyClient` from this one process
(batches of 100), then the OpenTelemetry SDK's OTLP/HTTP log exporter (batches of 512), each for the
same time; it prints events/s acked by the gateway and the client's share of k6's rate per round,
and the median over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import uuid
from pathlib import Path

import asyncpg

from benchmarks import loadgen
from tally.ingest.auth import create_key
from tally.client import TallyClient, event
from tally.settings import ROOT, Settings

OUT = ROOT / "benchmarks" / "out"


async def _key(settings: Settings) -> str:
    conn = await asyncpg.connect(settings.database_url)
    try:
        _, secret = await create_key(conn, "bench-clients", "benchmarks", ["events:write", "logs:write"])
    finally:
        await conn.close()
    return secret


def k6_batches(url: str, key: str, seconds: int) -> float:
    OUT.mkdir(parents=True, exist_ok=True)
    load = loadgen.k6("batch", Path(OUT / "k6-clients-batch.json"), URL=url, KEY=key, SCENARIO="batch", MODE="max",
                      VUS=8, BATCH=100, DURATION=f"{seconds}s", RUN=f"clients-{uuid.uuid4().hex[:8]}")
    return load.events_s


def client_events(url: str, key: str, seconds: int) -> float:
    """Events/s the gateway accepted from one process sending as fast as the client takes them."""
    client = TallyClient(url, key, batch_size=100, max_buffer=20_000, idempotency_keys=False)
    started = time.perf_counter()
    n = 0
    while time.perf_counter() - started < seconds:
        client.send(event("bench.client", source="bench-clients", subject=f"customer-{n % 100}", data={"n": n}))
        n += 1
    client.flush(120)
    elapsed = time.perf_counter() - started
    client.close()
    return client.metrics.sent / elapsed


def otlp_logs(url: str, key: str, seconds: int) -> float:
    """Log records/s the OpenTelemetry SDK's OTLP/HTTP exporter got acknowledged."""
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    exported = 0
    exporter = OTLPLogExporter(endpoint=f"{url}/v1/logs", headers={"Authorization": f"Bearer {key}"})
    export = exporter.export

    def counting(batch):  # noqa: ANN001, ANN202
        nonlocal exported
        result = export(batch)
        if result.name == "SUCCESS":
            exported += len(batch)
        return result

    exporter.export = counting
    provider = LoggerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter, max_queue_size=20_000,
                                                              max_export_batch_size=512, schedule_delay_millis=200))
    log = logging.getLogger("bench.otlp")
    log.propagate = False
    log.addHandler(LoggingHandler(logger_provider=provider))
    started = time.perf_counter()
    n = 0
    while time.perf_counter() - started < seconds:
        log.warning("order %d placed", n)
        n += 1
    provider.force_flush(120_000)
    elapsed = time.perf_counter() - started
    provider.shutdown()
    return exported / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    key = asyncio.run(_key(Settings()))
    rounds = []
    for n in range(1, args.repeat + 1):
        print(f"round {n}/{args.repeat}: k6, then the client, then OTLP, {args.seconds} s each", flush=True)
        k6 = k6_batches(args.url, key, args.seconds)
        client = client_events(args.url, key, args.seconds)
        otlp = otlp_logs(args.url, key, args.seconds)
        rounds.append((k6, client, otlp))
        print(f"  k6 batches of 100: {k6:,.0f} events/s; client: {client:,.0f} events/s ({client / k6:.0%} of k6);"
              f" OTLP: {otlp:,.0f} logs/s", flush=True)
    k6s, clients, otlps = zip(*rounds)
    ratios = [c / k for k, c, _ in rounds]
    print(f"median over {len(rounds)}: k6 {statistics.median(k6s):,.0f} events/s"
          f" ({min(k6s):,.0f}-{max(k6s):,.0f}); client {statistics.median(clients):,.0f}"
          f" ({min(clients):,.0f}-{max(clients):,.0f}), {statistics.median(ratios):.0%} of k6"
          f" ({min(ratios):.0%}-{max(ratios):.0%}); OTLP {statistics.median(otlps):,.0f} logs/s"
          f" ({min(otlps):,.0f}-{max(otlps):,.0f})")


if __name__ == "__main__":
    main()
