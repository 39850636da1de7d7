"""Counter windows: the key that names one window and the absolute state published for it.

`tally.counters.v1` is compacted: its key is `CounterKey.to_bytes()` and its value the latest
`CounterState`, so re-publishing a state is harmless and the newest value per key wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

Scalar = str | int | float | bool | None


# How a meter makes a window's value from its events (meters.definitions); published with every counter state.
class Aggregation(str, Enum):
    COUNT = "COUNT"
    SUM = "SUM"
    MAX = "MAX"
    MIN = "MIN"
    LATEST = "LATEST"
    AVG = "AVG"  # kept as sum and count; the value is their quotient
    UNIQUE_COUNT = "UNIQUE_COUNT"  # distinct values per window, exact up to max_distinct (ADR 0030)
    WEIGHTED_SUM = "WEIGHTED_SUM"  # level × time, events carry the new level (ADR 0031)


@dataclass(frozen=True, order=True)
class CounterKey:
    """One counter window: a meter's value for a tenant, subject and group, from window_start."""

    tenant: str
    meter: str
    window: str
    window_start: datetime
    subject: str | None
    group: tuple[tuple[str, Scalar], ...]

    def to_text(self) -> str:
        """Stable, unambiguous text: the primary key in PostgreSQL and the Kafka message key."""
        return orjson.dumps([
            self.tenant, self.meter, self.window, self.window_start.isoformat(), self.subject,
            dict(self.group),
        ]).decode()

    def to_bytes(self) -> bytes:
        return self.to_text().encode()


@dataclass
class CounterDelta:
    """What a set of new events adds to one counter window, before it meets the stored state."""

    key: CounterKey
    window_end: datetime
    aggregation: Aggregation
    value: Decimal
    count: int
    latest_time: datetime
    total: Decimal | None = None  # AVG: the sum; WEIGHTED_SUM: the exact integral in level × seconds
    level: Decimal | None = None  # WEIGHTED_SUM: the level at integrated_until
    integrated_until: datetime | None = None  # WEIGHTED_SUM: the value integrates up to here
    sample_level: int | None = None  # UNIQUE_COUNT: 0 exact; k keeps values whose hash is below 2**(63-k)


class CounterState(BaseModel):
    """The absolute state of one counter window, as published and cached.

    `value` is a decimal string so that billing sums stay exact; `revision` grows by one with every
    committed update, so a reader can tell a newer state from an older one.

    Some aggregations carry more, and only they (older readers ignore fields they do not know):
    - AVG: `sum`; `value` is sum / count, `sum` and `count` are exact.
    - WEIGHTED_SUM: `value` is level × time in the meter's unit up to `integrated_until` (the window
      end once a later level is known, else the time of the last level); `level` holds from there on,
      so a reader extrapolates value + level × (t - integrated_until) (`level_seconds_at`). `sum` is
      the same integral, exact, in level × seconds. A window with no level change has no state: the level of the
      window before it holds throughout (ADR 0031).
    - UNIQUE_COUNT: `approximate`: false while every distinct value is kept; true once the window
      kept more than the meter's `max_distinct` and switched to a sample (ADR 0030).
    """

    model_config = ConfigDict(extra="ignore")

    key: str
    tenant: str
    meter: str
    aggregation: Aggregation
    window: str
    window_start: datetime
    window_end: datetime
    subject: str | None
    group: dict[str, Any]
    value: str
    count: int
    revision: int
    updated_at: datetime
    sum: str | None = None
    level: str | None = None
    integrated_until: datetime | None = None
    approximate: bool | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude={f for f in _OPTIONAL if getattr(self, f) is None}))

    @classmethod
    def from_bytes(cls, raw: bytes) -> "CounterState":
        return cls.model_validate_json(raw)

    def level_seconds_at(self, at: datetime) -> Decimal:
        """WEIGHTED_SUM: the window's integral in level × seconds up to `at` (capped at the window end),
        extrapolating the current level past `integrated_until`. Divide by the meter's unit in seconds."""
        if self.sum is None or self.level is None or self.integrated_until is None:
            raise ValueError(f"{self.aggregation.value} state {self.key} carries no level")
        span = max(min(at, self.window_end) - self.integrated_until, timedelta(0))
        return Decimal(self.sum) + Decimal(self.level) * exact_seconds(span)


def exact_seconds(span: timedelta) -> Decimal:
    """A timedelta in seconds as an exact decimal (microseconds included)."""
    return Decimal((span.days * 86400 + span.seconds) * 1_000_000 + span.microseconds).scaleb(-6)


_OPTIONAL = ("sum", "level", "integrated_until", "approximate")


@dataclass(frozen=True, slots=True)
class EncodedState:
    """A counter state as published and cached, encoded once without building the model.

    `value` holds exactly the bytes `CounterState.to_bytes()` gives for the same state (a test holds
    them equal), so readers keep using CounterState.from_bytes.
    """

    key: str
    tenant: str
    subject: str | None
    revision: int
    window_end: datetime
    value: bytes

    def to_bytes(self) -> bytes:
        return self.value


def encode_state(key: str, tenant: str, meter: str, aggregation: str, window: str, window_start: datetime,
                 window_end: datetime, subject: str | None, group: dict[str, Any], value: str, count: int,
                 revision: int, updated_at: datetime, total: str | None = None, level: str | None = None,
                 integrated_until: datetime | None = None, approximate: bool | None = None) -> EncodedState:
    """The CounterState for these fields, in the model's field order and JSON forms (optional ones only when set)."""
    fields = {
        "key": key, "tenant": tenant, "meter": meter, "aggregation": Aggregation(aggregation).value,
        "window": window, "window_start": window_start, "window_end": window_end, "subject": subject,
        "group": group, "value": value, "count": count, "revision": revision, "updated_at": updated_at,
    }
    for name, optional in (("sum", total), ("level", level), ("integrated_until", integrated_until),
                           ("approximate", approximate)):
        if optional is not None:
            fields[name] = optional
    raw = orjson.dumps(fields, option=orjson.OPT_UTC_Z)
    return EncodedState(key, tenant, subject, revision, window_end, raw)


# Either form of a counter state: what the counter topic and the cache accept.
PublishedState = CounterState | EncodedState
