"""Meter definitions: what to count, declared in configuration rather than code.

A meter turns matching events into counter windows: it filters by event type, reads a value from
the event (except COUNT), groups by paths into the event, and keeps one counter per window start.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Aggregation(str, Enum):
    COUNT = "COUNT"
    SUM = "SUM"
    MAX = "MAX"
    MIN = "MIN"
    LATEST = "LATEST"


class Window(str, Enum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


class Meter(BaseModel):
    """One meter. Paths are dotted and rooted at the envelope: `data.tokens`, `type`, `source`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    event_type: str = Field("*", description="exact type or a glob such as 'api.*'")
    aggregation: Aggregation = Aggregation.COUNT
    value_path: str | None = None
    group_by: dict[str, str] = Field(default_factory=dict)
    per_subject: bool = True
    windows: tuple[Window, ...] = (Window.HOUR, Window.DAY)

    @model_validator(mode="after")
    def _value_path_fits_aggregation(self) -> "Meter":
        if self.aggregation is Aggregation.COUNT and self.value_path:
            raise ValueError(f"meter {self.slug}: COUNT takes no value_path")
        if self.aggregation is not Aggregation.COUNT and not self.value_path:
            raise ValueError(f"meter {self.slug}: {self.aggregation.value} needs a value_path")
        if not self.windows:
            raise ValueError(f"meter {self.slug}: at least one window")
        return self


class MetersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meters: list[Meter]

    @model_validator(mode="after")
    def _unique_slugs(self) -> "MetersConfig":
        slugs = [m.slug for m in self.meters]
        if len(set(slugs)) != len(slugs):
            raise ValueError("meter slugs must be unique")
        return self


DEFAULT_METERS = MetersConfig(meters=[
    Meter(slug="events", event_type="*", group_by={"type": "type"}, windows=(Window.HOUR, Window.DAY)),
])
