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

from tally.processors.decode import MODEL_DEPTH, _fast, decode, from_envelope
from tally.processors.storable import Unstorable, check_bounds, check_integers
from tally.schemas.counters import CounterState, encode_state
from tally.schemas.envelope import (MAX_CONTENT_TYPE, MAX_DATASCHEMA, MAX_ID, MAX_SOURCE, MAX_SUBJECT, MAX_TENANT,
                                    MAX_TYPE, Envelope)
from tally.sinks.base import Event

NOW = datetime(2026, 3, 1, 10, 0, 0, 123456, tzinfo=timezone.utc)
GOOD: dict[str, Any] = {
    "specversion": "1.0", "id": "e1", "source": "shop", "type": "api.call", "time": "2026-03-01T09:59:59.5+00:00",
    "subject": "c1", "data": {"tokens": 3, "model": "m"}, "tenant": "t1", "received_at": "2026-03-01T10:00:00Z",
}


Verdict = tuple[Event, str, Any, Any] | str


def seen(event: Event) -> Verdict:
    """What the verdict holds beyond `==`, which takes 1 for 1.0, 0.0 for -0.0 and one instant in any offset."""
    return event, repr(event.data), event.time.utcoffset(), event.received_at.utcoffset()


def model_verdict(raw: bytes) -> Verdict:
    """The model's verdict, and storage's on what the model accepts (integers beyond 64 bits, attributes over
    their byte limits and times outside the windows' range cannot be stored), as step 1 gives them."""
    try:
        event = from_envelope(Envelope.from_bytes(raw))
        check_integers(event.data)
        check_bounds(event)
        return seen(event)
    except (ValidationError, Unstorable) as exc:
        return str(exc)


def verdict(raw: bytes) -> Verdict:
    try:
        event = decode(raw)
        check_bounds(event)
        return seen(event)
    except (ValidationError, Unstorable) as exc:
        return str(exc)


def test_the_gateway_shape_takes_the_fast_path_with_the_model_values() -> None:
    envelope = Envelope(id="e1", source="shop", type="api.call", time=NOW - timedelta(seconds=1), subject="c1",
                        data={"n": 1}, tenant="t1", received_at=NOW)
    raw = envelope.to_bytes()
    assert _fast(raw) is not None
    assert verdict(raw) == model_verdict(raw)


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


# -- every rule of the envelope, on the fast path and off it: the same verdict as the model -------------

LIMITS = {"id": MAX_ID, "source": MAX_SOURCE, "type": MAX_TYPE, "tenant": MAX_TENANT, "subject": MAX_SUBJECT,
          "datacontenttype": MAX_CONTENT_TYPE, "dataschema": MAX_DATASCHEMA}
REQUIRED = ("id", "source", "type", "tenant", "time", "received_at")


def with_raw(literal: bytes, **fields: Any) -> bytes:
    """GOOD with `fields` changed and `data` written as the raw JSON `literal` (numbers as a producer wrote them)."""
    return json.dumps({**GOOD, **fields, "data": "@"}).encode().replace(b'"@"', literal)


def test_the_drain_benchmarks_shape_takes_the_fast_path() -> None:
    raw = orjson.dumps({**GOOD, "time": (NOW - timedelta(milliseconds=7)).isoformat(), "received_at": NOW.isoformat()})
    assert _fast(raw) is not None
    assert verdict(raw) == model_verdict(raw)


@pytest.mark.parametrize("ascii_only", [True, False])
@pytest.mark.parametrize("char", ["x", "é", "€", "😀"])
@pytest.mark.parametrize("more", [-1, 0, 1])
@pytest.mark.parametrize("name", sorted(LIMITS))
def test_each_length_limit_in_characters_and_in_bytes_gives_the_model_verdict(name: str, more: int, char: str,
                                                                              ascii_only: bool) -> None:
    raw = json.dumps({**GOOD, name: char * (LIMITS[name] + more)}, ensure_ascii=ascii_only).encode()
    assert verdict(raw) == model_verdict(raw)


def test_a_tenant_within_its_characters_but_over_its_bytes_is_unstorable_on_the_fast_path() -> None:
    raw = json.dumps({**GOOD, "tenant": "😀" * 128}, ensure_ascii=False).encode()
    assert _fast(raw) is not None
    assert verdict(raw) == model_verdict(raw) == "tenant is longer than 256 bytes in UTF-8"


