"""A share PostgreSQL refuses because of one record is bisected: the record is returned as poison for the
dead-letter topic, every other record is stored and counted once, and writing the batch again stores nothing
twice. The record here bypasses step 1, as one step 1 did not foresee would."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timezone

import asyncpg

from tally.meters.definitions import load_meters
from tally.meters.meterset import MeterSet
from tally.schemas.envelope import Envelope
from tally.sinks.base import Record
from tally.sinks.postgres import PostgresSink
from tally.settings import Settings


def _astral(n: int) -> str:
    rng = random.Random(n)
    return "".join(chr(rng.randrange(0x20000, 0x2A000)) for _ in range(n))


async def test_one_record_postgres_refuses_is_isolated_and_the_rest_stored_once(
    settings: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"bisect-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)

    def record(n: int, source: str = "shop", id_: str = "") -> Record:
        return Record(Envelope(id=id_ or f"e{n}", source=source, type="usage", subject=f"s{n % 3}", time=now, received_at=now,
                               data={"n": n}, tenant=tenant), n % 4, n)

    records = [record(n) for n in range(100)]
    records.insert(37, record(1000, _astral(512), _astral(256)))  # its event_keys entry is over 2704 bytes: SQLSTATE 54000
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        sink = PostgresSink(pool, MeterSet(load_meters()).aggregate, parallel=2)
        for attempt in range(2):
            await sink.write(records)
            stored = await sink.flush()
            [poison] = stored.poison
            assert poison.record.offset == 1000 and poison.error_class == "ProgramLimitExceededError"
            assert "54000" in poison.message
            assert (len(stored.new), stored.duplicates) == ((100, 0) if attempt == 0 else (0, 100))
    finally:
        await pool.close()
    assert await db.fetchval("select count(*) from events where tenant = $1", tenant) == 100
    counted = await db.fetchval("select sum(value) from counters where tenant = $1 and window_name = 'day'", tenant)
    assert counted == 100
