"""The backfill of a new meter version (issue 21, ADR 0140, 0145): events produced and stored by a real processor
(deploy-time meters only), then versions of tenant A's meters with starts recorded by hand in the middle of each
partition; the backfill job counts exactly A's stored events below the starts, for COUNT, SUM, UNIQUE_COUNT and
WEIGHTED_SUM, across a kill -9 at a chunk boundary and in the middle of a chunk, publishes through the outbox to the
counter topic and Redis, and a version whose starts are not all recorded, or not yet committed past, waits and says
why."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal

import asyncpg
import orjson
import redis

from tally.meters.windows import bounds
from tally.meters.definitions import Window
from tally.schemas.counters import CounterState
from tally.schemas.envelope import Envelope
from tally.settings import Settings
from tally.sinks.redis_cache import cache_key
from tests.metering.helpers import run_tally
from tests.processor.helpers import assert_topic_matches_postgres, drained, produce, wait_for
from tests.support import running

DEFINITIONS = {
    "calls": {"event_type": "api.call", "aggregation": "COUNT", "windows": ["hour", "day"]},
    "tokens": {"event_type": "llm.call", "aggregation": "SUM", "value_path": "data.tokens", "windows": ["hour", "day"]},
    "users": {"event_type": "api.call", "aggregation": "UNIQUE_COUNT", "value_path": "data.user",
              "windows": ["hour", "day"]},
    "seats": {"event_type": "seats.set", "aggregation": "WEIGHTED_SUM", "value_path": "data.seats", "unit": "hour",
              "windows": ["hour"]},
}
SUBJECTS = [f"s{i}" for i in range(6)]
_WIDE = Context(prec=100)


def _events(tenant: str, base: datetime, now: datetime) -> list[Envelope]:
    out = []
    for i in range(150):
        subject = SUBJECTS[i % len(SUBJECTS)]
        at = base + timedelta(seconds=72 * i)
        kind = i % 3
        if kind == 0:
            type_, data = "api.call", {"user": f"u{i % 7}"}
        elif kind == 1:
            type_, data = "llm.call", {"tokens": i % 11 + 0.5}
        else:
            type_, data = "seats.set", {"seats": i % 5 + 1}
        out.append(Envelope(id=f"e{i}", source="app", type=type_, subject=subject, time=at, received_at=now,
                            data=data, tenant=tenant))
    return out


def _expected(rows: list[asyncpg.Record], slug: str) -> dict[tuple[str, datetime, str], Decimal]:
    """Independent of the meter code: each aggregation computed by hand from the stored rows."""
    d = DEFINITIONS[slug]
    mine = [r for r in rows if r["type"] == d["event_type"]]
    out: dict[tuple[str, datetime, str], Decimal] = defaultdict(Decimal)
    if d["aggregation"] == "WEIGHTED_SUM":
        series = defaultdict(list)
        for r in mine:
            series[r["subject"]].append((r["time"], Decimal(str(orjson.loads(r["data"])["seats"]))))
        for subject, points in series.items():
            points.sort()
            for name in d["windows"]:
                held = {bounds(Window(name), at) for at, _ in points}
                for ws, we in held:
                    seconds = sum(level * Decimal(max(0, (min(nxt, we) - max(at, ws)).total_seconds()))
                                  for (at, level), (nxt, _) in zip(points, points[1:]))
                    out[(name, ws, subject)] = _WIDE.divide(seconds, Decimal(3600))
        return dict(out)
    distinct = defaultdict(set)
    for r in mine:
        data = orjson.loads(r["data"])
        for name in d["windows"]:
            key = (name, bounds(Window(name), r["time"])[0], r["subject"])
            if d["aggregation"] == "COUNT":
                out[key] += 1
            elif d["aggregation"] == "SUM":
                out[key] += Decimal(str(data["tokens"]))
            else:
                distinct[key].add(data["user"])
    return {k: Decimal(len(v)) for k, v in distinct.items()} if distinct else dict(out)


async def _counters(db: asyncpg.Connection, tenant: str, counter: str) -> dict[tuple[str, datetime, str], Decimal]:
    rows = await db.fetch("select window_name, window_start, subject, value from counters where tenant = $1"
                          " and meter = $2", tenant, counter)
    return {(r["window_name"], r["window_start"], r["subject"]): r["value"] for r in rows}


async def _version(db: asyncpg.Connection, tenant: str, slug: str, version: int, definition: dict) -> int:
    """A version and its backfill row, in one transaction (as the meters API makes them)."""
    async with db.transaction():
        vid = await db.fetchval("insert into meter_versions (tenant, slug, version, definition) values ($1, $2, $3,"
                                " $4::jsonb) returning id", tenant, slug, version, orjson.dumps(definition).decode())
        await db.execute("insert into meter_backfills (tenant, version_id) values ($1, $2)", tenant, vid)
    return vid


async def _starts(db: asyncpg.Connection, tenant: str, vid: int, starts: dict[int, int]) -> None:
    await db.executemany("insert into meter_starts (tenant, version_id, kafka_partition, start_offset)"
                         " values ($1, $2, $3, $4)", [(tenant, vid, p, o) for p, o in starts.items()])


async def test_backfill_counts_exactly_the_stored_events_below_the_starts_across_kill_9(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings = isolated.model_copy(update={"batch_max_wait_ms": 50, "jobs_metrics_port": 0})
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    base = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    with running("processor", ["process"], settings):
        produce(settings, [e for pair in zip(_events(a, base, now), _events(b, base, now)) for e in pair])
        await wait_for(lambda: drained(settings, db), 90, "the processor")
    assert await db.fetchval("select count(*) from events where tenant = any($1::text[])", [a, b]) == 300

    # Starts in the middle of each partition (of the events of both tenants, interleaved).
    offsets = defaultdict(list)
    for r in await db.fetch("select kafka_partition, kafka_offset from events where tenant = any($1::text[])", [a, b]):
        offsets[r[0]].append(r[1])
    assert len(offsets) == settings.events_partitions
    starts = {p: sorted(o)[len(o) // 2] for p, o in offsets.items()}

    ids = {}
    calls_v1 = await _version(db, a, "calls", 1, {**DEFINITIONS["calls"], "windows": ["day"]})
    await _starts(db, a, calls_v1, dict(list(starts.items())[:-1]))  # one partition without a start
    ids["calls"] = await _version(db, a, "calls", 2, DEFINITIONS["calls"])  # counters `calls@2`
    for slug in ("tokens", "users", "seats"):
        ids[slug] = await _version(db, a, slug, 1, DEFINITIONS[slug])
    for vid in ids.values():
        await _starts(db, a, vid, starts)
    ahead = await _version(db, a, "ahead", 1, DEFINITIONS["calls"])
    await _starts(db, a, ahead, {p: max(o) + 10 for p, o in offsets.items()})  # the group has not got there

    chunked = {"TALLY_METERS_BACKFILL_CHUNK": "7", "TALLY_METERS_BACKFILL_PAUSE_S": "0"}
    code, out = run_tally(["jobs", "run", "meters_backfill"], settings, TALLY_CRASH_AT="backfill_after_chunk",
                          **chunked)
    assert code == -9, out
    first = await db.fetchrow("select * from meter_backfills where tenant = $1 and version_id = $2", a, ids["calls"])
    assert (first["state"], first["counted"]) == ("running", 7) and first["total"] > 7
    code, out = run_tally(["jobs", "run", "meters_backfill"], settings, TALLY_CRASH_AT="backfill_mid_chunk", **chunked)
    assert code == -9, out
    again = await db.fetchrow("select * from meter_backfills where tenant = $1 and version_id = $2", a, ids["calls"])
    assert (again["counted"], again["cursor"]) == (7, first["cursor"])  # the killed chunk left nothing

    code, out = run_tally(["meters", "status", "--tenant", a], settings)
    assert code == 0 and f"calls v2: running 7/{first['total']} events" in out, out

    revision = await db.fetchval("select revision from meter_catalog")
    code, out = run_tally(["jobs", "run", "meters_backfill"], settings, **chunked)
    assert code == 0, out
    assert await db.fetchval("select revision from meter_catalog") == revision + len(ids)

    below = [r for r in await db.fetch(
        "select type, subject, time, data::text as data, kafka_partition, kafka_offset from events where tenant = $1",
        a) if r["kafka_offset"] < starts[r["kafka_partition"]]]
    for slug, vid in ids.items():
        counter = "calls@2" if slug == "calls" else slug
        expected = _expected(below, slug)
        assert expected and await _counters(db, a, counter) == expected, slug
        row = await db.fetchrow("select * from meter_backfills where tenant = $1 and version_id = $2", a, vid)
        matching = [r for r in below if r["type"] == DEFINITIONS[slug]["event_type"]]
        assert (row["state"], row["counted"], row["total"]) == ("done", len(matching), len(matching)), slug
        assert row["backfilled_from"] == min(r["time"] for r in matching) and row["finished_at"] is not None
    assert await _counters(db, a, "calls") == {}  # version 1 waits: nothing counted under its name
    counters = ["calls@2", "tokens", "users", "seats", "calls", "ahead"]
    assert await db.fetchval("select count(*) from counters where tenant = $1 and meter = any($2::text[])", b,
                             counters) == 0

    # The counter topic and Redis follow: nothing of A's left queued, every window published and cached as stored.
    assert await db.fetchval("select count(*) from counter_outbox o join counters c using (key) where c.tenant = $1",
                             a) == 0
    await assert_topic_matches_postgres(settings, db, a)
    cache = redis.Redis.from_url(settings.redis_url)
    try:
        for r in await db.fetch("select key, value, revision from counters where tenant = $1"
                                " and meter = any($2::text[])", a, counters):
            state = CounterState.from_bytes(await asyncio.to_thread(cache.hget, cache_key(settings.redis_prefix,
                                                                                          r["key"]), "state"))
            assert (Decimal(state.value), state.revision) == (r["value"], r["revision"])
    finally:
        cache.close()

    code, out = run_tally(["meters", "status", "--tenant", a], settings)
    assert code == 0, out
    lines = {line.split(":")[0]: line for line in out.splitlines() if line.startswith(a)}
    missing = sorted(set(offsets) - set(list(starts)[:-1]))
    assert f"waits: no start recorded on partition(s) {missing[0]}" in lines[f"{a} calls v1"], out
    assert "waits: the processors' group committed" in lines[f"{a} ahead v1"], out
    assert lines[f"{a} seats v1"].startswith(f"{a} seats v1: done "), out
