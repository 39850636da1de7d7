"""The processor loop: one consumer-group member on the events topic.

Per batch: (1) decode and validate, poison set aside as dead letters (processors.batch); then the
checkpoint (processors.checkpoint) (2) writes it to PostgreSQL, (3) publishes dead letters and counter
states, (4) commits offsets. A failing step is retried with backoff while the partitions are paused;
nothing is committed until every step before it succeeded, so a crash anywhere re-delivers work that
dedup then recognises.

Every call on the Kafka consumer runs on one worker thread, so rebalance callbacks run there
too, and only while the loop polls: between batches, or while a failed step waits to retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from tally.processors import metrics
from tally.processors.batch import Batch, Validator
from tally.processors.checkpoint import TP, Checkpoint, Sinks, retriable_commit_error
from tally.processors.retry import Abandoned, retrying

log = logging.getLogger("tally.processor")

T = TypeVar("T")
_VALIDATE_CHUNK = 1000


@dataclass(frozen=True)
class ProcessorConfig:
    kafka_bootstrap: str
    group_id: str
    topic: str
    batch_max_messages: int = 20000
    batch_max_wait_s: float = 0.2
    retry_initial_s: float = 0.1
    retry_max_s: float = 10.0
    idle_relay_s: float = 5.0
    maintenance_every_s: float = 6 * 3600
    # Longest single attempt of a step: below max.poll.interval.ms, so a hung attempt is given up and
    # retried (the consumer polls between attempts) before the group evicts this member.
    attempt_timeout_s: float = 120.0
    max_poll_interval_ms: int = 300000
    crash_at: str = ""

    def __post_init__(self) -> None:
        if self.attempt_timeout_s * 1000 >= self.max_poll_interval_ms:
            raise ValueError("attempt_timeout_s must be shorter than max.poll.interval.ms")


def consumer_config(config: ProcessorConfig, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "bootstrap.servers": config.kafka_bootstrap,
        "group.id": config.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": config.max_poll_interval_ms,
        "fetch.min.bytes": 1,
        "queued.max.messages.kbytes": 65536,
    }
    settings.update(overrides)
    return settings


class Processor:
    def __init__(self, config: ProcessorConfig, validator: Validator, sinks: Sinks,
                 refresh_meters: Callable[[], Awaitable[object]] | None = None) -> None:
        self.config = config
        self.validator = validator
        self.sinks = sinks
        self._refresh_meters = refresh_meters
        self._consumer = Consumer(consumer_config(config))
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="kafka-consumer")
        self._stopping = asyncio.Event()
        self.checkpoint = Checkpoint(self._consumer, sinks, self._step, self._kafka, config.crash_at,
                                     self._current_meters if refresh_meters is not None else None)
        self._held: list[Message] = []  # polled while a failed step waited; processed next
        self._paused = False

    # -- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await self._kafka(partial(self._consumer.subscribe, [self.config.topic], on_assign=self._on_assign,
                                  on_revoke=self._on_revoke, on_lost=self._on_lost))
        last_relay, last_upkeep = 0.0, float("-inf")  # storage is looked after at start
        ahead: asyncio.Task[Batch | None] | None = None
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if now - last_upkeep > self.config.maintenance_every_s:
                    await self._step("maintenance", self._maintain, set())
                    last_upkeep = now
                batch = await (ahead or self._prepare())
                ahead = None
                if batch is not None:
                    # The next batch is consumed and validated while this one is written: Python works
                    # while PostgreSQL and Kafka do. It is handled strictly after this one.
                    ahead = asyncio.create_task(self._prepare())
                    if not await self._handle(batch):
                        later, ahead = await ahead, None
                        self._read_again(batch, later)
                    last_relay = time.monotonic()
                    continue
                # Idle: the poll just made served any rebalance, so a commit it refused can be made now.
                await self.checkpoint.commit_refused()
                if now - last_relay > self.config.idle_relay_s:
                    # Windows queued by a member that crashed after its commit are published here.
                    await self.checkpoint.publish_counters(set())
                    last_relay = time.monotonic()
        except Abandoned as exc:
            log.info("stopping with the batch in flight abandoned (%s)", exc)
        finally:
            if ahead is not None:
                await asyncio.gather(ahead, return_exceptions=True)  # uncommitted: read again after a restart
            await self._kafka(self._consumer.close)
            self._thread.shutdown(wait=True)
            log.info("processor closed")

    async def _kafka(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def _next_messages(self) -> list[Message]:
        if self._held:
            messages, self._held = self._held, []
        else:
            messages = await self._kafka(partial(self._consumer.consume, self.config.batch_max_messages,
                                                 self.config.batch_max_wait_s))
        good = []
        for msg in messages:
            if msg.error() is not None:
                log.warning("consumer error: %s", msg.error())
            elif (msg.topic(), msg.partition()) in self.checkpoint.assigned:
                good.append(msg)
        return good

    async def _prepare(self) -> Batch | None:
        """Consume and validate the next batch, yielding to the event loop between chunks so that the
        batch being written keeps its round trips going."""
        messages = await self._next_messages()
        if not messages:
            return None
        batch = Batch()
        now = datetime.now(timezone.utc)
        for i in range(0, len(messages), _VALIDATE_CHUNK):
            self.validator.batch(messages[i:i + _VALIDATE_CHUNK], now, into=batch)
            await asyncio.sleep(0)
        return batch

    def _read_again(self, abandoned: Batch, later: Batch | None) -> None:
        """Queue an abandoned batch's messages, then those consumed after it, in consume order."""
        messages = abandoned.messages + (later.messages if later is not None else []) + self._held
        self._held = [m for m in messages if (m.topic(), m.partition()) in self.checkpoint.assigned]

    # -- one batch -----------------------------------------------------------------------------

    async def _handle(self, batch: Batch) -> bool:
        """Write, publish and commit one batch; False if it was abandoned because partitions left."""
        started = time.perf_counter()
        metrics.CONSUMED.inc(batch.consumed)
        metrics.BATCH_SIZE.observe(batch.consumed)
        try:
            stored = await self.checkpoint.commit(batch)
        except Abandoned as exc:
            reason = "stopping" if self._stopping.is_set() else "revoked"
            metrics.ABANDONED.labels(reason).inc()
            if reason == "stopping":
                raise
            log.info("batch abandoned: %s; its remaining partitions are read again", exc)
            return False
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.LATE.inc(batch.late)
        new = len(stored.new) if stored else 0
        if stored:
            metrics.observe_end_to_end(datetime.now(timezone.utc), [r.envelope.received_at for r in stored.new])
        log.info("batch: %d consumed, %d new, %d duplicate, %d dead-lettered, %d late", batch.consumed, new,
                 batch.consumed - new - len(batch.dead_letters), len(batch.dead_letters), batch.late)
        return True

    async def _current_meters(self, batch: Batch) -> None:
        """Before each attempt to store a batch: the meter catalog polled, and the batch validated again if it was
        validated under an older revision (a transaction that finds the catalog moved rolls back and comes here)."""
        await self._refresh_meters()
        if batch.revision != self.validator.revision:
            self.validator.again(batch, datetime.now(timezone.utc))

    async def _maintain(self) -> None:
        # Batches wait while this runs: prune for a part of one attempt and carry on at the next run.
        upkeep = await self.sinks.maintenance.run(budget_s=self.config.attempt_timeout_s / 4)
        log.info("maintenance: %s", upkeep.summary())

    # -- retries: the batch held, partitions paused, the consumer kept alive ------------------------

    async def _step(self, what: str, call: Callable[[], Awaitable[T]], in_flight: set[TP],
                    commit: bool = False) -> T:
        """Run one step of a batch until it succeeds, polling between attempts; its result."""
        retry = retrying(what, partial(self._hold, in_flight), lambda step: metrics.RETRIES.labels(step).inc(),
                         self.config.retry_initial_s, self.config.retry_max_s)
        if commit:
            retry = retry.copy(retry=retriable_commit_error)
        try:
            async for attempt in retry:
                with attempt:
                    async with asyncio.timeout(self.config.attempt_timeout_s):  # wait_for may swallow a cancel (3.11)
                        result = await call()
            return result
        finally:
            if self._paused:
                await self._kafka(self._resume)

    async def _hold(self, in_flight: set[TP], seconds: float) -> None:
        """Wait out a backoff while polling, so the group keeps us and rebalances are served."""
        deadline = time.monotonic() + seconds
        while True:
            if self._stopping.is_set():
                raise Abandoned("shutting down")
            left = self.checkpoint.revoked & in_flight
            if left:
                raise Abandoned(f"partitions {sorted(left)} revoked")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await self._kafka(self._pause_all)
            polled = await self._kafka(partial(self._consumer.consume, self.config.batch_max_messages,
                                               min(remaining, 0.5)))
            self._held.extend(m for m in polled if m.error() is None)

    def _pause_all(self) -> None:
        assignment = self._consumer.assignment()
        if assignment:
            self._consumer.pause(assignment)
        self._paused = True

    def _resume(self) -> None:
        assignment = self._consumer.assignment()
        if assignment:
            self._consumer.resume(assignment)
        self._paused = False

    # -- rebalance callbacks (run on the consumer thread) ----------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.checkpoint.on_assign(partitions)
        log.info("assigned %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.checkpoint.on_revoke(partitions)
        self._leave(consumer, partitions)
        log.info("revoked %s", sorted(tp.partition for tp in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.checkpoint.on_lost(partitions)
        self._leave(consumer, partitions)
        log.warning("lost %s", sorted(tp.partition for tp in partitions))

    def _leave(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # librdkafka keeps a partition's pause across revoke and re-assignment: one leaving while a failed
        # step holds the batch would come back paused and never be fetched again, so resume it on the way out.
        try:
            consumer.resume(partitions)
        except KafkaException as exc:
            log.warning("resume on revoke failed: %s", exc)
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._held = [m for m in self._held if (m.topic(), m.partition()) not in gone]
