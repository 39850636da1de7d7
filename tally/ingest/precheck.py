"""A quick yes for plainly valid CloudEvents, so the common event skips pydantic's model round trip.

`plain_event` accepts only what `tally.schemas.envelope.CloudEvent` surely accepts with the same values
(exact `str` attributes within their lengths, specversion 1.0, an RFC 3339 time with its offset
inside the allowed range). Anything else returns None and goes through the model, which words the
problem exactly as before. Tests hold both paths to the same envelope bytes.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from tally.schemas.envelope import MAX_CONTENT_TYPE, MAX_DATASCHEMA, MAX_ID, MAX_SOURCE, MAX_SUBJECT, MAX_TYPE

RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})")


def _required(value: object, limit: int) -> bool:
    return type(value) is str and 0 < len(value) <= limit


def _optional(value: object, limit: int) -> bool:
    return value is None or (type(value) is str and len(value) <= limit)


def plain_event(obj: Any, now: datetime, max_future_s: float) -> dict[str, Any] | None:
    """The event's attributes (time parsed) if it is plainly valid, else None: then the model decides."""
    if type(obj) is not dict:
        return None
    get = obj.get
    spec, event_id, source, kind = get("specversion", "1.0"), get("id"), get("source"), get("type")
    subject, content_type, schema = get("subject"), get("datacontenttype"), get("dataschema")
    if not (type(spec) is str and spec == "1.0" and _required(event_id, MAX_ID) and _required(source, MAX_SOURCE)
            and _required(kind, MAX_TYPE) and _optional(subject, MAX_SUBJECT)
            and _optional(content_type, MAX_CONTENT_TYPE) and _optional(schema, MAX_DATASCHEMA)):
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
    return {"specversion": "1.0", "id": event_id, "source": source, "type": kind, "time": time, "subject": subject,
            "datacontenttype": content_type, "dataschema": schema, "data": get("data")}
