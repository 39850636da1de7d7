"""The counter reader converges to PostgreSQL's values after a processor crash and a re-publication,
and never lets an older revision replace a newer one."""

from __future__ import annotations

import asyncio
import signal
import uuid

import asyncpg
from confluent_kafka import Producer

from tally.schemas.counters import CounterState
from tally.counters import CounterReader
from tally.settings import Settings
from tests.processor.helpers import drained, envelope, produce, wait_for
from tests.support import TallyProcess, running


async def _postgres_states(db: asyncpg.Connection, tenant: str) -> dict[str, tuple[str, int]]:
    rows = await db.fetch("select key, value::text as value, revision from counters where tenant = $1", tenant)
    return {row["key"]: (row["value"], row["revision"]) for row in rows}


def _reader_states(reader: CounterReader) -> dict[str, tuple[str, int]]:
    return {state.key: (state.value, state.revision) for state in reader}


async def test_the_reader_converges_after_a_crash_and_keeps_the_newest_revision(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"reader-{uuid.uuid4().hex[:8]}"
    settings = isolated.model_copy(update={"batch_max_messages": 200, "processor_metrics_port": 0})
    changes: list[CounterState] = []
    reader = CounterReader(settings.kafka_bootstrap, topic=settings.topics.counters, tenant=tenant, window="day",
                           on_change=changes.append).start()
    try:
        events = [envelope(tenant, n) for n in range(500)]
        produce(settings, events)
        # Killed after its counters committed and before they were published: the restarted member
        # publishes them from the outbox.
        doomed = TallyProcess("processor-crash", ["process"], settings, TALLY_CRASH_AT="after_pg_commit")
        assert await asyncio.to_thread(doomed.proc.wait, 60) == -signal.SIGKILL
        doomed.stop()
        with running("processor", ["process"], settings):
            await wait_for(lambda: drained(settings, db), 60, "the restarted processor to drain the topic")
        expected = {k: v for k, v in (await _postgres_states(db, tenant)).items() if '"day"' in k}
        assert expected

        async def converged() -> bool:
            return _reader_states(reader) == expected
        await wait_for(converged, 30, "the reader to hold PostgreSQL's day counters")

        # An older state published again (a relay that crashed before deleting its outbox row does this).
        key, (value, revision) = next(iter(expected.items()))
        stale = reader.get(key).model_copy(update={"value": "0", "revision": revision - 1})
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        producer.produce(settings.topics.counters, stale.to_bytes(), key.encode())
        assert producer.flush(10) == 0
        seen = len(changes)
        fresh = CounterReader(settings.kafka_bootstrap, topic=settings.topics.counters, tenant=tenant, window="day")
        try:
            assert fresh.wait_caught_up(30)
            assert _reader_states(fresh) == expected
        finally:
            fresh.close()
        assert reader.get(key).value == value and len(changes) == seen
        assert all(state.tenant == tenant and state.window == "day" for state in changes)
    finally:
        reader.close()
