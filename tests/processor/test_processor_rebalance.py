"""Consumers joining and leaving the group while events keep arriving: counts stay exact.
A downstream consumer, written as a user would, reads the counter topic and sees the final values."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from decimal import Decimal

import asyncpg
from confluent_kafka import Consumer, Producer

from tally.settings import Settings
from tests.processor.helpers import (
    assert_topic_matches_postgres, counter_counts, drained, envelope, event_count, expected_counts, wait_for,
)
from tests.support import TallyProcess, wait_until


def downstream_counters(bootstrap: str, topic: str, group: str, idle_s: float = 2.0) -> dict[str, dict]:
    """A user's consumer of tally.counters.v1: subscribe, keep the latest JSON value per key."""
    import json

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    latest: dict[str, dict] = {}
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s or not latest:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            latest[msg.key().decode()] = json.loads(msg.value())
            last = time.monotonic()
    finally:
        consumer.close()
    return latest


def _owns_partitions(process: TallyProcess) -> bool:
    return re.search(r"assigned \[\d", process.output()) is not None


def _moved(output: str, what: str) -> set[int]:
    """Every partition a member logged as assigned (or revoked) so far."""
    return {int(p) for found in re.findall(rf"{what} \[([\d, ]*)\]", output) for p in found.split(",") if p.strip()}


async def test_members_joining_and_leaving_under_load_keep_counts_exact(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"rebalance-{uuid.uuid4().hex[:8]}"
    settings = isolated.model_copy(update={"batch_max_messages": 200, "processor_metrics_port": 0})
    produced: list = []
    stop_load = threading.Event()

    def load() -> None:
        """About 600 events a second, a tenth of them sent twice, until told to stop."""
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 5})
        n = 0
        while not stop_load.is_set():
            chunk = [envelope(tenant, n + i, subject=f"customer-{(n + i) % 40}") for i in range(60)]
            for e in chunk + chunk[:6]:
                producer.produce(settings.topics.events, e.to_bytes(), e.key())
            producer.flush(10)
            produced.extend(chunk)
            n += len(chunk)
            time.sleep(0.1)
        assert producer.flush(30) == 0

    members: list[TallyProcess] = []
    thread = threading.Thread(target=load)
    try:
        members.append(TallyProcess("processor-a", ["process"], settings))
        thread.start()
        await asyncio.to_thread(wait_until, lambda: _owns_partitions(members[0]), 30, 0.1, "a to own the partitions")
        members.append(TallyProcess("processor-b", ["process"], settings))
        await asyncio.to_thread(wait_until, lambda: _owns_partitions(members[1]), 30, 0.1, "b to share the partitions")
        # Only a rebalance moves partitions from a running member to another: a gave up what b took.
        assert _moved(members[0].output(), "revoked") == _moved(members[1].output(), "assigned") != set()
        assert members[0].stop() == 0
        members.append(TallyProcess("processor-c", ["process"], settings))
        await asyncio.to_thread(wait_until, lambda: _owns_partitions(members[2]), 30, 0.1, "c to share the partitions")
        # c took partitions that a or b had given up
        released = _moved(members[0].output(), "revoked") | _moved(members[1].output(), "revoked")
        assert set() != _moved(members[2].output(), "assigned") <= released
        assert members[1].stop() == 0
        await asyncio.sleep(1.0)
        stop_load.set()
        await asyncio.to_thread(thread.join, 30)
        await wait_for(lambda: drained(settings, db), 60, "the last member to drain the topic")
        assert members[2].alive()
    finally:
        stop_load.set()
        for member in members:
            member.stop()

    events = list(produced)
    assert len(events) > 1000
    assert await event_count(db, tenant) == len(events)
    assert await counter_counts(db, tenant) == expected_counts(events)
    assert await assert_topic_matches_postgres(settings, db, tenant) == len(expected_counts(events))

    seen = await asyncio.to_thread(downstream_counters, settings.kafka_bootstrap, settings.topics.counters,
                                   f"{settings.consumer_group}-downstream")
    rows = await db.fetch("select key, value from counters where tenant = $1", tenant)
    assert {k: Decimal(v["value"]) for k, v in seen.items() if v["tenant"] == tenant} == {r["key"]: r["value"] for r in rows}
