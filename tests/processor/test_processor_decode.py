"""The processor's decoder agrees with the Envelope model on every input: same values, same verdict."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tally.processors.decode import _fast, decode, from_envelope
from tally.processors.storable import Unstorable, check_integers
from tally.schemas.counters import CounterState, encode_state
from tally.schemas.envelope import Envelope
from tally.sinks.base import Event

NOW = datetime(2026, 3, 1, 10, 0, 0, 123456, tzinfo=timezone.utc)
GOOD: dict[str, Any] = {
    "specversion": "1.0", "id": "e1", "source": "shop", "type": "api.call", "time": "2026-03-01T09:59:59.5+00:00",
    "subject": "c1", "data": {"tokens": 3, "model": "m"}, "tenant": "t1", "received_at": "2026-03-01T10:00:00Z",
}


def model_verdict(raw: bytes) -> Event | str:
    """The model's verdict, and storage's on what the model accepts: integers beyond 64 bits cannot be stored."""
    try:
        event = from_envelope(Envelope.from_bytes(raw))
        check_integers(event.data)
        return event
    except (ValidationError, Unstorable) as exc:
        return str(exc)


def verdict(raw: bytes) -> Event | str:
    try:
        return decode(raw)
    except (ValidationError, Unstorable) as exc:
        return str(exc)


def test_the_gateway_shape_takes_the_fast_path_with_the_model_values() -> None:
    envelope = Envelope(id="e1", source="shop", type="api.call", time=NOW - timedelta(seconds=1), subject="c1",
                        data={"n": 1}, tenant="t1", received_at=NOW)
    raw = envelope.to_bytes()
    assert _fast(raw) is not None
    assert decode(raw) == model_verdict(raw)


@pytest.mark.parametrize("change", [
    {"id": ""}, {"id": "x" * 257}, {"id": 5}, {"source": None}, {"type": ["a"]}, {"tenant": "t" * 129},
    {"specversion": "1.1"}, {"specversion": 1.0}, {"subject": 7}, {"subject": "s" * 257}, {"subject": None},
    {"datacontenttype": "c" * 129}, {"dataschema": 3}, {"time": "2026-03-01"}, {"time": "2026-03-01 10:00:00Z"},
    {"time": "2026-03-01T10:00:00"}, {"time": "2026-03-01T24:00:00Z"}, {"time": "2026-02-30T10:00:00Z"},
    {"time": 1772359200}, {"time": "2026-03-01T10:00:00.1234567Z"}, {"time": "2026-03-01T10:00:00+05:30"},
    {"time": "0000-03-01T10:00:00Z"}, {"received_at": None}, {"data": 123456789012345678901234567890},
    {"data": {"n": [2**64 - 1, -(2**63)]}}, {"data": {"n": [-(2**63) - 1]}},
    {"data": 1e300}, {"data": [1, "two", None, {"x": False}]}, {"extra": "ignored"},
])
def test_each_rule_gives_the_model_verdict(change: dict[str, Any]) -> None:
    raw = json.dumps({**GOOD, **change}).encode()
    assert verdict(raw) == model_verdict(raw)


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'"x"', b"null", b"", b'{"id": "a\\ud800"}', b"\xef\xbb\xbf{}",
                                 b'{"id":"a","id":"b"' + orjson.dumps(GOOD)[1:]])
def test_malformed_input_gives_the_model_verdict(raw: bytes) -> None:
    assert verdict(raw) == model_verdict(raw)


_TEXT = st.one_of(st.none(), st.integers(), st.text(max_size=3), st.text(min_size=255, max_size=260),
                  st.sampled_from(["1.0", "2026-03-01T10:00:00Z", "2026-03-01T10:00:00.5-01:00"]))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(GOOD) + ["other"]), _TEXT), st.booleans())
def test_any_mix_of_fields_gives_the_model_verdict(fields: dict[str, Any], start_good: bool) -> None:
    raw = json.dumps({**(GOOD if start_good else {}), **fields}).encode()
    assert verdict(raw) == model_verdict(raw)


def test_encoded_counter_states_are_the_model_bytes() -> None:
    args = ("k", "t", "m", "SUM", "day", NOW, NOW + timedelta(days=1), None, {"region": "eu", "n": 1}, "0.30", 3, 2,
            NOW)
    state = CounterState(key="k", tenant="t", meter="m", aggregation="SUM", window="day", window_start=NOW,
                         window_end=NOW + timedelta(days=1), subject=None, group={"region": "eu", "n": 1},
                         value="0.30", count=3, revision=2, updated_at=NOW)
    assert encode_state(*args).to_bytes() == state.to_bytes()
