"""Windows, meters, counter merging, validation and dead-letter headers, without services."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal

import pytest

from tally.meters.definitions import Meter, MetersConfig, Window, load_meters
from tally.meters.meterset import MeterError, MeterSet
from tally.meters.windows import bounds
from tally.processors.batch import Validator
from tally.schemas.counters import Aggregation, CounterState
from tally.schemas.deadletter import DeadLetter
from tally.schemas.envelope import Envelope
from tally.sinks.base import Record

UTC = timezone.utc


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(("window", "moment", "start", "end"), [
    (Window.MINUTE, at(2026, 3, 1, 10, 5, 59), at(2026, 3, 1, 10, 5), at(2026, 3, 1, 10, 6)),
    (Window.HOUR, at(2026, 3, 1, 23, 59, 59), at(2026, 3, 1, 23), at(2026, 3, 2)),
    (Window.DAY, at(2024, 2, 29, 12), at(2024, 2, 29), at(2024, 3, 1)),
    (Window.MONTH, at(2026, 12, 31, 23, 59), at(2026, 12, 1), at(2027, 1, 1)),
    (Window.MONTH, at(2026, 2, 1), at(2026, 2, 1), at(2026, 3, 1)),
])
def test_window_bounds_are_utc_calendar_windows(window: Window, moment: datetime, start: datetime, end: datetime) -> None:
    assert bounds(window, moment) == (start, end)


def test_an_offset_time_lands_in_its_utc_window() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert bounds(Window.DAY, datetime(2026, 3, 2, 1, 0, tzinfo=plus_two)) == (at(2026, 3, 1), at(2026, 3, 2))


def event(n: int, data: object, type_: str = "api.call", time_: datetime | None = None, **kw: object) -> Envelope:
    t = time_ or at(2026, 3, 1, 10, n)
    return Envelope(id=f"e{n}", source="s", type=type_, subject="c1", time=t, received_at=kw.pop("received_at", t),
                    data=data, tenant="t1", **kw)


def meters(*defs: Meter) -> MeterSet:
    return MeterSet(MetersConfig(meters=list(defs)))


@pytest.mark.parametrize(("aggregation", "expected"), [
    (Aggregation.SUM, Decimal("10.5")), (Aggregation.MAX, Decimal("7")), (Aggregation.MIN, Decimal("1")),
    (Aggregation.LATEST, Decimal("2.5")),
])
def test_aggregations_merge_by_their_rule(aggregation: Aggregation, expected: Decimal) -> None:
    ms = meters(Meter(slug="m", event_type="api.*", aggregation=aggregation, value_path="data.v", windows=(Window.DAY,)))
    # The LATEST value is the one with the latest event time, not the last one read.
    values = [(1, 1), (7, "2.5"), (3, 7)]
    records = [Record(event(n, {"v": v}), 0, n) for n, v in values] + [Record(event(9, {"v": 100}), 0, 9, counted=False)]
    [(text, delta)] = ms.aggregate(records)
    assert text == delta.key.to_text()
    assert (delta.value, delta.count) == (expected, 3)


def test_meters_filter_by_type_and_group_by_paths() -> None:
    ms = meters(Meter(slug="calls", event_type="api.*", group_by={"region": "data.region", "kind": "type"},
                      windows=(Window.HOUR, Window.MONTH)))
    assert ms.aggregate([Record(event(1, {}, type_="web.click"), 0, 1)]) == []
    deltas = [d for _, d in ms.aggregate([Record(event(1, {"region": "eu"}), 0, 1), Record(event(2, {}), 0, 2)])]
    assert sorted(((d.key.window, d.key.group, d.count) for d in deltas), key=str) == [
        ("hour", (("kind", "api.call"), ("region", "eu")), 1), ("hour", (("kind", "api.call"), ("region", None)), 1),
        ("month", (("kind", "api.call"), ("region", "eu")), 1), ("month", (("kind", "api.call"), ("region", None)), 1),
    ]


def test_group_values_of_different_json_types_are_different_groups_in_any_order() -> None:
    ms = meters(Meter(slug="m", group_by={"g": "data.g"}, windows=(Window.DAY,)))
    for order in ([True, 1, 1.0], [1.0, 1, True]):
        deltas = ms.aggregate([Record(event(n, {"g": g}), 0, n) for n, g in enumerate(order)])
        assert sorted((text, d.count) for text, d in deltas) == sorted(
            (f'["t1","m","day","2026-03-01T00:00:00+00:00","c1",{{"g":{g}}}]', 1) for g in ("true", "1", "1.0"))


@pytest.mark.parametrize("split", [[3], [1, 2], [2, 1], [1, 1, 1]])
def test_a_sum_is_exact_however_the_events_are_batched(split: list[int]) -> None:
    ms = meters(Meter(slug="m", aggregation=Aggregation.SUM, value_path="data.v", windows=(Window.DAY,)))
    records = [Record(event(n, {"v": v}), 0, n) for n, v in enumerate(["1e30", "1", "1e-28"])]
    total, start = Decimal(0), 0
    for size in split:
        [(_, delta)] = ms.aggregate(records[start:start + size])
        total = Context(prec=100).add(total, delta.value)  # as PostgreSQL's numeric addition, exactly
        start += size
    assert total == Decimal("1000000000000000000000000000001.0000000000000000000000000001")


def test_a_group_value_too_long_for_the_counter_key_refuses_the_event() -> None:
    ms = meters(Meter(slug="m", group_by={"g": "data.g"}))
    ms.check(event(1, {"g": "\U00020000" * 128}))
    with pytest.raises(MeterError, match="longer than 512 bytes"):
        ms.check(event(1, {"g": "\U00020000" * 129}))


@pytest.mark.parametrize("data", [{}, {"v": None}, {"v": "abc"}, {"v": True}, {"v": [1]}, {"v": "NaN"}, {"v": "1e999"},
                                  {"v": "1e-101"}, {"v": "0." + "0" * 100 + "1"}])
def test_a_meter_that_cannot_read_its_value_refuses_the_event(data: object) -> None:
    ms = meters(Meter(slug="m", aggregation=Aggregation.SUM, value_path="data.v"))
    with pytest.raises(MeterError):
        ms.check(event(1, data))


def test_meter_definitions_are_checked() -> None:
    with pytest.raises(ValueError, match="needs a value_path"):
        Meter(slug="m", aggregation=Aggregation.SUM)
    with pytest.raises(ValueError, match="COUNT takes no value_path"):
        Meter(slug="m", value_path="data.v")
    config = load_meters(inline="meters: [{slug: tokens, event_type: 'llm.*', aggregation: SUM, value_path: data.t,"
                                " windows: [minute, month]}]")
    assert config.meters[0].windows == (Window.MINUTE, Window.MONTH)
    with pytest.raises(ValueError, match="listed twice"):
        Meter(slug="m", windows=(Window.DAY, Window.DAY))
    assert [m.slug for m in load_meters().meters] == ["events", "logs", "event_types"]
    assert [m.slug for m in config.meters] == ["tokens", "logs"], "the built-in logs meter joins a configured set"


class FakeMessage:
    def __init__(self, value: bytes | None, offset: int, partition: int = 0) -> None:
        self._value, self._offset, self._partition = value, offset, partition

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes:
        return b"k"

    def headers(self) -> None:
        return None

    def topic(self) -> str:
        return "events"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


def test_validation_sets_poison_aside_with_its_reason_and_marks_late_events() -> None:
    validator = Validator(meters(Meter(slug="m", aggregation=Aggregation.SUM, value_path="data.v")),
                          ["api.*"], timedelta(hours=1))
    now = at(2026, 3, 1, 12)
    good = event(1, {"v": 1})
    late = event(2, {"v": 1}, time_=now - timedelta(hours=3), received_at=now)
    messages = [
        FakeMessage(good.to_bytes(), 0), FakeMessage(b"{not json", 1), FakeMessage(b'{"id": "x"}', 2),
        FakeMessage(event(3, {"v": 1}, type_="web.click").to_bytes(), 3), FakeMessage(event(4, {}).to_bytes(), 4),
        FakeMessage(None, 5), FakeMessage(late.to_bytes(), 6), FakeMessage(event(7, {"v": "a\u0000"}).to_bytes(), 7),
    ]
    batch = validator.batch(messages, now)  # type: ignore[arg-type]
    assert [(d.offset, d.stage, d.error_class) for d in batch.dead_letters] == [
        (1, "decode", "InvalidJSON"), (2, "decode", "SchemaMismatch"), (3, "validate", "UnknownEventType"),
        (4, "meter", "MeterError"), (5, "decode", "EmptyMessage"), (7, "decode", "UnstorableValue"),
    ]
    assert [(r.offset, r.counted) for r in batch.records] == [(0, True), (6, False)]
    assert batch.late == 1
    assert [(tp.partition, tp.offset) for tp in batch.commit_offsets()] == [(0, 8)]


def test_validation_dead_letters_what_storage_could_never_take_and_keeps_a_literal_backslash_u0000() -> None:
    validator = Validator(meters(Meter(slug="m")), ["*"], timedelta(days=1))
    now = at(2026, 3, 1, 12)
    good = event(0, {"v": 1})
    raw = {
        1: good.model_copy(update={"source": "\U00020000" * 257}).to_bytes(),  # 1028 bytes
        2: good.model_copy(update={"id": "\U00020000" * 256, "source": "s" * 512}).to_bytes(),  # fits
        3: good.to_bytes().replace(b'"2026-03-01T10:00:00Z"', b'"9999-12-31T23:30:00-05:00"', 1),
        4: good.to_bytes().replace(b'"2026-03-01T10:00:00Z"', b'"0001-01-01T00:30:00+01:00"', 1),
        5: good.to_bytes().replace(b'{"v":1}', b'{"v":1,"n":18446744073709551616}'),
        6: event(6, {"path": "C:\\u0000dir"}).to_bytes(),
        7: event(7, {"a\u0000": 1}).to_bytes(),
    }
    batch = validator.batch([FakeMessage(value, offset) for offset, value in raw.items()], now)  # type: ignore[arg-type]
    assert [(d.offset, d.error_class) for d in batch.dead_letters] == [
        (1, "UnstorableValue"), (3, "UnstorableValue"), (4, "UnstorableValue"), (5, "UnstorableValue"),
        (7, "UnstorableValue")]
    assert [r.offset for r in batch.records] == [2, 6]


def test_dead_letter_headers_round_trip() -> None:
    letter = DeadLetter("decode", "InvalidJSON", "bad", "events", 2, 41, at(2026, 3, 1), 2, b"k", b"v",
                        original_headers=(("tenant", b"t1"), ("schema-version", b"1")))
    assert DeadLetter.from_message(letter.headers(), b"k", b"v") == letter


def test_a_dead_letter_too_large_is_cut_to_fit_and_points_at_the_original() -> None:
    letter = DeadLetter("decode", "UnstorableValue", "NUL", "events", 2, 41, at(2026, 3, 1), 1, b"k", b"v" * 5000,
                        original_headers=(("tenant", b"t1"),))
    assert letter.fitted(10_000) is letter
    cut = letter.fitted(2000)
    assert cut.wire_size() <= 2000 and cut.truncated_from == 5000 and cut.value == b"v" * len(cut.value or b"")
    assert (cut.topic, cut.partition, cut.offset, cut.original_headers) == ("events", 2, 41, (("tenant", b"t1"),))
    assert DeadLetter.from_message(cut.headers(), cut.key, cut.value) == cut
    pointer = cut.pointer()
    assert (pointer.value, pointer.truncated_from, pointer.offset) == (None, 5000, 41)


def test_counter_state_round_trips_with_an_exact_decimal_value() -> None:
    state = CounterState(key="k", tenant="t", meter="m", aggregation=Aggregation.SUM, window="day",
                         window_start=at(2026, 3, 1), window_end=at(2026, 3, 2), subject=None, group={},
                         value="0.30000000000000000001", count=3, revision=2, updated_at=at(2026, 3, 1, 5))
    assert CounterState.from_bytes(state.to_bytes()) == state


def test_an_abandoned_batch_is_read_again_before_what_was_consumed_after_it() -> None:
    from types import SimpleNamespace

    from tally.processors.batch import Batch
    from tally.processors.consumer import Processor

    def batch(*offsets: tuple[int, int]) -> Batch:
        return Batch(messages=[FakeMessage(b"{}", o, p) for p, o in offsets])

    # Partition 1 left the group while the batch was in flight; 0 and 2 stay.
    state = SimpleNamespace(checkpoint=SimpleNamespace(assigned={("events", 0), ("events", 2)}),
                            _held=[FakeMessage(b"{}", 9, 0)])
    Processor._read_again(state, batch((0, 1), (1, 1), (2, 1)), batch((0, 2), (1, 2)))  # type: ignore[arg-type]
    assert [(m.partition(), m.offset()) for m in state._held] == [(0, 1), (2, 1), (0, 2), (0, 9)]


def test_a_batch_observed_at_once_reads_as_each_event_observed_alone() -> None:
    """metrics.observe_many writes prometheus_client's histogram itself: it must land where `observe` would."""
    from prometheus_client import CollectorRegistry, Histogram

    from tally.processors.metrics import observe_many

    buckets = (0.01, 0.05, 0.1, 1)
    one_by_one = Histogram("h", "h", buckets=buckets, registry=CollectorRegistry())
    at_once = Histogram("h", "h", buckets=buckets, registry=CollectorRegistry())
    for amount, times in ((0.0, 3), (0.01, 2), (0.011, 5), (0.1, 1), (0.5, 4), (1.0, 1), (7.25, 2)):
        for _ in range(times):
            one_by_one.observe(amount)
        observe_many(at_once, amount, times)

    def samples(h: Histogram) -> dict[tuple[str, str], float]:
        return {(s.name, s.labels.get("le", "")): s.value for s in next(iter(h.collect())).samples
                if not s.name.endswith("_created")}

    assert samples(at_once) == pytest.approx(samples(one_by_one))
