"""Meter definitions: what to count, declared in configuration rather than code.

A meter turns matching events into counter windows: it filters by event type, reads a value from
the event (except COUNT), groups by paths into the event, and keeps one counter per window start.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tally.meters import rules
from tally.schemas.counters import Aggregation
from tally.schemas.envelope import LOG_EVENT_TYPE


# Aggregations whose window value depends on what is already stored, not only on the new events:
# they are applied under a lock inside the writing transaction (tally/meters/stateful.py).
STATEFUL = frozenset({Aggregation.UNIQUE_COUNT, Aggregation.WEIGHTED_SUM})


class Window(str, Enum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


class Unit(str, Enum):
    """The time unit a WEIGHTED_SUM integrates in: level × hours (GB-hours) or level × days (seat-days)."""

    HOUR = "hour"
    DAY = "day"

    @property
    def seconds(self) -> int:
        return 3600 if self is Unit.HOUR else 86400


class Meter(BaseModel):
    """One meter. Paths are dotted and rooted at the envelope: `data.tokens`, `type`, `source`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    event_type: str = Field("*", max_length=256, description="exact type or a glob such as 'api.*'")
    aggregation: Aggregation = Aggregation.COUNT
    value_path: str | None = Field(None, max_length=256)
    group_by: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=256)]] = Field(
        default_factory=dict, max_length=16)
    per_subject: bool = True
    windows: tuple[Window, ...] = Field((Window.HOUR, Window.DAY), max_length=4)
    max_distinct: int = Field(100_000, ge=1, le=10_000_000,
                              description="UNIQUE_COUNT: values kept per window before sampling")
    unit: Unit | None = Field(None, description="WEIGHTED_SUM: level × hour or level × day")
    version: int = Field(1, ge=1, description="set by the meter catalog, never by a file: a change to what a meter "
                                              "counts is a new version with counters of its own (ADR 0140)")

    @property
    def counter(self) -> str:
        """The name this version's counters carry: the slug for version 1, `slug@N` after (a slug has no @)."""
        return self.slug if self.version == 1 else f"{self.slug}@{self.version}"

    @model_validator(mode="after")
    def _fields_agree(self) -> "Meter":
        refused = rules.definition(self)
        if refused:
            raise rules.Refused(refused)
        return self


class MetersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meters: list[Meter]

    @model_validator(mode="after")
    def _unique_slugs(self) -> "MetersConfig":
        # Counter names, so a tenant's versions of one meter (slug, slug@2, ...) may be compiled together.
        counters = [m.counter for m in self.meters]
        if len(set(counters)) != len(counters):
            raise ValueError("meter slugs must be unique")
        return self


# Built in: log records per service (their subject) and level, which `GET /v1/logs/stats` reads.
LOGS_METER = Meter(slug="logs", event_type=LOG_EVENT_TYPE, group_by={"level": "data.level"},
                   windows=(Window.MINUTE, Window.HOUR))

# Events per type and minute, tenant-wide: what event-type alert rules read (tally/schemas/alerts.py).
EVENT_TYPES_METER = Meter(slug="event_types", event_type="*", group_by={"type": "type"}, per_subject=False,
                          windows=(Window.MINUTE,))

DEFAULT_METERS = MetersConfig(meters=[
    Meter(slug="events", event_type="*", group_by={"type": "type"}, windows=(Window.HOUR, Window.DAY)),
    LOGS_METER,
    EVENT_TYPES_METER,
])


def with_built_ins(config: MetersConfig) -> MetersConfig:
    """A configured set plus the built-in logs meter, unless the configuration defines `logs` itself."""
    if any(meter.slug == LOGS_METER.slug for meter in config.meters):
        return config
    return MetersConfig(meters=[*config.meters, LOGS_METER])


def load_meters(path: Path | None = None, inline: str = "") -> MetersConfig:
    """Meters from inline JSON/YAML, else a YAML or JSON file, else the default set; always with the
    built-in logs meter that log stats read."""
    if inline.strip():
        return with_built_ins(MetersConfig.model_validate(yaml.safe_load(inline)))
    if path is not None:
        return with_built_ins(MetersConfig.model_validate(yaml.safe_load(path.read_text())))
    return DEFAULT_METERS
