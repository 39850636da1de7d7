"""One event id re-used with other content: the first copy to commit is kept and counted, every other
copy is reported as a `conflict` dead letter naming both positions, and an exact re-send stays a plain
duplicate, whichever partition each copy arrives on and in whichever order."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from confluent_kafka import KafkaError, Message, Producer

from tally.processors.dlq import read_letters
from tally.schemas.deadletter import CONFLICT_STAGE
from tally.schemas.envelope import Envelope
from tally.settings import Settings
from tests.processor.helpers import counter_counts, drained, wait_for
from tests.support import running


def _copies(tenant: str) -> tuple[Envelope, Envelope]:
    """The same id twice: the original, and a retry that rebuilt the event without its subject."""
    now = datetime.now(timezone.utc)
    original = Envelope(id="order-1", source="checkout", type="order.placed", subject="customer-0",
                        time=now - timedelta(minutes=1), received_at=now, data={"amount": 42}, tenant=tenant)
    rebuilt = original.model_copy(update={"subject": None, "time": now, "received_at": now + timedelta(seconds=1)})
    return original, rebuilt


def _produce(settings: Settings, placed: list[tuple[Envelope, int]]) -> list[tuple[int, int]]:
    """Produce each envelope to the given partition; returns the (partition, offset) of each."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    positions: dict[int, tuple[int, int]] = {}
    for n, (event, partition) in enumerate(placed):
        def acked(err: KafkaError | None, msg: Message, n: int = n) -> None:
            assert err is None, err
            positions[n] = (msg.partition(), msg.offset())
        producer.produce(settings.topics.events, event.to_bytes(), event.key(), partition=partition, on_delivery=acked)
    assert producer.flush(30) == 0
    return [positions[n] for n in range(len(placed))]


async def _stored(db: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    return await db.fetch("select subject, kafka_partition, kafka_offset from events where tenant = $1", tenant)


def _conflicts(settings: Settings, tenant: str) -> list:
    return [item.letter for item in read_letters(settings.kafka_bootstrap, settings.topics.dlq)
            if item.letter.stage == CONFLICT_STAGE and f'"tenant":"{tenant}"'.encode() in item.letter.value]


@pytest.mark.parametrize("rebuilt_first", [False, True], ids=["original-first", "rebuilt-first"])
async def test_the_first_copy_to_commit_is_kept_and_the_other_reported_in_either_order(
    isolated: Settings, db: asyncpg.Connection, rebuilt_first: bool
) -> None:
    tenant = f"conflict-{uuid.uuid4().hex[:8]}"
    original, rebuilt = _copies(tenant)
    first, second = (rebuilt, original) if rebuilt_first else (original, rebuilt)
    settings = isolated.model_copy(update={"processor_metrics_port": 0})

    with running("processor", ["process"], settings) as processor:
        [kept_at] = await asyncio.to_thread(_produce, settings, [(first, 2)])
        await wait_for(lambda: drained(settings, db), 60, "the first copy to be handled")
        # The second copy on another partition, then an exact re-send of the kept one (a real retry).
        resent = first.model_copy(update={"received_at": first.received_at + timedelta(seconds=5)})
        [conflicting_at, _] = await asyncio.to_thread(_produce, settings, [(second, 3), (resent, 0)])
        await wait_for(lambda: drained(settings, db), 60, "the second copy and the re-send to be handled")
        assert processor.alive()

    stored = await _stored(db, tenant)
    assert [(r["subject"], r["kafka_partition"], r["kafka_offset"]) for r in stored] == [(first.subject, *kept_at)]
    counted = {(window, subject): value for (_, window, _, subject, _), value in (await counter_counts(db, tenant)).items()}
    assert counted == {("hour", first.subject): 1, ("day", first.subject): 1}

    letters = await asyncio.to_thread(_conflicts, settings, tenant)
    assert len(letters) == 1, "the exact re-send is a duplicate, not a conflict"
    letter = letters[0]
    assert (letter.partition, letter.offset) == conflicting_at
    assert (letter.kept_partition, letter.kept_offset) == kept_at
    assert letter.error_class == "IdReusedWithOtherContent"
    assert Envelope.from_bytes(letter.value).subject == second.subject


async def test_copies_racing_in_one_batch_keep_one_and_report_the_other(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    """Both copies in one batch on partitions written by two transactions side by side: whichever
    commits first is kept, and the report names exactly that copy as kept."""
    tenant = f"race-{uuid.uuid4().hex[:8]}"
    original, rebuilt = _copies(tenant)
    settings = isolated.model_copy(update={"processor_metrics_port": 0})
    positions = await asyncio.to_thread(_produce, settings, [(original, 0), (rebuilt, 1)])

    with running("processor", ["process"], settings):
        await wait_for(lambda: drained(settings, db), 60, "both copies to be handled")

    [row] = await _stored(db, tenant)
    kept_at = (row["kafka_partition"], row["kafka_offset"])
    [letter] = await asyncio.to_thread(_conflicts, settings, tenant)
    assert (letter.kept_partition, letter.kept_offset) == kept_at
    assert {(letter.partition, letter.offset), kept_at} == set(positions)
    assert sum((await counter_counts(db, tenant)).values()) == 2  # one event: its hour and its day
