"""AVG, UNIQUE_COUNT and WEIGHTED_SUM stay equal to a recomputation from the raw events through a
duplicate storm, kill -9 between the PostgreSQL commit and the offset commit, and two members sharing
windows; UNIQUE_COUNT over a billing period is the period's distinct values; WEIGHTED_SUM carries the
level across window boundaries and re-integrates after a late event."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import uuid
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from tally.meters.unique import unique_count_over
from tally.meters.weighted import weighted_sum_over
from tally.settings import Settings
from tests.processor.helpers import (
    assert_topic_matches_postgres, committed_all, drained, envelope, event_count, latest_counter_states, produce,
    wait_for,
)
from tests.processor.meters_helpers import (
    HORIZON_S, METERS, assert_meters_match, counter_rows, day_start, expected_unique, mixed_events,
)
from tests.support import TallyProcess, running


def _settings(isolated: Settings, **extra: object) -> Settings:
    return isolated.model_copy(update={"meters": METERS, "late_horizon_s": HORIZON_S, "processor_metrics_port": 0,
                                       **extra})


async def _assert_published(settings: Settings, db: asyncpg.Connection, tenant: str) -> None:
    """The topic holds PostgreSQL's windows, with what a reader needs per aggregation."""
    await assert_topic_matches_postgres(settings, db, tenant)
    states = [s for s in (await asyncio.to_thread(latest_counter_states, settings)).values() if s.tenant == tenant]
    rows = {r["key"]: r for r in await db.fetch("select * from counters where tenant = $1", tenant)}
    for s in states:
        row = rows[s.key]
        if s.meter == "latency":
            assert (Decimal(s.sum), s.level, s.approximate) == (row["total"], None, None)
        elif s.meter == "users":
            assert (s.sum, s.approximate) == (None, False)
        else:
            assert (Decimal(s.sum), Decimal(s.level), s.integrated_until) == (
                row["total"], row["level"], row["integrated_until"])


async def test_new_meters_are_exact_through_a_duplicate_storm(isolated: Settings, db: asyncpg.Connection) -> None:
    tenant = f"mstorm-{uuid.uuid4().hex[:8]}"
    events = mixed_events(tenant, 600, day_start(2) + timedelta(hours=9))
    settings = _settings(isolated, batch_max_messages=300)
    produce(settings, [e for e in events for _ in range(3)] + events)
    with running("processor", ["process"], settings):
        await wait_for(lambda: drained(settings, db), 90, "the processor to drain the topic")
    produce(settings, events[::-1] + events[:100])
    with running("processor", ["process"], settings) as processor:
        await wait_for(lambda: drained(settings, db), 90, "the restarted processor to drain the topic")
        assert processor.alive()

    assert await event_count(db, tenant) == 600
    await assert_meters_match(db, tenant, events)
    await _assert_published(settings, db, tenant)


@pytest.mark.parametrize("point", ["after_share_commit", "after_pg_commit"])
async def test_new_meters_survive_kill_9_before_the_offset_commit(
    isolated: Settings, db: asyncpg.Connection, point: str
) -> None:
    tenant = f"mcrash-{uuid.uuid4().hex[:8]}"
    events = mixed_events(tenant, 600, day_start(2) + timedelta(hours=9))
    settings = _settings(isolated, batch_max_messages=250)
    produce(settings, events + events[:50])

    doomed = TallyProcess("processor-crash", ["process"], settings, TALLY_CRASH_AT=point)
    assert await asyncio.to_thread(doomed.proc.wait, 90) == -signal.SIGKILL
    doomed.stop()
    assert 0 < await event_count(db, tenant) < 600
    assert not await asyncio.to_thread(committed_all, settings)

    with running("processor", ["process"], settings):
        await wait_for(lambda: drained(settings, db), 90, "the restarted processor to drain the topic")
    assert await event_count(db, tenant) == 600
    await assert_meters_match(db, tenant, events)
    await _assert_published(settings, db, tenant)


async def test_two_members_sharing_windows_count_each_value_once(isolated: Settings, db: asyncpg.Connection) -> None:
    """Every window of these meters spans all partitions: both members, and both writers of each, write it."""
    tenant = f"mshare-{uuid.uuid4().hex[:8]}"
    events = mixed_events(tenant, 1500, day_start(2) + timedelta(hours=9))
    settings = _settings(isolated, batch_max_messages=100)
    first = TallyProcess("processor-a", ["process"], settings)
    second = TallyProcess("processor-b", ["process"], settings)
    try:
        await wait_for(lambda: _both_assigned(first, second), 60, "both members to own partitions")
        produce(settings, events + events[::3])
        await wait_for(lambda: drained(settings, db), 120, "the group to drain the topic")
    finally:
        first.stop()
        second.stop()
    assert await event_count(db, tenant) == 1500
    await assert_meters_match(db, tenant, events)
    await _assert_published(settings, db, tenant)


async def _both_assigned(*members: TallyProcess) -> bool:
    return all(re.search(r"assigned \[\d", m.output()) is not None for m in members)


