"""Consumers joining and leaving the group while events keep arriving: counts stay exact.
A downstream consumer, written as a user would, reads the counter topic and sees the final values."""

from __future__ import annotations

import asyncio
import re
import signal
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


def downstream_counters(bootstrap: str, topic: str, group: str, idle_s: float = 2.0,
                        timeout_s: float = 60.0) -> dict[str, dict]:
    """A user's consumer of tally.counters.v1: subscribe, keep the latest JSON value per key."""
    import json

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    latest: dict[str, dict] = {}
    last = time.monotonic()
    deadline = last + timeout_s
    try:
        while time.monotonic() - last < idle_s or not latest:
            assert time.monotonic() < deadline, f"no counter states on {topic} within {timeout_s}s"
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


class Load(threading.Thread):
    """About 600 events a second to the events topic, a tenth of them sent twice, until stopped."""

    def __init__(self, settings: Settings, tenant: str) -> None:
        super().__init__()
        self.settings = settings
        self.tenant = tenant
        self.produced: list = []
        self.stopping = threading.Event()

    def run(self) -> None:
        producer = Producer({"bootstrap.servers": self.settings.kafka_bootstrap, "linger.ms": 5})
        n = 0
        while not self.stopping.is_set():
            chunk = [envelope(self.tenant, n + i, subject=f"customer-{(n + i) % 40}") for i in range(60)]
            for e in chunk + chunk[:6]:
                producer.produce(self.settings.topics.events, e.to_bytes(), e.key())
            producer.flush(10)
            self.produced.extend(chunk)
            n += len(chunk)
            time.sleep(0.1)
        assert producer.flush(30) == 0

    async def finish(self) -> list:
        self.stopping.set()
        await asyncio.to_thread(self.join, 30)
        return list(self.produced)


async def assert_exact(settings: Settings, db: asyncpg.Connection, tenant: str, events: list) -> None:
    assert await event_count(db, tenant) == len(events)
    assert await counter_counts(db, tenant) == expected_counts(events)
    assert await assert_topic_matches_postgres(settings, db, tenant) == len(expected_counts(events))


async def test_members_joining_and_leaving_under_load_keep_counts_exact(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"rebalance-{uuid.uuid4().hex[:8]}"
    settings = isolated.model_copy(update={"batch_max_messages": 200, "processor_metrics_port": 0})
    load = Load(settings, tenant)
    members: list[TallyProcess] = []
    try:
        members.append(TallyProcess("processor-a", ["process"], settings))
        load.start()
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
        events = await load.finish()
        await wait_for(lambda: drained(settings, db), 60, "the last member to drain the topic")
        assert members[2].alive()
    finally:
        load.stopping.set()
        for member in members:
            member.stop()

    assert len(events) > 1000
    await assert_exact(settings, db, tenant, events)

    seen = await asyncio.to_thread(downstream_counters, settings.kafka_bootstrap, settings.topics.counters,
                                   f"{settings.consumer_group}-downstream")
    rows = await db.fetch("select key, value from counters where tenant = $1", tenant)
    assert {k: Decimal(v["value"]) for k, v in seen.items() if v["tenant"] == tenant} == {r["key"]: r["value"] for r in rows}


async def test_a_member_killed_mid_batch_while_another_keeps_committing_loses_nothing_and_counts_nothing_twice(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"killed-{uuid.uuid4().hex[:8]}"
    settings = isolated.model_copy(update={"batch_max_messages": 200, "processor_metrics_port": 0})
    load = Load(settings, tenant)
    survivor = TallyProcess("processor-survivor", ["process"], settings)
    try:
        load.start()
        await asyncio.to_thread(wait_until, lambda: _owns_partitions(survivor), 30, 0.1, "the survivor to own partitions")
        await wait_for(lambda: _persisted(db, tenant), 30, "the survivor's first batch")
        # The doomed member joins, takes partitions in a rebalance, and dies by SIGKILL after its first
        # batch is in PostgreSQL: counters unpublished, offsets uncommitted.
        doomed = TallyProcess("processor-doomed", ["process"], settings, TALLY_CRASH_AT="after_pg_commit")
        assert await asyncio.to_thread(doomed.proc.wait, 60) == -signal.SIGKILL
        doomed.stop()
        taken = _moved(doomed.output(), "assigned")
        assert taken and "batch:" not in doomed.output()
        # Only the session timeout tells the group: the survivor takes the dead member's partitions back.
        await asyncio.to_thread(wait_until, lambda: _assigned_after(survivor.output(), "revoked") >= taken, 60, 0.2,
                                "the survivor to take over the dead member's partitions")
        events = await load.finish()
        await wait_for(lambda: drained(settings, db), 60, "the survivor to drain the topic")
        assert survivor.alive()
    finally:
        load.stopping.set()
        survivor.stop()
    assert len(events) > 1000
    await assert_exact(settings, db, tenant, events)


async def _persisted(db: asyncpg.Connection, tenant: str) -> bool:
    return await event_count(db, tenant) > 0


def _assigned_after(output: str, what: str) -> set[int]:
    """Partitions a member was assigned after it last logged `what` (a revocation)."""
    _, _, after = output.rpartition(what)
    return _moved(after, "assigned")
