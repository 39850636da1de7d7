"""The checkpoint: takes a validated batch from "written" to "committed" (after Quix Streams' Checkpoint).

It owns the offsets on the way and the partitions they belong to: which are assigned, which left
while a batch was in flight, and which offsets are durable but not yet committed. `commit` numbers its
steps as the rest of the processor does (step 1, validation, comes before it); the rebalance callbacks
keep the three sets true.

A commit the group refuses while it rebalances (ILLEGAL_GENERATION, REBALANCE_IN_PROGRESS,
UNKNOWN_MEMBER_ID) keeps its offsets; the loop calls `commit_refused` on its idle turns, after each poll
has served the rebalance, so they are committed once the group settles rather than with the next
message (which may never come). Rebalance callbacks run on the consumer thread, as every Kafka call does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any, Protocol, TypeVar

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from tally.processors import metrics
from tally.processors.batch import Batch
from tally.processors.dlq import conflict_letter, dead_letter
from tally.processors.faults import crash_point
from tally.processors.retry import Abandoned
from tally.schemas.counters import PublishedState
from tally.schemas.deadletter import STORE_STAGE, DeadLetter
from tally.sinks.base import Record, Sink
from tally.sinks.maintenance import Maintenance
from tally.sinks.outbox import OutboxRelay
from tally.sinks.postgres import StoreResult

log = logging.getLogger("tally.processor")

T = TypeVar("T")
TP = tuple[str, int]

# What librdkafka reports for a commit the group refused because it is rebalancing or has moved on.
REBALANCE_REFUSALS = frozenset({KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
                                KafkaError.UNKNOWN_MEMBER_ID})


@dataclass(frozen=True)
class Sinks:
    store: Sink[Sequence[Record], StoreResult]
    relay: OutboxRelay
    dead_letters: Sink[Sequence[DeadLetter], None]
    maintenance: Maintenance
    cache: Sink[Sequence[PublishedState], None] | None = None


class OffsetConsumer(Protocol):
    """The Kafka consumer calls the checkpoint makes (confluent_kafka.Consumer has them)."""

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> Any: ...

    def get_watermark_offsets(self, partition: TopicPartition, cached: bool) -> tuple[int, int]: ...


class RunStep(Protocol):
    """The loop's way to run a step: retried with backoff while the consumer polls (processors.consumer)."""

    def __call__(self, what: str, call: Callable[[], Awaitable[T]], in_flight: set[TP],
                 commit: bool = False) -> Awaitable[T]: ...


OnThread = Callable[[Callable[[], T]], Awaitable[T]]


