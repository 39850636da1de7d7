"""Tenant meter versions taken up live by two processor members while events flow (issue 21, ADR 0140): each
version counts exactly the stored events of its tenant at or above its start on each partition and below its
successor's, for COUNT, SUM, UNIQUE_COUNT and WEIGHTED_SUM, through a kill -9 and a rebalance; another tenant's
events are never counted; and a member whose catalog is stale counts nothing past a start it does not know."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from types import SimpleNamespace

import asyncpg
import pytest
from confluent_kafka import Producer

from tally.meters.definitions import DEFAULT_METERS
from tally.meters.live import LiveMeters
from tally.processors.decode import decode
from tally.settings import Settings
from tally.sinks.base import Record
from tally.sinks.postgres import PostgresSink, StaleCatalog
from tests.processor.helpers import drained, envelope, wait_for
from tests.processor.meters_helpers import expected_weighted
from tests.processor.test_processor_rebalance import _moved, _owns_partitions
from tests.support import TallyProcess, wait_until

# What tenant A defines while events flow: one meter per aggregation (the API stores definitions so).
DEFINITIONS = {
    "calls": {"event_type": "api.*", "aggregation": "COUNT", "per_subject": False, "windows": ["hour"]},
    "ms": {"event_type": "api.*", "aggregation": "SUM", "value_path": "data.ms", "per_subject": False,
           "windows": ["hour"]},
    "users": {"event_type": "api.*", "aggregation": "UNIQUE_COUNT", "value_path": "data.user", "per_subject": False,
              "windows": ["hour"]},
    "storage": {"event_type": "storage.level", "aggregation": "WEIGHTED_SUM", "value_path": "data.gb", "unit": "hour",
                "per_subject": False, "group_by": {"disk": "data.disk"}, "windows": ["hour", "day"]},
}
# The new version of `calls`: what it counts changes (a group), so it counts under calls@2.
CALLS_V2 = {"event_type": "api.*", "aggregation": "COUNT", "per_subject": False, "group_by": {"user": "data.user"},
            "windows": ["hour"]}


class TwoTenantLoad(threading.Thread):
    """About 400 events a second for each of two tenants, API calls and disk levels, a tenth sent twice."""

    def __init__(self, settings: Settings, tenants: tuple[str, str]) -> None:
        super().__init__()
        self.settings = settings
        self.tenants = tenants
        self.stopping = threading.Event()

    def run(self) -> None:
        producer = Producer({"bootstrap.servers": self.settings.kafka_bootstrap, "linger.ms": 5})
        n = 0
        while not self.stopping.is_set():
            chunk = []
            for i in range(n, n + 40):
                now = datetime.now(timezone.utc)
                for tenant in self.tenants:
                    if i % 4 == 3:
                        chunk.append(envelope(tenant, i, type_="storage.level", subject=f"customer-{i % 40}",
                                              time_=now - timedelta(seconds=i % 50),
                                              data={"disk": f"d{i % 2}", "gb": str(Decimal(i % 50) + Decimal("0.5"))}))
                    else:
                        chunk.append(envelope(tenant, i, type_="api.call", subject=f"customer-{i % 40}",
                                              data={"user": f"u{(i * 7) % 61}", "ms": str(Decimal(i % 97) / 8)}))
            for e in chunk + chunk[:8]:
                producer.produce(self.settings.topics.events, e.to_bytes(), e.key())
            producer.flush(10)
            n += 40
            time.sleep(0.1)
        assert producer.flush(30) == 0

    async def finish(self) -> None:
        self.stopping.set()
        await asyncio.to_thread(self.join, 30)


async def define(db: asyncpg.Connection, tenant: str, definitions: dict[str, dict], version: int = 1) -> dict[str, int]:
    """Versions as the API stores them (a file applied at once): the rows and their waiting backfills in one
    transaction; their ids by slug."""
    ids = {}
    async with db.transaction():
        for slug, definition in definitions.items():
            version_id = ids[slug] = await db.fetchval(
                "insert into meter_versions (tenant, slug, version, definition) values ($1, $2, $3, $4::jsonb)"
                " returning id", tenant, slug, version, json.dumps(definition))
            await db.execute("insert into meter_backfills (tenant, version_id) values ($1, $2)", tenant, version_id)
    return ids


async def starts(db: asyncpg.Connection, version_id: int) -> dict[int, int]:
    rows = await db.fetch("select kafka_partition, start_offset from meter_starts where version_id = $1", version_id)
    return {r[0]: r[1] for r in rows}


async def counted_events(db: asyncpg.Connection, tenant: str, since: dict[int, int],
                         until: dict[int, int] | None = None) -> list[SimpleNamespace]:
    """The stored, counted events of `tenant` at or above `since` on their partition and below `until`."""
    rows = await db.fetch("select source, id, type, time, data, kafka_partition, kafka_offset from events"
                          " where tenant = $1 and counted", tenant)
    out = []
    for r in rows:
        p, o = r["kafka_partition"], r["kafka_offset"]
        if since[p] <= o and (until is None or o < until[p]):
            out.append(SimpleNamespace(source=r["source"], id=r["id"], type=r["type"], time=r["time"],
                                       data=json.loads(r["data"])))
    return out


def _hour(at: datetime) -> datetime:
    return at.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


async def windows(db: asyncpg.Connection, tenant: str, meter: str) -> dict:
    rows = await db.fetch("select window_name, window_start, grp, value, total, level, integrated_until from counters"
                          " where tenant = $1 and meter = $2", tenant, meter)
    return {(r["window_name"], r["window_start"], r["grp"]): r for r in rows}


async def assert_version_counts(db: asyncpg.Connection, tenant: str, events: list[SimpleNamespace],
                                calls_v1: list[SimpleNamespace]) -> None:
    """DEFINITIONS' meters equal their recomputation from exactly `events` (`calls` from `calls_v1`)."""
    count: dict = defaultdict(int)
    for e in calls_v1:
        count[_hour(e.time)] += 1
    total: dict = defaultdict(Decimal)
    users: dict = defaultdict(set)
    for e in events:
        if e.type != "api.call":
            continue
        total[_hour(e.time)] += Decimal(e.data["ms"])
        users[_hour(e.time)].add(e.data["user"])
    assert {k[1]: int(r["value"]) for k, r in (await windows(db, tenant, "calls")).items()} == dict(count)
    assert {k[1]: r["value"] for k, r in (await windows(db, tenant, "ms")).items()} == dict(total)
    assert {k[1]: int(r["value"]) for k, r in (await windows(db, tenant, "users")).items()} == {
        k: len(v) for k, v in users.items()}
    weighted = {(k[0], k[1], json.loads(k[2])["disk"]): (r["total"], r["level"], r["integrated_until"])
                for k, r in (await windows(db, tenant, "storage")).items()}
    assert weighted == expected_weighted(events)


