"""Work done in rounds until asked to stop: a failed round is logged and the next one tries again, so an outage
of the database or the broker is waited out, never a stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("tally.alerts")


async def every(period_s: float, stop: asyncio.Event, work: Callable[[], Awaitable[object]], what: str,
                errors: tuple[type[BaseException], ...]) -> None:
    """Run `work`, then wait `period_s` or until `stop`, and again; an error of `errors` ends only its round."""
    while not stop.is_set():
        try:
            await work()
        except errors:
            log.exception("%s failed; trying again in %.1f s", what, period_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)
