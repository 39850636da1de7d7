"""The content digest that tells an exact re-send (a duplicate) from a re-used id (a conflict)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from tally.schemas.envelope import Envelope, content_digest

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def _event(**changes: object) -> Envelope:
    fields = {"id": "a", "source": "s", "type": "t", "subject": "c", "time": NOW - timedelta(minutes=1),
              "received_at": NOW, "data": {"x": 1, "y": [1, 2]}, "tenant": "acme", **changes}
    return Envelope(**fields)


def test_an_exact_re_send_has_the_same_digest_whenever_it_is_received() -> None:
    assert content_digest(_event()) == content_digest(_event(received_at=NOW + timedelta(hours=1)))


def test_a_time_the_gateway_filled_in_is_not_content() -> None:
    later = NOW + timedelta(seconds=3)
    assert content_digest(_event(time=NOW)) == content_digest(_event(time=later, received_at=later))


def test_the_same_instant_in_another_offset_and_keys_in_another_order_are_the_same_content() -> None:
    other_zone = (NOW - timedelta(minutes=1)).astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert content_digest(_event()) == content_digest(_event(time=other_zone, data={"y": [1, 2], "x": 1}))


def test_integers_beyond_64_bits_are_content_too() -> None:
    assert content_digest(_event(data={"n": 2**70})) != content_digest(_event(data={"n": 2**70 + 1}))


def test_any_other_difference_is_a_conflict() -> None:
    base = content_digest(_event())
    for changed in (_event(type="u"), _event(subject=None), _event(time=NOW - timedelta(minutes=2)),
                    _event(data={"x": 2, "y": [1, 2]}), _event(data={"x": 1, "y": [2, 1]})):
        assert content_digest(changed) != base
