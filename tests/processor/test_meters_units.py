"""AVG, UNIQUE_COUNT and WEIGHTED_SUM without services: config rules, folding, integrals, published states."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from pydantic import ValidationError

from tally.meters.definitions import Meter, MetersConfig
from tally.meters.meterset import MeterError, MeterSet
from tally.meters.unique import threshold, value_hash
from tally.meters.weighted import in_unit, integrate
from tally.schemas.counters import CounterState, encode_state
from tally.schemas.envelope import Envelope
from tally.sinks.base import Record

UTC = timezone.utc
NOW = datetime(2026, 3, 1, 10, tzinfo=UTC)
H = timedelta(hours=1)


def event(n: int, data: object, type_: str = "api.call") -> Envelope:
    return Envelope(id=f"e{n}", source="s", type=type_, subject="c", time=NOW + n * timedelta(seconds=1),
                    received_at=NOW, data=data, tenant="t")


def test_weighted_sum_needs_a_unit_and_only_it_takes_one() -> None:
    with pytest.raises(ValidationError, match="unit"):
        Meter(slug="gb", aggregation="WEIGHTED_SUM", value_path="data.gb")
    with pytest.raises(ValidationError, match="unit"):
        Meter(slug="gb", aggregation="SUM", value_path="data.gb", unit="hour")
    assert Meter(slug="gb", aggregation="WEIGHTED_SUM", value_path="data.gb", unit="day").unit.seconds == 86400


def test_unique_count_takes_any_value_but_null_and_avg_keeps_sum_and_count() -> None:
    meters = MeterSet(MetersConfig(meters=[
        Meter(slug="users", aggregation="UNIQUE_COUNT", value_path="data.user", windows=["day"]),
        Meter(slug="ms", aggregation="AVG", value_path="data.ms", windows=["day"]),
    ]))
    meters.check(event(1, {"user": {"id": 7}, "ms": 1}))
    with pytest.raises(MeterError):
        meters.check(event(2, {"user": None, "ms": 1}))
    records = [Record(event(n, {"user": "u", "ms": ms}), 0, n) for n, ms in enumerate(["0.1", "0.2", "0.4"])]
    [(_, avg)] = meters.aggregate(records)
    assert (avg.aggregation.value, avg.total, avg.count) == ("AVG", Decimal("0.7"), 3)
    assert [i.value for i in meters.stateful_inputs(records)] == ["u", "u", "u"]


def test_value_hashes_tell_json_types_apart_and_fit_63_bits() -> None:
    assert value_hash("1") != value_hash(1)
    assert value_hash({"a": 1, "b": 2}) == value_hash({"b": 2, "a": 1})
    assert all(0 <= value_hash(f"u{n}") < threshold(0) for n in range(1000))


def test_integral_carries_the_level_and_stops_where_the_level_is_known() -> None:
    points = [(NOW, Decimal(120)), (NOW + 4 * H, Decimal(150))]
    whole = integrate(points, NOW - H, NOW + 24 * H)
    assert (whole.level_seconds, whole.level, whole.until) == (120 * 4 * 3600, 150, NOW + 4 * H)
    middle = integrate(points, NOW + H, NOW + 2 * H)  # no change inside: the level entering holds
    assert (middle.level_seconds, middle.level, middle.until) == (120 * 3600, 120, NOW + 2 * H)
    assert str(in_unit(Decimal(5400), 3600)) == "1.5"
    assert str(in_unit(Decimal(1), 3600)) == "0.000277777777777778"
    assert str(in_unit(Decimal(7200), 3600)) == "2"


def test_optional_state_fields_are_the_model_bytes_and_old_states_still_read() -> None:
    base = ("k", "t", "m", "WEIGHTED_SUM", "day", NOW, NOW + 24 * H, None, {}, "12.5", 3, 2, NOW)
    state = CounterState(key="k", tenant="t", meter="m", aggregation="WEIGHTED_SUM", window="day", window_start=NOW,
                         window_end=NOW + 24 * H, subject=None, group={}, value="12.5", count=3, revision=2,
                         updated_at=NOW, sum="45000", level="5", integrated_until=NOW + H)
    encoded = encode_state(*base, total="45000", level="5", integrated_until=NOW + H)
    assert encoded.to_bytes() == state.to_bytes()
    assert CounterState.from_bytes(encoded.to_bytes()) == state
    old = encode_state(*base).to_bytes()
    assert b"level" not in old and CounterState.from_bytes(old).level is None


def test_a_reader_extrapolates_an_open_weighted_window_up_to_its_end() -> None:
    state = CounterState(key="k", tenant="t", meter="gb", aggregation="WEIGHTED_SUM", window="day", window_start=NOW,
                         window_end=NOW + 24 * H, subject=None, group={}, value="120", count=1, revision=1,
                         updated_at=NOW, sum="432000", level="150", integrated_until=NOW + H)
    assert state.level_seconds_at(NOW + H) == 432000
    assert state.level_seconds_at(NOW + 3 * H) / 3600 == 120 + 150 * 2
    assert state.level_seconds_at(NOW + 48 * H) / 3600 == 120 + 150 * 23


def test_checks_decided_by_the_type_alone_refuse_every_event_of_it_with_the_same_reason() -> None:
    """Checks are compiled per event type and those the type decides run once: each event of a refused
    type is still refused, with the reason the first failing check gives (value before groups)."""
    meters = MeterSet(MetersConfig(meters=[
        Meter(slug="by_type", group_by={"type": "type"}),
        Meter(slug="tokens", aggregation="SUM", value_path="data.n", group_by={"kind": "type"}),
        Meter(slug="odd", aggregation="SUM", value_path="type", event_type="odd.*"),
    ]))
    long_type = "\U0001F600" * 129  # 129 characters, 516 bytes: over the group value limit in bytes
    for n in range(2):
        with pytest.raises(MeterError, match="^meter by_type: group type is longer than 512 bytes$"):
            meters.check(event(n, {"n": 1}, long_type))
        with pytest.raises(MeterError, match="^meter tokens: no value at data.n$"):
            meters.check(event(n, {}, "api.call"))
        with pytest.raises(MeterError, match="^meter odd: value at type is not a number$"):
            meters.check(event(n, {"n": 1}, "odd.one"))
        meters.check(event(n, {"n": 1}, "\U0001F600" * 128))  # 512 bytes: fits
        meters.check(event(n, {"n": "2.5"}, "api.call"))