async def _steady(settings: Settings, db: asyncpg.Connection, kill: bool) -> None:
    a, b = (f"live-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}")
    load = TwoTenantLoad(settings, (a, b))
    members = [TallyProcess("processor-a", ["process"], settings)]
    try:
        load.start()
        await asyncio.to_thread(wait_until, lambda: _owns_partitions(members[0]), 30, 0.1, "a to own partitions")
        members.append(TallyProcess("processor-b", ["process"], settings))
        await asyncio.to_thread(wait_until, lambda: _owns_partitions(members[1]), 30, 0.1, "b to share partitions")
        await asyncio.sleep(2)
        ids = await define(db, a, DEFINITIONS)
        await asyncio.sleep(3)
        if kill:
            # A member dies mid-stream: the other takes its partitions over (a rebalance) with the versions' starts.
            victim = members[1]
            victim.kill9()
            taken = _moved(victim.output(), "assigned")
            await asyncio.to_thread(wait_until, lambda: _moved(members[0].output().rpartition("revoked")[2],
                                                               "assigned") >= taken, 60, 0.2, "the takeover")
        calls_v2 = (await define(db, a, {"calls": CALLS_V2}, version=2))["calls"]
        await asyncio.sleep(3)
        await load.finish()
        await wait_for(lambda: drained(settings, db), 90, "the members to drain the topic")
    finally:
        load.stopping.set()
        for member in members:
            member.stop()

    partitions = set((await db.fetchrow("select array_agg(distinct kafka_partition) as p from events"
                                        " where tenant = $1", a))["p"])
    assert len(partitions) > 1
    for version_id in [*ids.values(), calls_v2]:
        assert set(await starts(db, version_id)) >= partitions, "a start on every partition"
    since = await starts(db, ids["calls"])
    for version_id in ids.values():  # taken up together: one start per partition
        assert await starts(db, version_id) == since
    later = await starts(db, calls_v2)
    assert all(later[p] >= since[p] for p in since)

    # Versions 1 count the events at or above their starts; calls stops at calls@2's starts.
    counted = await counted_events(db, a, since)
    assert len(counted) > 500
    v1_calls = [e for e in await counted_events(db, a, since, later) if e.type == "api.call"]
    await assert_version_counts(db, a, counted, v1_calls)
    count = sum(1 for e in v1_calls)

    # calls@2 counts exactly the events at or above its starts: with calls, every API call at or above the
    # first version's start once.
    v2: dict = defaultdict(int)
    for e in await counted_events(db, a, later):
        if e.type == "api.call":
            v2[(_hour(e.time), e.data["user"])] += 1
    got = {(k[1], json.loads(k[2])["user"]): int(r["value"]) for k, r in (await windows(db, a, "calls@2")).items()}
    assert got == dict(v2)
    assert sum(got.values()) + count == sum(e.type == "api.call" for e in counted)

    # Tenant B defined nothing: none of A's meters ever counted B's events.
    assert await db.fetchval("select count(*) from counters where tenant = $1 and meter <> all($2::text[])",
                             b, ["events", "logs", "event_types"]) == 0


