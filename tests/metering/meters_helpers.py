"""Meters as data in tests (issue 21): four meters of every stateful and additive kind, events that feed them,
their windows computed by hand from stored rows (independent of the meter code), and versions made as the
meters API makes them."""

from __future__ import annotations

import asyncio
from collections import defaultdict
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal

import asyncpg
import orjson

from tally.meters.definitions import Window
from tally.meters.windows import bounds
from tally.schemas.envelope import Envelope
from tally.settings import Settings
from tests.metering.helpers import run_tally

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


def events_for(tenant: str, base: datetime, now: datetime, n: int = 150, first: int = 0) -> list[Envelope]:
    """`n` events 72 s apart from `base`, a third for each kind of meter; ids from `first`."""
    out = []
    for i in range(first, first + n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        at = base + timedelta(seconds=72 * (i - first))
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


def expected_windows(rows: list[asyncpg.Record], slug: str) -> dict[tuple[str, datetime, str], Decimal]:
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
                    # in hours, rounded to 18 places as WEIGHTED_SUM documents (tally/meters/weighted.py)
                    out[(name, ws, subject)] = _WIDE.divide(seconds, Decimal(3600)).quantize(Decimal("1e-18"), context=_WIDE)
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


async def counters_of(db: asyncpg.Connection, tenant: str, counter: str) -> dict[tuple[str, datetime, str], Decimal]:
    rows = await db.fetch("select window_name, window_start, subject, value from counters where tenant = $1"
                          " and meter = $2", tenant, counter)
    return {(r["window_name"], r["window_start"], r["subject"]): r["value"] for r in rows}


async def new_version(db: asyncpg.Connection, tenant: str, slug: str, version: int, definition: dict) -> int:
    """A version and its backfill row, in one transaction (as the meters API makes them)."""
    async with db.transaction():
        vid = await db.fetchval("insert into meter_versions (tenant, slug, version, definition) values ($1, $2, $3,"
                                " $4::jsonb) returning id", tenant, slug, version, orjson.dumps(definition).decode())
        await db.execute("insert into meter_backfills (tenant, version_id) values ($1, $2)", tenant, vid)
    return vid


async def record_starts(db: asyncpg.Connection, tenant: str, vid: int, starts: dict[int, int]) -> None:
    await db.executemany("insert into meter_starts (tenant, version_id, kafka_partition, start_offset)"
                         " values ($1, $2, $3, $4)", [(tenant, vid, p, o) for p, o in starts.items()])


async def backfilled(settings: Settings, db: asyncpg.Connection, tenant: str, ids: list[int], **env: str) -> None:
    """Run the backfill job until every version is done (it waits while the members have not committed past their
    starts)."""
    for _ in range(60):
        code, out = await asyncio.to_thread(run_tally, ["jobs", "run", "meters_backfill"], settings, **env)
        assert code == 0, out
        states = await db.fetch("select state from meter_backfills where tenant = $1 and version_id = any($2)",
                                tenant, ids)
        if all(r["state"] == "done" for r in states):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"backfill not done: {await db.fetch('select * from meter_backfills where tenant = $1', tenant)}")


def meter_test(isolated: Settings, **update: object) -> tuple[Settings, str, datetime, datetime]:
    """A meter test's settings (quick batches, the catalog polled often), a tenant of its own, the hour its events
    start from (three hours ago) and now."""
    settings = isolated.model_copy(update={"batch_max_wait_ms": 50, "jobs_metrics_port": 0, "meters_poll_s": 0.2,
                                           **update})
    now = datetime.now(timezone.utc)
    base = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    return settings, f"a-{uuid.uuid4().hex[:8]}", base, now
