"""Keys that repeat within a share and across transactions written at the same time: each key is stored and counted
once, the first copy of a share is the one it keeps, and every other copy is a duplicate when its content equals the
kept copy's and a conflict when it does not (docs/adr/0014). The two writers list their keys in opposite orders, so a
claim that did not lock keys in key order could deadlock."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone

import asyncpg
import orjson

from tally.meters.definitions import load_meters
from tally.meters.meterset import MeterSet
from tally.schemas.envelope import Envelope
from tally.sinks.base import Record
from tally.sinks.postgres import PostgresSink
from tally.settings import Settings


async def test_repeated_keys_within_a_share_and_across_writers_are_kept_once(
    settings: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"repeat-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)

    def record(key: int, offset: int, data: dict) -> Record:
        return Record(Envelope(id=f"e{key}", source="shop", type="usage", subject=f"s{key % 5}", time=now,
                               received_at=now, data=data, tenant=tenant), key % 4, offset)

    # Writer A: keys 0..199 twice, the same content; keys 200..299 twice, the second copy with other content.
    a = [record(k, k, {"n": k}) for k in range(300)]
    a += [record(k, 1000 + k, {"n": k}) for k in range(200)]
    a += [record(k, 1000 + k, {"n": k, "second": True}) for k in range(200, 300)]
    # Writer B, at the same time: keys 199..0 with other content than A's.
    b = [record(k, 5000 + k, {"n": k, "b": True}) for k in reversed(range(200))]
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    try:
        sinks = [PostgresSink(pool, MeterSet(load_meters()).aggregate, parallel=2) for _ in range(2)]
        await sinks[0].write(a)
        await sinks[1].write(b)
        results = await asyncio.gather(*(sink.flush() for sink in sinks))
    finally:
        await pool.close()

    kept = {row["id"]: row for row in await db.fetch(
        "select e.id, e.data::text as data, e.kafka_partition, e.kafka_offset, k.kafka_partition as kp,"
        " k.kafka_offset as ko from events e join event_keys k using (tenant, source, id) where e.tenant = $1", tenant)}
    assert len(kept) == 300 and await db.fetchval("select count(*) from events where tenant = $1", tenant) == 300
    assert all((row["kafka_partition"], row["kafka_offset"]) == (row["kp"], row["ko"]) for row in kept.values())
    # Within a share the first copy is kept.
    assert all(kept[f"e{k}"]["kafka_offset"] == k for k in range(200, 300))
    counted = await db.fetchval("select sum(value) from counters where tenant = $1 and window_name = 'day'", tenant)
    assert counted == 300

    assert sum(len(r.new) for r in results) == 300
    for result, written in zip(results, (a, b)):
        kept_offsets = {(kept[r.envelope.id]["kafka_partition"], kept[r.envelope.id]["kafka_offset"]) for r in result.new}
        assert kept_offsets == {(r.partition, r.offset) for r in result.new}
        differs = {r.offset for r in written if r.envelope.data != orjson.loads(kept[r.envelope.id]["data"])}
        conflicts = {c.record.offset for c in result.conflicts}
        assert conflicts == differs
        for c in result.conflicts:
            row = kept[c.record.envelope.id]
            assert (c.kept_partition, c.kept_offset) == (row["kafka_partition"], row["kafka_offset"])
        assert len(result.new) + result.duplicates + len(result.conflicts) == len(written)
