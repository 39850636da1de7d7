"""Kafka's side of the benchmarks: events to drain, the produce and consume ceilings, consumer lag."""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from tally.settings import ROOT

KAFKA_LIBS = ROOT / ".local" / "kafka"
TENANT = "bench"


@dataclass
class Loaded:
    """What was put on a topic to drain: messages in all, distinct dedup keys, seconds it took."""

    topic: str
    messages: int
    distinct: int
    seconds: float


def envelope(n: int, run: str, received_at: datetime) -> tuple[bytes, bytes]:
    """One event as the gateway publishes it (key, value); n picks its id and subject."""
    subject = f"customer-{n % 500}"
    value = {
        "specversion": "1.0", "id": f"{run}-{n}", "source": "bench/drain", "type": "api.request",
        "time": (received_at - timedelta(milliseconds=n % 1000)).isoformat(), "subject": subject,
        "data": {"tokens": 1 + n % 50, "model": "m-small", "region": "eu"},
        "tenant": TENANT, "received_at": received_at.isoformat(),
    }
    return f"{TENANT}/{subject}".encode(), orjson.dumps(value)


Message = tuple[bytes, bytes, list[tuple[str, bytes]]]  # key, value, headers


def load(bootstrap: str, topic: str, run: str, count: int, duplicate_share: float,
         message: Callable[[int], Message] | None = None) -> Loaded:
    """Produce `count` messages of which a share repeat an earlier id: a bare confluent-kafka loop.
    `message(n)` makes the nth distinct one; by default envelope()'s api.request events."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "compression.type": "lz4", "linger.ms": 20, "batch.num.messages": 10000,
                         "queue.buffering.max.messages": 500000})
    rng = random.Random(7)
    now = datetime.now(timezone.utc)
    headers = [("tenant", TENANT.encode()), ("content-type", b"application/cloudevents+json"),
               ("schema-version", b"1")]
    make = message or (lambda n: (*envelope(n, run, now), headers))
    distinct = 0
    start = time.perf_counter()
    for _ in range(count):
        if distinct and rng.random() < duplicate_share:
            n = rng.randrange(distinct)
        else:
            n, distinct = distinct, distinct + 1
        key, value, extra = make(n)
        while True:
            try:
                producer.produce(topic, value, key, headers=extra)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError(f"the loader could not deliver every message to {topic}")
    return Loaded(topic, count, distinct, time.perf_counter() - start)


def sample_payloads(path: Path, run: str, count: int = 1000) -> Path:
    """Real event payloads, one a line, for kafka-producer-perf-test's --payload-file."""
    now = datetime.now(timezone.utc)
    path.write_bytes(b"\n".join(envelope(n, run, now)[1] for n in range(count)))
    return path


def produce_ceiling(bootstrap: str, topic: str, payloads: Path, records: int) -> dict[str, float]:
    """Kafka's own ProducerPerformance with the gateway's durability settings (acks=all, idempotent)."""
    libs = next(KAFKA_LIBS.glob("libs-*"))
    argv = ["java", "-Xmx512m", "-cp", f"{libs}/*", "org.apache.kafka.tools.ProducerPerformance",
            "--topic", topic, "--num-records", str(records), "--throughput", "-1", "--payload-file", str(payloads),
            "--producer-props", f"bootstrap.servers={bootstrap}", "acks=all", "enable.idempotence=true",
            "compression.type=lz4", "linger.ms=5", "batch.size=262144"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180).stdout
    final = [line for line in out.splitlines() if "records sent" in line][-1]
    # "N records sent, R records/sec (M MB/sec), A ms avg latency, X ms max latency, P ms 50th, P ms 95th, ..."
    def figure(pattern: str) -> float:
        match = re.search(r"([\d.]+) " + pattern, final)
        return float(match[1]) if match else float("nan")

    return {"records": figure("records sent"), "events_s": figure("records/sec"), "mb_s": figure("MB/sec"),
            "avg_ms": figure("ms avg latency"), "p50_ms": figure("ms 50th"), "p95_ms": figure("ms 95th"),
            "p99_ms": figure("ms 99th")}


def consume_ceiling(bootstrap: str, topic: str, group: str, expected: int, timeout_s: float = 120) -> dict[str, float]:
    """A bare confluent-kafka consume of the whole topic, in batches, values parsed as JSON."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    consumer.subscribe([topic])
    seen = 0
    first = 0.0
    deadline = time.monotonic() + timeout_s
    start = time.perf_counter()
    try:
        while seen < expected and time.monotonic() < deadline:
            asked = time.perf_counter()
            batch = consumer.consume(5000, 0.5)
            if batch and not first:
                first = asked  # the first batch's fetch counts: the rate covers every message it reports
            for msg in batch:
                if not msg.error():
                    orjson.loads(msg.value())
                    seen += 1
    finally:
        consumer.close()
    end = time.perf_counter()
    return {"messages": seen, "events_s": seen / max(end - (first or start), 1e-9),
            "startup_s": (first or end) - start}


class Lag:
    """The group's committed offsets against the topic's end, summed over partitions."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
        meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
        self._partitions = [TopicPartition(topic, p) for p in meta.partitions]

    def sample(self) -> tuple[int, int]:
        """(end offsets, committed offsets), each summed over the topic's partitions."""
        end = sum(self._consumer.get_watermark_offsets(tp, timeout=5, cached=False)[1] for tp in self._partitions)
        committed = sum(max(tp.offset, 0) for tp in self._consumer.committed(self._partitions, timeout=5))
        return end, committed

    def close(self) -> None:
        self._consumer.close()


class LagSampler:
    """Samples end and committed offsets twice a second in the background: accepted and processed over time."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self._lag = Lag(bootstrap, group, topic)
        self._task: asyncio.Task[None] | None = None
        self.series: list[tuple[float, int, int]] = []  # (unix time, end offsets, committed offsets)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            end, committed = await asyncio.to_thread(self._lag.sample)
            self.series.append((round(time.time(), 2), end, committed))
            await asyncio.sleep(0.5)

    def latest(self) -> tuple[float, int, int]:
        return self.series[-1] if self.series else (time.time(), 0, 0)

    async def until_drained(self, since: tuple[float, int, int], timeout_s: float) -> dict[str, float | bool]:
        """Wait until the group committed everything on the topic, then the rate at which it processed
        what arrived after the sample `since` (events/s from `since` to the drained sample)."""
        called = time.time()
        while time.time() - called < timeout_s:
            at, end, committed = self.latest()
            if at > called and committed >= end:
                return {"drained": True, "drain_s": at - called, "events": committed - since[2],
                        "events_s": (committed - since[2]) / max(at - since[0], 1e-9)}
            await asyncio.sleep(0.2)
        return {"drained": False, "drain_s": timeout_s}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._lag.close()


def distinct_in_topic(bootstrap: str, topic: str, group: str, idle_s: float = 3.0) -> dict[str, int]:
    """Read the whole topic: how many messages it holds and how many distinct dedup keys."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    consumer.subscribe([topic])
    keys: set[tuple[str, str, str]] = set()
    messages = 0
    quiet_since = time.monotonic()
    try:
        while time.monotonic() - quiet_since < idle_s:
            batch = consumer.consume(5000, 0.5)
            if batch:
                quiet_since = time.monotonic()
            for msg in batch:
                if not msg.error():
                    event = orjson.loads(msg.value())
                    keys.add((event["tenant"], event["source"], event["id"]))
                    messages += 1
    finally:
        consumer.close()
    return {"messages": messages, "distinct": len(keys)}
