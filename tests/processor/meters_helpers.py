"""Meters AVG, UNIQUE_COUNT and WEIGHTED_SUM for processor tests, and their values recomputed by hand
from the raw events (independent of processors/ and sinks/)."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal

import asyncpg

from tally.schemas.envelope import Envelope
from tests.processor.helpers import envelope

METERS = json.dumps({"meters": [
    {"slug": "users", "event_type": "api.*", "aggregation": "UNIQUE_COUNT", "value_path": "data.user",
     "per_subject": False, "windows": ["hour", "day"]},
    {"slug": "latency", "event_type": "api.*", "aggregation": "AVG", "value_path": "data.ms",
     "per_subject": False, "windows": ["hour", "day"]},
    {"slug": "storage", "event_type": "storage.level", "aggregation": "WEIGHTED_SUM", "value_path": "data.gb",
     "unit": "hour", "per_subject": False, "group_by": {"disk": "data.disk"}, "windows": ["hour", "day"]},
]})
HORIZON_S = 5 * 86400
_WIDE = Context(prec=250)


def day_start(days_ago: int) -> datetime:
    now = datetime.now(timezone.utc)
    return now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days_ago)


def mixed_events(tenant: str, n: int, start: datetime) -> list[Envelope]:
    """API calls (users repeating, latencies with decimals) and disk levels, over about 40 hours from
    `start`, spread over 23 subjects (so over every partition) and not in time order."""
    out = []
    for i in range(n):
        at = start + timedelta(minutes=(i * 37) % 2400, seconds=i % 7)
        subject = f"customer-{i % 23}"
        if i % 3 == 2:
            out.append(envelope(tenant, i, type_="storage.level", subject=subject, time_=at,
                                data={"disk": f"d{i % 2}", "gb": str(Decimal(i % 50) + Decimal("0.25"))}))
        else:
            out.append(envelope(tenant, i, type_="api.call", subject=subject, time_=at,
                                data={"user": f"u{(i * 7) % 61}", "ms": str(Decimal(i % 97) / 8)}))
    return out


def _window(name: str, at: datetime) -> tuple[datetime, datetime]:
    at = at.astimezone(timezone.utc)
    if name == "hour":
        start = at.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    start = at.replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


def expected_unique(events: list[Envelope]) -> dict[tuple[str, datetime], int]:
    seen: dict[tuple[str, datetime], set] = defaultdict(set)
    for e in events:
        if e.type == "api.call":
            for name in ("hour", "day"):
                seen[(name, _window(name, e.time)[0])].add(e.data["user"])
    return {k: len(v) for k, v in seen.items()}


def expected_avg(events: list[Envelope]) -> dict[tuple[str, datetime], tuple[Decimal, int]]:
    out: dict[tuple[str, datetime], tuple[Decimal, int]] = defaultdict(lambda: (Decimal(0), 0))
    for e in events:
        if e.type == "api.call":
            for name in ("hour", "day"):
                total, n = out[(name, _window(name, e.time)[0])]
                out[(name, _window(name, e.time)[0])] = (total + Decimal(e.data["ms"]), n + 1)
    return dict(out)


def expected_weighted(events: list[Envelope]) -> dict[tuple[str, datetime, str], tuple[Decimal, Decimal, datetime]]:
    """Per (window, start, disk) holding a level change: level × seconds, the level at the end of what is
    known, and up to when it is known. Levels step at each change (ties in (source, id) order)."""
    by_disk: dict[str, list] = defaultdict(list)
    for e in events:
        if e.type == "storage.level":
            by_disk[e.data["disk"]].append((e.time.astimezone(timezone.utc), e.source, e.id, Decimal(e.data["gb"])))
    out = {}
    for disk, points in by_disk.items():
        points.sort()
        last = points[-1][0]
        for name in ("hour", "day"):
            for start, end in {_window(name, p[0]) for p in points}:
                total = Decimal(0)
                for (at, *_, level), following in zip(points, points[1:] + [(last, None, None, None)]):
                    seg_start, seg_end = max(at, start), min(following[0], end)
                    if seg_end > seg_start:
                        seconds = Decimal(str((seg_end - seg_start).total_seconds()))
                        total = _WIDE.add(total, _WIDE.multiply(level, seconds))
                level = [p[3] for p in points if p[0] < end][-1]
                out[(name, start, disk)] = (total, level, end if last >= end else last)
    return out


async def counter_rows(db: asyncpg.Connection, tenant: str, meter: str) -> list[asyncpg.Record]:
    return await db.fetch("select * from counters where tenant = $1 and meter = $2", tenant, meter)


async def assert_meters_match(db: asyncpg.Connection, tenant: str, counted: list[Envelope]) -> None:
    """Every window of the three meters equals its recomputation from the counted raw events."""
    unique = {(r["window_name"], r["window_start"]): (int(r["value"]), r["sample_level"])
              for r in await counter_rows(db, tenant, "users")}
    assert unique == {k: (v, 0) for k, v in expected_unique(counted).items()}

    avg = {(r["window_name"], r["window_start"]): (r["total"], r["count"], r["value"])
           for r in await counter_rows(db, tenant, "latency")}
    expected = expected_avg(counted)
    assert {k: (t, n) for k, (t, n, _) in avg.items()} == expected
    for total, n, value in avg.values():
        assert abs(value - total / n) < Decimal("1e-15")

    weighted = {(r["window_name"], r["window_start"], r["grp"] and json.loads(r["grp"])["disk"]):
                (r["total"], r["level"], r["integrated_until"], r["value"])
                for r in await counter_rows(db, tenant, "storage")}
    expected_w = expected_weighted(counted)
    assert {k: v[:3] for k, v in weighted.items()} == expected_w
    for total, _, _, value in weighted.values():
        assert abs(value - total / 3600) <= Decimal("1e-18")
