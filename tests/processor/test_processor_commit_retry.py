"""A commit the group refuses during a rebalance is made again once the group settles, without waiting for
new messages: the committed offsets catch up with what is durable within seconds, so lag does not stay high.

The processor runs in this test's event loop with its real sinks; the store holds the first batch until a
second member (a plain consumer with a slow heartbeat, so the group's second cooperative round waits for
it) has joined. The processor then serves its revocation while handling the next batch, and commits that
batch while the group is still rebalancing: Kafka refuses it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Sequence

import asyncpg
import pytest
from confluent_kafka import Consumer, TopicPartition

from tally.processors.checkpoint import Sinks
from tally.processors.consumer import Processor, ProcessorConfig
from tally.processors.service import ServiceConfig, pool_settings, validator_for
from tally.sinks.base import Record
from tally.sinks.counter_topic import CounterTopicSink
from tally.sinks.dlq_topic import DeadLetterSink
from tally.sinks.kafka import KafkaPublisher
from tally.sinks.maintenance import Maintenance
from tally.sinks.outbox import OutboxRelay
from tally.sinks.postgres import PostgresSink, StoreResult
from tally.settings import Settings
from tests.processor.helpers import envelope, produce, wait_for

REFUSALS = ("ILLEGAL_GENERATION", "REBALANCE_IN_PROGRESS", "UNKNOWN_MEMBER_ID")


class HeldStore:
    """The real PostgreSQL sink, whose first flush waits until the test lets it go."""

    def __init__(self, store: PostgresSink) -> None:
        self._store = store
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def write(self, batch: Sequence[Record]) -> None:
        await self._store.write(batch)

    async def flush(self) -> StoreResult:
        self.reached.set()
        await self.release.wait()
        return await self._store.flush()


class Member(threading.Thread):
    """A second group member that polls and keeps what it is assigned; it never commits."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.assignments: list[set[int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        consumer = Consumer({
            "bootstrap.servers": self.settings.kafka_bootstrap, "group.id": self.settings.consumer_group,
            "enable.auto.commit": False, "partition.assignment.strategy": "cooperative-sticky",
            # Told of the processor's rejoin only by its next heartbeat: the second round takes seconds.
            "heartbeat.interval.ms": 5000, "session.timeout.ms": 30000,
        })
        consumer.subscribe([self.settings.topics.events],
                           on_assign=lambda _c, ps: self.assignments.append({tp.partition for tp in ps}))
        try:
            while not self.stopping.is_set():
                consumer.poll(0.2)
        finally:
            consumer.close()


def committed(settings: Settings, partitions: set[int]) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.consumer_group})
    try:
        tps = consumer.committed([TopicPartition(settings.topics.events, p) for p in sorted(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        consumer.close()


def ends(settings: Settings, partitions: set[int]) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.consumer_group}-x"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(settings.topics.events, p), timeout=10)[1]
                for p in sorted(partitions)}
    finally:
        consumer.close()


@pytest.mark.timeout(180)
async def test_a_commit_refused_during_a_rebalance_is_made_once_the_group_settles_without_new_messages(
    isolated: Settings, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tally.processor")
    tenant = f"refused-{uuid.uuid4().hex[:8]}"
    settings = isolated
    config = ServiceConfig(
        processor=ProcessorConfig(kafka_bootstrap=settings.kafka_bootstrap, group_id=settings.consumer_group,
                                  topic=settings.topics.events),
        database_url=settings.database_url, redis_url=settings.redis_url, redis_prefix=settings.redis_prefix,
        counters_topic=settings.topics.counters, dlq_topic=settings.topics.dlq)
    validator = validator_for(config)
    pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=4, **pool_settings(config))
    publisher = KafkaPublisher(settings.kafka_bootstrap)
    store = HeldStore(PostgresSink(pool, validator.meters.aggregate))
    sinks = Sinks(store=store, relay=OutboxRelay(pool, CounterTopicSink(publisher, settings.topics.counters)),
                  dead_letters=DeadLetterSink(publisher, settings.topics.dlq), maintenance=Maintenance(pool, config.retention))
    processor = Processor(config.processor, validator, sinks)
    member = Member(settings)
    running = asyncio.create_task(processor.run())
    try:
        produce(settings, [envelope(tenant, n, subject=f"s-{n}") for n in range(40)])
        await asyncio.wait_for(store.reached.wait(), 60)
        member.start()
        await wait_for(_true_when(lambda: bool(member.assignments)), 60, "the second member's first round")
        produce(settings, [envelope(tenant, n, subject=f"s-{n}") for n in range(40, 80)])
        store.release.set()
        await wait_for(_true_when(lambda: any(member.assignments[1:])), 60, "the group to settle")
        refusals = [r.getMessage() for r in caplog.records if any(code in r.getMessage() for code in REFUSALS)]
        assert refusals, "no commit was refused during the rebalance: the test did not reach its case"
        kept = {p for p in range(settings.events_partitions)} - set().union(*member.assignments)
        assert kept
        # No new messages: only the processor itself can close the gap.
        want = await asyncio.to_thread(ends, settings, kept)
        await wait_for(_true_when(lambda: committed(settings, kept) == want), 15,
                       f"the committed offsets of {sorted(kept)} to reach {want}")
    finally:
        processor.stop()
        await asyncio.wait_for(running, 60)
        member.stopping.set()
        await asyncio.to_thread(member.join, 30)
        publisher.close()
        await pool.close()


def _true_when(check):  # noqa: ANN001, ANN202
    async def predicate() -> bool:
        return await asyncio.to_thread(check)
    return predicate
