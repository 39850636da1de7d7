"""The billing rule of docs/adr/0060 on its own: a change counts from the next whole hour, each unit is
measured against the allowance in force when it was counted, and usage-reporting hours bill everything."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

from tally.usage.periods import Period
from tally.usage.plans import Plan, PlanMeter
from tally.usage.terms import Segment, Terms, billed_from
from tally.usage.windows import HourWindow

START = datetime(2026, 3, 1, tzinfo=timezone.utc)
END = datetime(2026, 4, 1, tzinfo=timezone.utc)


def _plan(plan_id: str, included: int, report: str = "overage", meter: str = "api_calls") -> Plan:
    return Plan(id=plan_id, report=report, meters=[PlanMeter(meter=meter, included=included)])


def _windows(counts: dict[int, int]) -> dict[datetime, HourWindow]:
    """Calls per hour since the period's start."""
    out = {}
    for hour, n in counts.items():
        at = START + timedelta(hours=hour)
        out[at] = HourWindow(at, "COUNT", Decimal(n), at)
    return out


def _terms(*parts: tuple[int, Plan]) -> Terms:
    """Segments from (first hour, plan) pairs."""
    bounds = [START + timedelta(hours=h) for h, _ in parts] + [END]
    spans = zip(parts, bounds, bounds[1:])
    return Terms(Period(START, END, date(2026, 3, 1)),
                 tuple(Segment(a, b, plan, i + 1) for i, ((_, plan), a, b) in enumerate(spans)))


def test_a_change_is_billed_from_the_next_whole_hour() -> None:
    at = datetime(2026, 3, 20, 10, 37, 12, tzinfo=timezone.utc)
    assert billed_from(at) == datetime(2026, 3, 20, 11, tzinfo=timezone.utc)
    assert billed_from(at.replace(minute=0, second=0)) == at.replace(minute=0, second=0)
    assert billed_from(datetime.min) < START  # '-infinity': the first version holds from the beginning


def test_upgrade_keeps_what_was_billed_and_downgrade_bills_only_later_usage() -> None:
    windows = _windows({0: 18, 30: 5})
    up = _terms((0, _plan("basic", 10)), (24, _plan("pro", 20)))
    assert up.overage("api_calls", windows) == up.billable("api_calls", windows) == 8 + 3
    down = _terms((0, _plan("pro", 20)), (24, _plan("basic", 10)))
    assert down.overage("api_calls", windows) == 5
    assert _terms((0, _plan("basic", 10))).overage("api_calls", windows) == 13  # no change: used - included


def test_hours_under_a_usage_plan_bill_all_their_usage() -> None:
    windows = _windows({0: 18, 30: 5, 40: 2})
    terms = _terms((0, _plan("basic", 10)), (24, _plan("basic", 10, report="usage")), (35, _plan("basic", 10)))
    assert terms.billable("api_calls", windows) == 8 + 5 + 2
    assert terms.overage("api_calls", windows) == 8 + 5 + 2  # past 10 all along


def test_a_meter_only_some_versions_have_is_billed_only_there() -> None:
    windows = _windows({0: 7, 30: 4})
    terms = _terms((0, _plan("basic", 5, meter="tokens")), (24, _plan("pro", 5)))
    assert terms.meters() == ["api_calls", "tokens"]
    assert terms.billable("api_calls", windows) == 4  # its allowance was already used by the earlier hours
    assert terms.meter("tokens")[0].plan.id == "basic"
