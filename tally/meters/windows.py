"""Where a counter window starts and ends: the one place that maps an event time to a window.

Windows are UTC calendar windows keyed by their start, so a new period starts a new counter and
nothing is reset in place. Billing-period windows, anchored per tenant, belong here too.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from tally.meters.definitions import Window

_FIXED = {
    Window.MINUTE: timedelta(minutes=1),
    Window.HOUR: timedelta(hours=1),
    Window.DAY: timedelta(days=1),
}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def bounds(window: Window, at: datetime) -> tuple[datetime, datetime]:
    """The [start, end) of the window that contains `at`, in UTC."""
    at = at.astimezone(timezone.utc)
    if window is Window.MONTH:
        start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    length = _FIXED[window]
    start = at - (at - _EPOCH) % length
    return start, start + length