async def test_unique_count_over_a_billing_period_is_its_distinct_values_not_a_sum_of_days(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"mperiod-{uuid.uuid4().hex[:8]}"
    start = day_start(4)
    # Three days; users overlap from day to day, so the sum of daily distinct counts overstates the period.
    events = [envelope(tenant, n, type_="api.call", subject=f"customer-{n % 9}", time_=start + timedelta(minutes=53 * n),
                      data={"user": f"u{n % 41}", "ms": "1", "id": -n}) for n in range(3 * 27)]
    sampled = json.loads(METERS)
    sampled["meters"].append({"slug": "users-sampled", "event_type": "api.*", "aggregation": "UNIQUE_COUNT",
                              "value_path": "data.id", "per_subject": False, "windows": ["day"], "max_distinct": 50})
    many = [envelope(tenant, 1000 + n, type_="api.call", subject=f"customer-{n % 9}",
                     time_=start + timedelta(hours=30, seconds=n), data={"user": "u0", "ms": "1", "id": n})
            for n in range(400)]
    settings = _settings(isolated, meters=json.dumps(sampled))
    produce(settings, events + many)
    with running("processor", ["process"], settings):
        await wait_for(lambda: drained(settings, db), 90, "the processor to drain the topic")

    end = start + timedelta(days=3)
    period = await unique_count_over(db, tenant, "users", None, {}, start, end)
    distinct = len({e.data["user"] for e in events + many})
    days = {k: v for k, v in expected_unique(events + many).items() if k[0] == "day"}
    assert (period.value, period.approximate) == (distinct, False)
    assert sum(days.values()) > distinct
    day_two = await unique_count_over(db, tenant, "users", None, {}, start + timedelta(days=1), start + timedelta(days=2))
    assert day_two.value == days[("day", start + timedelta(days=1))]
    with pytest.raises(ValueError):
        await unique_count_over(db, tenant, "users", None, {}, start + timedelta(minutes=30), end)

    # Past max_distinct the window keeps a sample and says so; the period figure is flagged approximate too.
    ids = {}
    for e in events + many:
        ids.setdefault(e.time.replace(hour=0, minute=0, second=0), set()).add(e.data["id"])
    rows = {r["window_start"]: r for r in await counter_rows(db, tenant, "users-sampled")}
    assert rows.keys() == ids.keys()
    for day, values in ids.items():
        if len(values) <= 50:
            assert (rows[day]["value"], rows[day]["sample_level"]) == (len(values), 0)
        else:
            assert rows[day]["sample_level"] > 0
            assert len(values) / 3 < rows[day]["value"] < len(values) * 3
    states = {s.window_start: s for s in (await asyncio.to_thread(latest_counter_states, settings)).values()
              if s.tenant == tenant and s.meter == "users-sampled"}
    assert {day: s.approximate for day, s in states.items()} == {day: len(v) > 50 for day, v in ids.items()}
    sampled_period = await unique_count_over(db, tenant, "users-sampled", None, {}, start, end)
    assert sampled_period.approximate and 481 / 3 < sampled_period.value < 481 * 3


async def test_weighted_sum_carries_the_level_across_windows_and_takes_a_late_change(
    isolated: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"mweight-{uuid.uuid4().hex[:8]}"
    day = day_start(3)

    def level(n: int, hour: float, gb: str):  # noqa: ANN202
        return envelope(tenant, n, type_="storage.level", subject="acct", time_=day + timedelta(hours=hour),
                        data={"disk": "d0", "gb": gb})

    settings = _settings(isolated)
    # 120 GB from 22:30, 150 GB from 01:15 the next day: across an hour and a day boundary.
    produce(settings, [level(1, 22.5, "120"), level(2, 25.25, "150")])
    with running("processor", ["process"], settings):
        await wait_for(lambda: drained(settings, db), 90, "the processor to drain the topic")

        async def windows() -> dict:
            return {(r["window_name"], r["window_start"] - day): (r["value"], r["level"], r["integrated_until"] - day)
                    for r in await counter_rows(db, tenant, "storage")}

        h = timedelta(hours=1)
        assert await windows() == {
            ("hour", 22 * h): (60, 120, 23 * h),              # 120 × 0.5 h, then the next hour
            ("day", 0 * h): (180, 120, 24 * h),               # 120 × 1.5 h up to midnight
            ("hour", 25 * h): (30, 150, 25.25 * h),           # 120 × 0.25 h, 150 known from 01:15
            ("day", 24 * h): (150, 150, 25.25 * h),           # 120 × 1.25 h
        }  # 23:00 and 00:00 have no change: no row; the level of the window before holds (120)

        # A late change at 00:30 (100 GB) re-integrates the windows it changes, and no others.
        produce(settings, [level(3, 24.5, "100")])
        await wait_for(lambda: drained(settings, db), 90, "the late change to be counted")
        assert await windows() == {
            ("hour", 22 * h): (60, 120, 23 * h),
            ("day", 0 * h): (180, 120, 24 * h),
            ("hour", 24 * h): (110, 100, 25 * h),             # 120 × 0.5 h + 100 × 0.5 h
            ("hour", 25 * h): (25, 150, 25.25 * h),           # 100 × 0.25 h
            ("day", 24 * h): (135, 150, 25.25 * h),           # 60 + 50 + 25
        }

        # Re-sent and beyond the horizon: neither changes anything.
        too_late = envelope(tenant, 4, type_="storage.level", subject="acct", time_=day - timedelta(days=6),
                            data={"disk": "d0", "gb": "999"})
        produce(settings, [level(3, 24.5, "100"), too_late])
        await wait_for(lambda: drained(settings, db), 90, "the repeats to be read")
        assert (await windows())[("day", 24 * h)] == (135, 150, 25.25 * h)

    over = await weighted_sum_over(db, tenant, "storage", None, {"disk": "d0"}, day, day + timedelta(days=2))
    assert (over.level_seconds / 3600, over.level, over.until) == (315, 150, day + 25.25 * h)
    await _assert_published(settings, db, tenant)
