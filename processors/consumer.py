"""The processor loop: one consumer-group member on the events topic.

Per batch, in this order: (1) decode and validate, poison set aside as dead letters; (2) one
PostgreSQL transaction claims dedup keys, stores new events, applies meters, upserts counter
windows and queues them in the outbox; (3) dead letters and counter states are published and
acked; (4) offsets are committed. A failing step is retried with backoff while the partitions
are paused; nothing is committed until every step before it succeeded, so a crash anywhere
re-delivers work that dedup then recognises.

Every call on the Kafka consumer runs on one worker thread, so rebalance callbacks run there
too, and only while the loop polls: between batches, or while a failed step waits to retry.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from processors import metrics
from processors.batch import Batch, Validator
from processors.dlq import conflict_letter, dead_letter
from processors.faults import crash_point
from processors.retry import Abandoned, retrying
from schemas.counters import PublishedState
from schemas.deadletter import STORE_STAGE, DeadLetter
from sinks.dlq_topic import DeadLetterSink
from sinks.maintenance import Maintenance
from sinks.outbox import OutboxRelay
from sinks.postgres import PostgresSink
from sinks.redis_cache import RedisCounterCache

log = logging.getLogger("tally.processor")

T = TypeVar("T")
TP = tuple[str, int]
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


@dataclass(frozen=True)
class Sinks:
    store: PostgresSink
    relay: OutboxRelay
    dead_letters: DeadLetterSink
    maintenance: Maintenance
    cache: RedisCounterCache | None = None


class Processor:
    def __init__(self, config: ProcessorConfig, validator: Validator, sinks: Sinks) -> None:
        self.config = config
        self.validator = validator
        self.sinks = sinks
        self._consumer = Consumer(consumer_config(config))
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="kafka-consumer")
        self._stopping = asyncio.Event()
        self._assigned: set[TP] = set()
        self._revoked: set[TP] = set()  # revoked or lost while a batch was in flight
        self._uncommitted: dict[TP, int] = {}  # next offset per partition, durable but not yet committed
        self._held: list[Message] = []  # polled while a failed step waited; processed next
        self._paused = False

    # -- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

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
                elif now - last_relay > self.config.idle_relay_s:
                    # Windows queued by a member that crashed after its commit are published here.
                    await self._step("publish counters", self._publish_counters, set())
                    last_relay = time.monotonic()
        except Abandoned as exc:
            log.info("stopping with the batch in flight abandoned (%s)", exc)
        finally:
            if ahead is not None:
                await asyncio.gather(ahead, return_exceptions=True)  # uncommitted: read again after a restart
            await self._kafka(self._consumer.close)
            self._thread.shutdown(wait=True)
            if self.sinks.cache is not None:
                await self.sinks.cache.close()
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
            elif (msg.topic(), msg.partition()) in self._assigned:
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
        self._held = [m for m in messages if (m.topic(), m.partition()) in self._assigned]

    # -- one batch -----------------------------------------------------------------------------

    async def _handle(self, batch: Batch) -> bool:
        """Write, publish and commit one batch; False if it was abandoned because partitions left."""
        started = time.perf_counter()
        self._revoked.clear()
        in_flight = set(batch.offsets)
        metrics.CONSUMED.inc(batch.consumed)
        metrics.BATCH_SIZE.observe(batch.consumed)
        try:
            if batch.records:
                await self._step("postgres", partial(self._store, batch.records), in_flight)
                batch.dead_letters.extend(self._store_letters(batch))
            crash_point("after_pg_commit", self.config.crash_at)
            if batch.dead_letters:
                await self._step("dead letters", partial(self._send_dead_letters, batch), in_flight)
            await self._step("publish counters", self._publish_counters, in_flight)
            crash_point("after_publish", self.config.crash_at)
        except Abandoned as exc:
            reason = "stopping" if self._stopping.is_set() else "revoked"
            metrics.ABANDONED.labels(reason).inc()
            if reason == "stopping":
                raise
            log.info("batch abandoned: %s; its remaining partitions are read again", exc)
            return False
        for (topic, partition), offset in batch.offsets.items():
            if (topic, partition) in self._assigned:
                self._uncommitted[(topic, partition)] = offset + 1
        await self._commit()
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.LATE.inc(batch.late)
        store = self.sinks.store.last if batch.records else None
        new = len(store.new) if store else 0
        if store:
            committed_at = datetime.now(timezone.utc)
            for record in store.new:
                metrics.END_TO_END_SECONDS.observe((committed_at - record.envelope.received_at).total_seconds())
        log.info("batch: %d consumed, %d new, %d duplicate, %d dead-lettered, %d late", batch.consumed, new,
                 batch.consumed - new - len(batch.dead_letters), len(batch.dead_letters), batch.late)
        return True

    async def _store(self, records: list) -> None:
        store = self.sinks.store
        await store.write(records)
        await store.flush()
        metrics.PERSISTED.inc(len(store.last.new))
        metrics.DUPLICATES.inc(store.last.duplicates)

    def _store_letters(self, batch: Batch) -> list[DeadLetter]:
        """Dead letters for the copies step 2 found in conflict and the events PostgreSQL refused alone."""
        last = self.sinks.store.last
        if not last.conflicts and not last.poison:
            return []
        messages = {(m.partition(), m.offset()): m for m in batch.messages}
        now = datetime.now(timezone.utc)
        return [conflict_letter(messages[(c.record.partition, c.record.offset)], c.kept_partition, c.kept_offset, now)
                for c in last.conflicts] + [
            dead_letter(messages[(p.record.partition, p.record.offset)], STORE_STAGE, p.error_class, p.message, now)
            for p in last.poison]

    async def _send_dead_letters(self, batch: Batch) -> None:
        await self.sinks.dead_letters.write(batch.dead_letters)
        await self.sinks.dead_letters.flush()
        for letter in batch.dead_letters:
            metrics.DEAD_LETTERED.labels(letter.stage, letter.error_class).inc()

    async def _publish_counters(self) -> None:
        states: list[PublishedState] = await self.sinks.relay.publish_all()
        metrics.COUNTERS_PUBLISHED.inc(len(states))
        if states and self.sinks.cache is not None:
            await self.sinks.cache.write(states)
            await self.sinks.cache.flush()

    async def _maintain(self) -> None:
        # Batches wait while this runs: prune for a part of one attempt and carry on at the next run.
        upkeep = await self.sinks.maintenance.run(budget_s=self.config.attempt_timeout_s / 4)
        log.info("maintenance: %s", upkeep.summary())

    async def _commit(self) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._uncommitted.items() if (t, p) in self._assigned]
        if not offsets:
            return
        started = time.perf_counter()
        try:
            await self._step("commit", partial(self._commit_offsets, offsets), set(), commit=True)
        except KafkaException as exc:
            # Not retriable (the group moved on): what was written is durable; dedup absorbs redelivery.
            metrics.COMMIT_FAILURES.inc()
            log.warning("offset commit failed for good: %s", exc)
            return
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        for tp in offsets:
            self._uncommitted.pop((tp.topic, tp.partition), None)
        await self._kafka(partial(self._observe_lag, offsets))

    async def _commit_offsets(self, offsets: list[TopicPartition]) -> None:
        await self._kafka(partial(self._commit_assigned, offsets))

    def _commit_assigned(self, offsets: list[TopicPartition]) -> None:
        """Runs on the consumer thread, where rebalance callbacks run: a partition revoked while this
        commit waited for the thread (behind the batch ahead's consume) is left to its next owner."""
        assigned = [tp for tp in offsets if (tp.topic, tp.partition) in self._assigned]
        if assigned:
            self._consumer.commit(offsets=assigned, asynchronous=False)

    def _observe_lag(self, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                metrics.LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - tp.offset))

    # -- retries: the batch held, partitions paused, the consumer kept alive ------------------------

    async def _step(self, what: str, call: Callable[[], Awaitable[Any]], in_flight: set[TP],
                    commit: bool = False) -> None:
        retry = retrying(what, partial(self._hold, in_flight), lambda step: metrics.RETRIES.labels(step).inc(),
                         self.config.retry_initial_s, self.config.retry_max_s)
        if commit:
            retry = retry.copy(retry=_retriable_commit_error)
        try:
            async for attempt in retry:
                with attempt:
                    await asyncio.wait_for(call(), self.config.attempt_timeout_s)
        finally:
            if self._paused:
                await self._kafka(self._resume)

    async def _hold(self, in_flight: set[TP], seconds: float) -> None:
        """Wait out a backoff while polling, so the group keeps us and rebalances are served."""
        deadline = time.monotonic() + seconds
        while True:
            if self._stopping.is_set():
                raise Abandoned("shutting down")
            if self._revoked & in_flight:
                raise Abandoned(f"partitions {sorted(self._revoked & in_flight)} revoked")
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
        self._assigned |= {(tp.topic, tp.partition) for tp in partitions}
        log.info("assigned %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is durable for the partitions leaving, so their next owner starts after it."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        offsets = [TopicPartition(t, p, self._uncommitted[(t, p)]) for t, p in gone if (t, p) in self._uncommitted]
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                log.warning("commit on revoke failed (the next owner re-reads, dedup absorbs it): %s", exc)
        self._forget(consumer, partitions)
        log.info("revoked %s", sorted(p for _, p in gone))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Lost partitions already belong to someone else: commit nothing for them."""
        self._forget(consumer, partitions)
        log.warning("lost %s", sorted(tp.partition for tp in partitions))

    def _forget(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # librdkafka keeps a partition's pause across revoke and re-assignment: one leaving while a failed
        # step holds the batch would come back paused and never be fetched again, so resume it on the way out.
        try:
            consumer.resume(partitions)
        except KafkaException as exc:
            log.warning("resume on revoke failed: %s", exc)
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned -= gone
        self._revoked |= gone
        for tp in gone:
            self._uncommitted.pop(tp, None)
        self._held = [m for m in self._held if (m.topic(), m.partition()) not in gone]


def _retriable_commit_error(state: Any) -> bool:
    exc = state.outcome.exception() if state.outcome else None
    if exc is None or isinstance(exc, Abandoned):
        return False
    if isinstance(exc, KafkaException):
        return bool(exc.args and exc.args[0].retriable())
    return True
