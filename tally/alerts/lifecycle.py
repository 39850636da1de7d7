"""One rule and group, one evaluation: where it stands next and which transition, if any, that is.

ok → pending when the window breaches; pending → firing once the breach has lasted `for` and the cooldown
since the last resolution is over (with `for` 0 it fires at once); pending → ok when the breach ends before
that, without a transition; firing → ok when it ends, with a `resolved` transition. Only firing and resolved
are transitions: they are what is published and delivered, each once (docs/adr/0050).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal


@dataclass(frozen=True)
class Standing:
    """A rule and group that is not ok: pending since the breach began, or firing since `fired_at`."""

    status: Literal["pending", "firing"]
    pending_since: datetime
    fired_at: datetime | None = None


@dataclass(frozen=True)
class Step:
    standing: Standing | None  # None: ok
    transition: Literal["firing", "resolved"] | None = None


def step(current: Standing | None, breached: bool, now: datetime, *, for_s: int, cooldown_s: int,
         resolved_at: datetime | None) -> Step:
    if current is None:
        if not breached:
            return Step(None)
        current = Standing("pending", now)
    elif not breached:
        return Step(None, "resolved" if current.status == "firing" else None)
    if current.status == "firing":
        return Step(current)
    lasted = now - current.pending_since >= timedelta(seconds=for_s)
    cooled = resolved_at is None or now - resolved_at >= timedelta(seconds=cooldown_s)
    if lasted and cooled:
        return Step(Standing("firing", current.pending_since, now), "firing")
    return Step(current)