@pytest.mark.parametrize("name", [*sorted(LIMITS), "specversion"])
def test_an_empty_attribute_gives_the_model_verdict(name: str) -> None:
    raw = json.dumps({**GOOD, name: ""}).encode()
    assert verdict(raw) == model_verdict(raw)


@pytest.mark.parametrize("value", [None, 5, 1.5, True, [], {}, ["a"], {"a": "b"}, "1.0\n", " 1.0", "1.00"])
@pytest.mark.parametrize("name", [*sorted(LIMITS), "specversion", "time", "received_at"])
def test_a_wrong_type_gives_the_model_verdict(name: str, value: Any) -> None:
    raw = json.dumps({**GOOD, name: value}).encode()
    assert verdict(raw) == model_verdict(raw)


@pytest.mark.parametrize("name", [*REQUIRED, "specversion", "subject", "data"])
def test_a_missing_attribute_gives_the_model_verdict(name: str) -> None:
    raw = json.dumps({k: v for k, v in GOOD.items() if k != name}).encode()
    assert verdict(raw) == model_verdict(raw)


@pytest.mark.parametrize("moment", [
    "2026-03-01T10:00:00", "2026-03-01T10:00:00.5", "2026-03-01t10:00:00z", "2026-03-01 10:00:00Z",
    "2026-03-01T10:00:00-00:00", "2026-03-01T10:00:00+0530", "2026-03-01T10:00:00+23:59", "2026-03-01T10:00:00-23:59",
    "2026-03-01T10:00:00+24:00", "2026-03-01T10:00:00.123456Z", "2026-03-01T10:00:00.1234567Z",
    "2026-03-01T10:00:00.9999995Z", "2026-03-01T10:00Z", "2026-03-01T10:00:00,5Z", "2026-03-01T10:00:00.Z",
    "2026-03-01T10:00:60Z", "2026-03-01T24:00:00Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+01:00", "1772359200", "", "now", "2026-03-01T10:00:00Z ", "２０２６-03-01T10:00:00Z",
])
@pytest.mark.parametrize("name", ["time", "received_at"])
def test_each_form_of_a_time_gives_the_model_verdict(name: str, moment: str) -> None:
    raw = json.dumps({**GOOD, name: moment}, ensure_ascii=False).encode()
    assert verdict(raw) == model_verdict(raw)


@pytest.mark.parametrize("literal", [
    b"9223372036854775807", b"9223372036854775808", b"18446744073709551615", b"18446744073709551616",
    b"-9223372036854775808", b"-9223372036854775809", b"1000000000000000000", b"-1000000000000000000",
    b"123456789012345678901234567890", b'{"a": [1, {"b": 99999999999999999999}]}',
    b"0.1000000000000000055511151231257827", b"1e400", b"-1e400", b"1e-400", b"1E+2", b"-0", b"-0.0", b"2.5e-8",
    b"1.7976931348623157e308", b"5e-324", b"[1, 2.0, -3, 4e0]",
])
def test_each_number_gives_the_model_verdict(literal: bytes) -> None:
    raw = with_raw(literal)
    assert verdict(raw) == model_verdict(raw)


def test_an_integer_beyond_64_bits_outside_data_gives_the_model_verdict() -> None:
    raw = json.dumps({**GOOD, "extra": {"n": 2**70}}).encode()
    assert verdict(raw) == model_verdict(raw)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"[NaN]"])
def test_a_number_json_does_not_have_gives_the_model_verdict(literal: bytes) -> None:
    raw = with_raw(literal)
    assert repr(verdict(raw)) == repr(model_verdict(raw))  # NaN is not equal to itself


def test_the_model_parses_nesting_up_to_model_depth() -> None:
    """Pins pydantic-core's limit, which the fast path defers to: a release that lowers it fails here."""
    assert from_envelope(Envelope.from_bytes(with_raw(b"[" * MODEL_DEPTH + b"]" * MODEL_DEPTH)))
    with pytest.raises(ValidationError, match="recursion limit exceeded"):
        Envelope.from_bytes(with_raw(b"[" * (MODEL_DEPTH + 1) + b"]" * (MODEL_DEPTH + 1)))


