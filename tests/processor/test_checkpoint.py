"""The checkpoint without a broker: its steps run in order, offsets are committed only for partitions still
assigned, a revocation commits what is durable and a loss commits nothing, and a commit refused during a
rebalance is made again when the loop is idle. The sinks and the consumer are fakes of their interfaces."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from tally.processors.batch import Batch
from tally.processors.checkpoint import Checkpoint, Sinks
from tally.processors.retry import Abandoned
from tally.schemas.envelope import Envelope
from tally.sinks.base import Record
from tally.sinks.postgres import StoreResult

TOPIC = "events"


class FakeConsumer:
    """Commits offsets into a dict; refuses the next `refusals` commits with a Kafka error code."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.committed: dict[tuple[str, int], int] = {}
        self.refusals: list[int] = []

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        assert not asynchronous
        if self.refusals:
            raise KafkaException(KafkaError(self.refusals.pop(0)))
        self.log.append("commit " + ",".join(f"{tp.partition}:{tp.offset}" for tp in offsets))
        self.committed.update({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def get_watermark_offsets(self, partition: TopicPartition, cached: bool) -> tuple[int, int]:
        return 0, partition.offset


class FakeStore:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.pending: list[Record] = []

    async def write(self, batch: Sequence[Record]) -> None:
        self.pending.extend(batch)

    async def flush(self) -> StoreResult:
        records, self.pending = self.pending, []
        self.log.append(f"store {len(records)}")
        return StoreResult(new=records)


class FakeLetters:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def write(self, batch: Sequence[Any]) -> None:
        self.log.append(f"dead letters {len(batch)}")

    async def flush(self) -> None:
        pass


class FakeRelay:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def publish_all(self) -> list:
        self.log.append("publish")
        return []


async def run_once(what: str, call: Callable[[], Awaitable[Any]], in_flight: set, commit: bool = False) -> Any:
    return await call()


async def on_thread(call: Callable[[], Any]) -> Any:
    return call()


def checkpoint(log: list[str], run_step: Any = run_once) -> tuple[Checkpoint, FakeConsumer]:
    consumer = FakeConsumer(log)
    sinks = Sinks(store=FakeStore(log), relay=FakeRelay(log), dead_letters=FakeLetters(log),  # type: ignore[arg-type]
                  maintenance=None)  # type: ignore[arg-type]
    return Checkpoint(consumer, sinks, run_step, on_thread), consumer


def batch(*positions: tuple[int, int]) -> Batch:
    now = datetime.now(timezone.utc)
    out = Batch()
    for partition, offset in positions:
        event = Envelope(id=f"e{partition}-{offset}", source="s", type="t", time=now, received_at=now, tenant="t1")
        out.records.append(Record(event, partition, offset))
        out.offsets[(TOPIC, partition)] = max(out.offsets.get((TOPIC, partition), -1), offset)
    out.consumed = len(positions)
    return out


def tps(*partitions: int) -> list[TopicPartition]:
    return [TopicPartition(TOPIC, p) for p in partitions]


async def test_a_batch_is_flushed_then_produced_then_committed_one_past_its_last_offset() -> None:
    log: list[str] = []
    cp, consumer = checkpoint(log)
    cp.on_assign(tps(0, 1))
    b = batch((0, 4), (0, 5), (1, 9))
    b.dead_letters.append(SimpleNamespace(stage="decode", error_class="ValueError"))  # type: ignore[arg-type]
    stored = await cp.commit(b)
    assert log == ["store 3", "dead letters 1", "publish", "commit 0:6,1:10"]
    assert stored is not None and len(stored.new) == 3
    assert consumer.committed == {(TOPIC, 0): 6, (TOPIC, 1): 10} and cp.uncommitted == {}


async def test_a_partition_revoked_while_the_batch_was_in_flight_gets_no_commit() -> None:
    log: list[str] = []

    async def revoke_during_store(what: str, call: Callable[[], Awaitable[Any]], in_flight: set,
                                  commit: bool = False) -> Any:
        result = await call()
        if what == "postgres":
            cp.on_revoke(tps(1))  # nothing uncommitted yet: nothing to commit for it
        return result

    cp, consumer = checkpoint(log, revoke_during_store)
    cp.on_assign(tps(0, 1))
    await cp.commit(batch((0, 1), (1, 1)))
    assert consumer.committed == {(TOPIC, 0): 2}
    assert cp.revoked == {(TOPIC, 1)} and cp.assigned == {(TOPIC, 0)}


async def test_a_revocation_commits_what_is_durable_and_a_loss_commits_nothing() -> None:
    log: list[str] = []
    cp, consumer = checkpoint(log)
    cp.on_assign(tps(0, 1))
    cp.uncommitted = {(TOPIC, 0): 7, (TOPIC, 1): 3}
    cp.on_revoke(tps(0))
    assert consumer.committed == {(TOPIC, 0): 7}
    cp.on_lost(tps(1))
    assert consumer.committed == {(TOPIC, 0): 7}
    assert cp.uncommitted == {} and cp.assigned == set() and cp.revoked == {(TOPIC, 0), (TOPIC, 1)}


@pytest.mark.parametrize("code", [KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
                                  KafkaError.UNKNOWN_MEMBER_ID])
async def test_a_commit_refused_by_a_rebalance_is_made_again_when_idle(code: int) -> None:
    log: list[str] = []
    cp, consumer = checkpoint(log)
    cp.on_assign(tps(0))
    consumer.refusals = [code, code]
    await cp.commit(batch((0, 4)))
    assert consumer.committed == {} and cp.uncommitted == {(TOPIC, 0): 5}
    await cp.commit_refused()  # still rebalancing: refused again, kept
    assert consumer.committed == {} and cp.uncommitted == {(TOPIC, 0): 5}
    await cp.commit_refused()  # settled
    assert consumer.committed == {(TOPIC, 0): 5} and cp.uncommitted == {}
    await cp.commit_refused()
    assert log.count("commit 0:5") == 1


async def test_a_commit_that_failed_for_another_reason_waits_for_the_next_batch() -> None:
    log: list[str] = []
    cp, consumer = checkpoint(log)
    cp.on_assign(tps(0))
    consumer.refusals = [KafkaError.OFFSET_METADATA_TOO_LARGE]
    await cp.commit(batch((0, 4)))
    await cp.commit_refused()
    assert consumer.committed == {} and cp.uncommitted == {(TOPIC, 0): 5}
    await cp.commit(batch((0, 5)))
    assert consumer.committed == {(TOPIC, 0): 6}


async def test_a_step_abandoned_leaves_the_offsets_uncommitted() -> None:
    log: list[str] = []

    async def abandon_store(what: str, call: Callable[[], Awaitable[Any]], in_flight: set,
                            commit: bool = False) -> Any:
        if what == "postgres":
            raise Abandoned("partitions revoked")
        return await call()

    cp, consumer = checkpoint(log, abandon_store)
    cp.on_assign(tps(0))
    with pytest.raises(Abandoned):
        await cp.commit(batch((0, 1)))
    assert consumer.committed == {} and cp.uncommitted == {} and log == []
