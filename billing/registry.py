"""The jobs `tally jobs` knows, by name."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from billing.context import JobContext
from billing.jobs import Job, refresh_limits


async def _limits(ctx: JobContext, _key: str, _now: datetime) -> dict[str, Any]:
    return {"blocked_subjects": await refresh_limits(ctx)}


LIMITS = Job("limits", _limits, lambda now: now.isoformat(timespec="seconds"),
             "decide hard-limit blocks now (the worker does it continuously)")

SCHEDULED: list[Job] = []
BY_NAME = {job.name: job for job in [LIMITS, *SCHEDULED]}