@pytest.mark.parametrize("literal", [
    b"[" * 64 + b"]" * 64, b"[" * 199 + b"]" * 199, b"[" * 200 + b"]" * 200, b"[" * 201 + b"]" * 201,
    b"[" * 250 + b"]" * 250, b'{"a":' * 201 + b"1" + b"}" * 201, b"[" + b",".join([b'{"n": 1}'] * 300) + b"]",
    b'{"a": {"b": [1, {"c": [true, false, null, "x"]}]}, "\\u00e9": "\\ud83d\\ude00"}',
])
def test_nested_data_gives_the_model_verdict(literal: bytes) -> None:
    raw = with_raw(literal)
    assert verdict(raw) == model_verdict(raw)


def test_nesting_deeper_than_the_model_parses_outside_data_gives_the_model_verdict() -> None:
    raw = json.dumps({**GOOD, "extra": None}).encode().replace(b"null", b"[" * 201 + b"]" * 201)
    assert verdict(raw) == model_verdict(raw)
    assert isinstance(model_verdict(raw), str)


@pytest.mark.parametrize("raw", [b"[]", b"1", b"true", b"null", b'"x"', b"{}", b" ", json.dumps([GOOD]).encode(),
                                 json.dumps(GOOD).encode() + b" \r\n\t", json.dumps(GOOD).encode() + b" x",
                                 json.dumps(GOOD).encode()[:-1] + b",}", json.dumps(GOOD).encode()[:-1]])
def test_json_that_is_not_one_object_gives_the_model_verdict(raw: bytes) -> None:
    assert verdict(raw) == model_verdict(raw)


@pytest.mark.parametrize("bad", [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf4\x90\x80\x80",
                                 b"\\ud800", b"\\udc00", b"\\ud800\\u0041", b"\x00", b"\n"])
@pytest.mark.parametrize("where", ["subject", "tenant", "data key", "data value", "extra member", "extra key"])
def test_invalid_text_anywhere_gives_the_model_verdict(where: str, bad: bytes) -> None:
    fields = {"subject": "s@", "tenant": "t@", "data key": {"k@": 1}, "data value": {"k": "v@"},
              "extra member": {"x": "v@"}, "extra key": {"k@": 1}}
    value = fields[where]
    change = {"extra": value} if where.startswith("extra") else {"data": value} if where.startswith("data") \
        else {where: value}
    raw = json.dumps({**GOOD, **change}).encode().replace(b"@", bad)
    assert verdict(raw) == model_verdict(raw)


@pytest.mark.parametrize("first, last", [
    (b'"id": "a"', b'"id": "b"'), (b'"time": "bad"', b'"time": "2026-03-01T10:00:00Z"'),
    (b'"time": "2026-03-01T10:00:00Z"', b'"time": "bad"'), (b'"data": [1]', b'"data": {"n": 2}'),
    (b'"tenant": ""', b'"tenant": "t2"'), (b'"subject": "s"', b'"subject": null'),
])
def test_an_attribute_given_twice_gives_the_model_verdict(first: bytes, last: bytes) -> None:
    raw = b"{" + first + b", " + json.dumps(GOOD).encode()[1:-1] + b", " + last + b"}"
    assert verdict(raw) == model_verdict(raw)


def test_escaped_attribute_names_and_values_give_the_model_verdict() -> None:
    raw = json.dumps(GOOD).encode().replace(b'"id"', b'"\\u0069d"').replace(b'"1.0"', b'"\\u0031.0"')
    assert verdict(raw) == model_verdict(raw)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(_JSON, st.booleans())
def test_any_data_gives_the_model_verdict_and_values(data: Any, ascii_only: bool) -> None:
    raw = json.dumps({**GOOD, "data": data}, ensure_ascii=ascii_only).encode()
    assert verdict(raw) == model_verdict(raw)


_GATEWAY = Envelope(id="e1", source="shop", type="api.call", time=NOW - timedelta(seconds=1), subject="c1",
                    data={"n": 1, "f": 0.25, "s": "é"}, tenant="t1", received_at=NOW).to_bytes()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_GATEWAY)), st.sampled_from(["insert", "delete", "replace"]),
                          st.sampled_from([bytes([b]) for b in b'"{}[],:\\0129eE.-+ tnfu\x00\x80\xc3\xff'])),
                min_size=1, max_size=3))
def test_any_edit_of_a_gateway_message_gives_the_model_verdict(edits: list[tuple[int, str, bytes]]) -> None:
    raw = bytearray(_GATEWAY)
    for at, how, byte in edits:
        at = min(at, len(raw))
        raw[at:at + (how != "insert")] = b"" if how == "delete" else byte
    assert verdict(bytes(raw)) == model_verdict(bytes(raw))
