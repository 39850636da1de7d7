"""kill -9 at each dangerous point of a batch; after a restart nothing is lost or counted twice."""

from __future__ import annotations

import asyncio
import signal
import uuid

import asyncpg
import pytest

from tally.processors.faults import POINTS
from tally.settings import Settings
from tests.processor.helpers import (
    assert_topic_matches_postgres, committed_all, counter_counts, drained, envelope, event_count, expected_counts,
    produce, wait_for,
)
from tests.support import TallyProcess, read_topic, running


@pytest.mark.parametrize("point", POINTS)
async def test_kill_9_between_the_steps_of_a_batch_loses_nothing_and_counts_nothing_twice(
    isolated: Settings, db: asyncpg.Connection, point: str
) -> None:
    tenant = f"crash-{uuid.uuid4().hex[:8]}"
    events = [envelope(tenant, n) for n in range(600)]
    settings = isolated.model_copy(update={"batch_max_messages": 250, "processor_metrics_port": 0})
    produce(settings, events + events[:50])

    doomed = TallyProcess("processor-crash", ["process"], settings, TALLY_CRASH_AT=point)
    assert await asyncio.to_thread(doomed.proc.wait, 60) == -signal.SIGKILL
    doomed.stop()
    persisted = await event_count(db, tenant)
    assert 0 < persisted < 600
    queued = await db.fetchval("select count(*) from counter_outbox")
    published = len(await asyncio.to_thread(read_topic, settings.kafka_bootstrap, settings.topics.counters))
    # after_share_commit: one transaction of the batch committed, its counters unpublished;
    # after_pg_commit: counters committed, none published; mid_relay: published, still queued (so published
    # again after the restart); after_publish: published and dequeued, offsets not committed.
    assert (queued > 0) == (point != "after_publish")
    assert (published > 0) == (point in ("mid_relay", "after_publish"))
    assert not await asyncio.to_thread(committed_all, settings)

    with running("processor", ["process"], settings):
        await wait_for(lambda: drained(settings, db), 60, "the restarted processor to drain the topic")

    assert await event_count(db, tenant) == 600
    assert await counter_counts(db, tenant) == expected_counts(events)
    assert await assert_topic_matches_postgres(settings, db, tenant) == len(expected_counts(events))
