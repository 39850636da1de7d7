"""Billing periods: anchors, short months, DST, the first period and zones that hour windows cannot serve."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from tally.usage.periods import Anchor, PeriodError, check_zone, days, period_at, period_of_date, previous


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def test_period_runs_from_local_midnight_of_the_anchor_to_the_next() -> None:
    anchor = Anchor(15, "America/New_York", date(2026, 1, 1))
    p = period_at(anchor, utc(2026, 3, 20, 12))
    assert (p.start, p.end, p.label) == (utc(2026, 3, 15, 4), utc(2026, 4, 15, 4), date(2026, 3, 15))
    # one second before local midnight of the 15th is still the previous period
    assert period_at(anchor, utc(2026, 3, 15, 3, 59, 59)).label == date(2026, 2, 15)


def test_anchor_31_clamps_to_the_end_of_short_months() -> None:
    anchor = Anchor(31, "UTC", date(2025, 1, 1))
    feb = period_of_date(anchor, date(2026, 2, 28))
    assert (feb.start, feb.end) == (utc(2026, 2, 28), utc(2026, 3, 31))
    assert previous(anchor, feb).start == utc(2026, 1, 31)


def test_first_period_starts_on_the_start_date_and_nothing_before_it() -> None:
    anchor = Anchor(1, "Europe/Berlin", date(2026, 5, 10))
    p = period_of_date(anchor, date(2026, 5, 20))
    assert (p.start, p.end) == (utc(2026, 5, 9, 22), utc(2026, 5, 31, 22))
    with pytest.raises(PeriodError):
        period_of_date(anchor, date(2026, 5, 9))


def test_days_follow_local_midnights_across_a_dst_change() -> None:
    anchor = Anchor(1, "Europe/Berlin", date(2026, 1, 1))
    p = period_of_date(anchor, date(2026, 3, 10))
    spans = {d: (s, e) for d, s, e in days(anchor, p)}
    assert len(spans) == 31
    assert spans[date(2026, 3, 29)] == (utc(2026, 3, 28, 23), utc(2026, 3, 29, 22))  # a 23-hour day
    assert p.end == utc(2026, 3, 31, 22)


@pytest.mark.parametrize("zone", ["Asia/Kolkata", "Asia/Kathmandu", "Australia/Adelaide", "Not/AZone"])
def test_zones_without_whole_hour_offsets_are_refused(zone: str) -> None:
    with pytest.raises(PeriodError):
        check_zone(zone)


def test_whole_hour_zones_are_accepted() -> None:
    for zone in ("UTC", "America/New_York", "Europe/Berlin", "Asia/Tokyo", "America/Sao_Paulo"):
        check_zone(zone)