@pytest.mark.parametrize("kill", [False, True], ids=["steady", "through-a-kill-and-a-rebalance"])
async def test_meter_versions_defined_while_events_flow_count_exactly_from_their_starts(
    isolated: Settings, db: asyncpg.Connection, kill: bool
) -> None:
    settings = isolated.model_copy(update={"batch_max_messages": 200, "processor_metrics_port": 0,
                                           "late_horizon_s": 86400})
    await _steady(settings, db, kill=kill)



async def test_a_member_with_a_stale_catalog_counts_nothing_past_a_start_it_does_not_know(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """The fence: a version another member took up on partition 0 at offset 100; a member that has not seen the
    version yet writes offsets 105-109 there: its transaction rolls back, and after a refresh it counts them."""
    tenant = f"fence-{uuid.uuid4().hex[:8]}"
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        stale, fresh = LiveMeters(DEFAULT_METERS), LiveMeters(DEFAULT_METERS)
        await stale.refresh(pool)
        version_id = (await define(db, tenant, {"calls": DEFINITIONS["calls"]}))["calls"]
        await fresh.refresh(pool)

        def records(first: int) -> list[Record]:
            return [Record(decode(envelope(tenant, n, type_="api.call").to_bytes()), 0, n, True)
                    for n in range(first, first + 5)]

        first = PostgresSink(pool, fresh.aggregate, live=fresh)
        await first.write(records(100))
        await first.flush()
        assert await starts(db, version_id) == {0: 100}
        late = PostgresSink(pool, stale.aggregate, live=stale)
        await late.write(records(105))
        with pytest.raises(StaleCatalog):
            await late.flush()
        assert await db.fetchval("select count(*) from events where tenant = $1", tenant) == 5
        assert await stale.refresh(pool)
        await late.write(records(105))
        await late.flush()
        assert await db.fetchval("select sum(value) from counters where tenant = $1 and meter = 'calls'", tenant) == 10
    finally:
        await pool.close()
