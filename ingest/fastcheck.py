"""A quick yes for plainly valid CloudEvents, so the common event skips pydantic's model round trip.

`plain_event` accepts only what `schemas.envelope.CloudEvent` surely accepts with the same values
(exact `str` attributes within their lengths, specversion 1.0, an RFC 3339 time with its offset
inside the allowed range). Anything else returns None and goes through the model, which words the
problem exactly as before. Tests hold both paths to the same envelope bytes.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from schemas.envelope import MAX_ID, MAX_SOURCE, MAX_SUBJECT, MAX_TYPE

RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})")
REQUIRED = (("id", MAX_ID), ("source", MAX_SOURCE), ("type", MAX_TYPE))
OPTIONAL = (("subject", MAX_SUBJECT), ("datacontenttype", 128), ("dataschema", 512))


def _text(value: object, limit: int, required: bool) -> bool:
    if value is None:
        return not required
    return type(value) is str and len(value) <= limit and (bool(value) or not required)


def plain_event(obj: Any, now: datetime, max_future_s: float) -> dict[str, Any] | None:
    """The event's attributes (time parsed) if it is plainly valid, else None: then the model decides."""
    if type(obj) is not dict:
        return None
    get = obj.get
    spec = get("specversion", "1.0")
    if spec != "1.0" or type(spec) is not str:
        return None
    for name, limit in REQUIRED:
        if not _text(get(name), limit, True):
            return None
    for name, limit in OPTIONAL:
        if not _text(get(name), limit, False):
            return None
    time = get("time")
    if time is not None:
        if type(time) is not str or RFC3339.fullmatch(time) is None:
            return None
        try:
            time = datetime.fromisoformat(time)
            # 1970 and earlier, and times past the bound, are left to the model's exact checks
            if time.year <= 1970 or time > now + timedelta(seconds=max_future_s):
                return None
        except (ValueError, OverflowError):
            return None
    return {"specversion": "1.0", "id": obj["id"], "source": obj["source"], "type": obj["type"], "time": time,
            "subject": get("subject"), "datacontenttype": get("datacontenttype"), "dataschema": get("dataschema"),
            "data": get("data")}