class Checkpoint:
    def __init__(self, consumer: OffsetConsumer, sinks: Sinks, run_step: RunStep, on_thread: OnThread,
                 crash_at: str = "", before_store: Callable[[Batch], Awaitable[None]] | None = None) -> None:
        self._consumer = consumer
        self._before_store = before_store  # brings the batch's meters up to date before each attempt
        self._sinks = sinks
        self._step = run_step
        self._on_thread = on_thread
        self._crash_at = crash_at
        #: The partitions this member owns, as the rebalance callbacks last said.
        self.assigned: set[TP] = set()
        #: Partitions revoked or lost since the batch in flight began: its steps give up for them.
        self.revoked: set[TP] = set()
        #: Per partition, the next offset to commit: durable in PostgreSQL and Kafka, not yet committed.
        self.uncommitted: dict[TP, int] = {}
        self._refused = False  # the last commit was refused by a rebalance: `commit_refused` makes it again

    async def commit(self, batch: Batch) -> StoreResult | None:
        """Take a validated batch to committed; what the store found, or None if it had no records. Raises
        Abandoned when the batch's partitions left (or the processor stops) while a step waited to retry.

        1. (Before the checkpoint: the batch is decoded and validated, processors.batch.)
        2. Flush the store: one PostgreSQL transaction per share stores new events, applies the meters,
           upserts counter windows and queues them in the outbox.
        3. Produce: dead letters (from step 1 and from the store), then the queued counter states, each
           acked by Kafka.
        4. Commit: note the batch's offsets as durable and commit them, for the partitions still assigned.
        """
        self.revoked.clear()
        in_flight = set(batch.offsets)
        # Step 2. Flush the store
        stored = None
        if batch.records:
            stored = await self._step("postgres", partial(self._flush_store, batch), in_flight)
            batch.dead_letters.extend(_store_letters(batch, stored))
        crash_point("after_pg_commit", self._crash_at)
        # Step 3. Produce dead letters and counter states
        if batch.dead_letters:
            await self._step("dead letters", partial(self._send_dead_letters, batch.dead_letters), in_flight)
        await self.publish_counters(in_flight)
        crash_point("after_publish", self._crash_at)
        # Step 4. Commit the offsets
        for tp, offset in batch.offsets.items():
            if tp in self.assigned:
                self.uncommitted[tp] = offset + 1
        await self._commit()
        return stored

    async def commit_refused(self) -> None:
        """Commit again what a rebalance refused, if anything (the loop calls this when it is idle)."""
        if self._refused:
            await self._commit()

    async def publish_counters(self, in_flight: set[TP]) -> None:
        """Publish every counter window queued in the outbox (also those a crashed member left behind)."""
        await self._step("publish counters", self._publish_counters, in_flight)

    async def _flush_store(self, batch: Batch) -> StoreResult:
        if self._before_store is not None:
            await self._before_store(batch)
        store = self._sinks.store
        await store.write(batch.records)
        stored = await store.flush()
        metrics.PERSISTED.inc(len(stored.new))
        metrics.DUPLICATES.inc(stored.duplicates)
        return stored

    async def _send_dead_letters(self, letters: list[DeadLetter]) -> None:
        await self._sinks.dead_letters.write(letters)
        await self._sinks.dead_letters.flush()
        for letter in letters:
            metrics.DEAD_LETTERED.labels(letter.stage, letter.error_class).inc()

    async def _publish_counters(self) -> None:
        states: list[PublishedState] = await self._sinks.relay.publish_all()
        metrics.COUNTERS_PUBLISHED.inc(len(states))
        if states and self._sinks.cache is not None:
            await self._sinks.cache.write(states)
            await self._sinks.cache.flush()

    async def _commit(self) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in self.uncommitted.items() if (t, p) in self.assigned]
        if not offsets:
            self._refused = False
            return
        started = time.perf_counter()
        try:
            await self._step("commit", partial(self._on_thread, partial(self._commit_assigned, offsets)), set(),
                             commit=True)
        except KafkaException as exc:
            # Not retriable now: what was written is durable, and dedup absorbs a redelivery meanwhile.
            metrics.COMMIT_FAILURES.inc()
            refused = exc.args[0].code() in REBALANCE_REFUSALS
            if refused:
                log.log(logging.DEBUG if self._refused else logging.INFO,
                        "offset commit refused during a rebalance, made again once the group settles: %s", exc)
            else:
                log.warning("offset commit failed for good: %s", exc)
            self._refused = refused
            return
        self._refused = False
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        for tp in offsets:
            self.uncommitted.pop((tp.topic, tp.partition), None)
        await self._on_thread(partial(self._observe_lag, offsets))

    def _commit_assigned(self, offsets: list[TopicPartition]) -> None:
        """Runs on the consumer thread, where rebalance callbacks run: a partition revoked while this
        commit waited for the thread (behind the batch ahead's consume) is left to its next owner."""
        assigned = [tp for tp in offsets if (tp.topic, tp.partition) in self.assigned]
        if assigned:
            self._consumer.commit(offsets=assigned, asynchronous=False)

    def _observe_lag(self, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                metrics.LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - tp.offset))

    # -- rebalance callbacks (on the consumer thread) -------------------------------------------

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(tp.topic, tp.partition) for tp in partitions}

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Commit what is durable for the partitions leaving, so their next owner starts after it."""
        offsets = [TopicPartition(tp.topic, tp.partition, self.uncommitted[(tp.topic, tp.partition)])
                   for tp in partitions if (tp.topic, tp.partition) in self.uncommitted]
        if offsets:
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                log.warning("commit on revoke failed (the next owner re-reads, dedup absorbs it): %s", exc)
        self.on_lost(partitions)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """Lost partitions already belong to someone else: forget them, commit nothing for them."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.assigned -= gone
        self.revoked |= gone
        for tp in gone:
            self.uncommitted.pop(tp, None)


def _store_letters(batch: Batch, stored: StoreResult) -> list[DeadLetter]:
    """Dead letters for the copies the store found in conflict and the events PostgreSQL refused alone."""
    if not stored.conflicts and not stored.poison:
        return []
    messages = {(m.partition(), m.offset()): m for m in batch.messages}
    now = datetime.now(timezone.utc)
    return [conflict_letter(messages[(c.record.partition, c.record.offset)], c.kept_partition, c.kept_offset, now)
            for c in stored.conflicts] + [
        dead_letter(messages[(p.record.partition, p.record.offset)], STORE_STAGE, p.error_class, p.message, now)
        for p in stored.poison]


def retriable_commit_error(state: Any) -> bool:
    """A tenacity retry predicate for the commit step: Kafka's retriable errors, and anything not Kafka's."""
    exc = state.outcome.exception() if state.outcome else None
    if exc is None or isinstance(exc, Abandoned):
        return False
    if isinstance(exc, KafkaException):
        return bool(exc.args and exc.args[0].retriable())
    return True
