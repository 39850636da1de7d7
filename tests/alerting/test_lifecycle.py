"""The lifecycle of one rule and group, step by step (tally/alerts/lifecycle.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from tally.alerts.lifecycle import Standing, Step, step

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


PENDING = Standing("pending", T0)
FIRING = Standing("firing", T0, at(30))


@pytest.mark.parametrize(("current", "breached", "now", "for_s", "cooldown_s", "resolved_at", "expected"), [
    (None, False, at(0), 0, 0, None, Step(None)),
    (None, True, at(0), 0, 0, None, Step(Standing("firing", T0, T0), "firing")),
    (None, True, at(0), 30, 0, None, Step(PENDING)),
    (PENDING, True, at(29), 30, 0, None, Step(PENDING)),
    (PENDING, True, at(30), 30, 0, None, Step(Standing("firing", T0, at(30)), "firing")),
    (PENDING, False, at(20), 30, 0, None, Step(None)),
    (FIRING, True, at(90), 30, 0, None, Step(FIRING)),
    (FIRING, False, at(90), 30, 0, None, Step(None, "resolved")),
    # cooldown: resolved at -10 s with a 60 s cooldown holds the firing until 50 s, however long the breach
    (None, True, at(0), 0, 60, at(-10), Step(PENDING)),
    (PENDING, True, at(49), 0, 60, at(-10), Step(PENDING)),
    (PENDING, True, at(50), 0, 60, at(-10), Step(Standing("firing", T0, at(50)), "firing")),
    (PENDING, True, at(50), 30, 60, at(-100), Step(Standing("firing", T0, at(50)), "firing")),
])
def test_step(current, breached, now, for_s, cooldown_s, resolved_at, expected) -> None:  # noqa: ANN001
    assert step(current, breached, now, for_s=for_s, cooldown_s=cooldown_s, resolved_at=resolved_at) == expected
