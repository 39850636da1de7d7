"""Alert rules and alert transitions: what a tenant declares, and what is published when a rule fires or resolves.

A rule reads one meter's minute windows (the built-in `logs` meter for log rules, `event_types` for event
rules, or any configured meter with a minute window): the filter picks windows by their subject and group
values, the measure adds them up over the sliding window, and the comparison decides the breach.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator

from tally.egress import MAX_URL_BYTES, endpoint

from tally.schemas.logs import Level

_DURATION = re.compile(r"^(\d+)(s|m|h)$")
_SECONDS = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW_S = 24 * 3600
MAX_TARGETS = 10


def _seconds(value: Any) -> Any:
    """`90s`, `5m`, `1h` or a number of seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if not match:
            raise ValueError("a duration is a whole number of s, m or h, e.g. 30s, 5m, 1h")
        return int(match.group(1)) * _SECONDS[match.group(2)]
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as 5m, not true or false")
    return value


Seconds = Annotated[int, BeforeValidator(_seconds)]
Scalar = str | int | float | bool


class RuleFilter(BaseModel):
    """Which counter windows count. Every field given must hold."""

    model_config = ConfigDict(extra="forbid")

    event_type: str | None = Field(None, min_length=1, max_length=256,
                                   description="exact type or a glob such as 'payment.*' (the meter's `type` group)")
    service: str | None = Field(None, min_length=1, max_length=128, description="a log service (the logs meter's subject)")
    subject: str | None = Field(None, min_length=1, max_length=256)
    level: Level | None = Field(None, description="log records at this level and above (the `level` group)")
    attributes: dict[str, Scalar] = Field(default_factory=dict, max_length=8,
                                          description="equality on the meter's group_by fields")


class Measure(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meter: str | None = Field(None, description="default: `logs` when the filter names a service or level, "
                                                "else `event_types`")
    of: Literal["count", "value"] = Field("count", description="events counted, or the meter's value "
                                                                "(summed, or the max/min/average over the window)")


class SlackTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["slack"]
    url: str = Field(min_length=1, max_length=MAX_URL_BYTES, description="a Slack incoming webhook (on a Slack hook "
                     "host unless the operator allows others); checked by egress.check_target where it enters")


class WebhookTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["webhook"]
    url: str = Field(min_length=1, max_length=MAX_URL_BYTES, description="an http(s) URL at a public address "
                     "(unless the operator allows private ones); checked by egress.check_target where it enters")
    secret: str = Field(pattern=r"^whsec_[A-Za-z0-9+/=]{24,}$",
                        description="Standard Webhooks signing secret, whsec_ and base64 of at least 18 bytes")


Target = Annotated[SlackTarget | WebhookTarget, Field(discriminator="type")]


class AlertRule(BaseModel):
    """One rule. `window` slides by whole minutes: that many minute windows before the current one, and the current
    one so far (ADR 0050)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    name: str = Field(min_length=1, max_length=200)
    filter: RuleFilter = Field(default_factory=RuleFilter)
    measure: Measure = Field(default_factory=Measure)
    window: Seconds = Field(300, ge=60, le=MAX_WINDOW_S, description="e.g. 5m; whole minutes")
    every: Seconds = Field(5, ge=1, le=3600, description="how often the rule is evaluated (the API refuses less "
                           "than TALLY_ALERTS_MIN_EVERY_S)")
    comparison: Literal[">", ">=", "<", "<="] = ">"
    threshold: Decimal
    group_by: list[Literal["service", "subject", "level", "type"]] = Field(default_factory=list, max_length=3)
    for_: Seconds = Field(0, alias="for", ge=0, le=MAX_WINDOW_S, description="how long the breach lasts before firing")
    cooldown: Seconds = Field(0, ge=0, le=7 * 24 * 3600, description="after resolving, how long before it fires again")
    targets: list[Target] = Field(default_factory=list, max_length=MAX_TARGETS)
    enabled: StrictBool = True

    @model_validator(mode="after")
    def _whole_minutes(self) -> "AlertRule":
        if self.window % 60:
            raise ValueError("window is a whole number of minutes (counter windows are minutes)")
        if len(set(self.group_by)) != len(self.group_by):
            raise ValueError("group_by names a field twice")
        return self

    @property
    def meter(self) -> str:
        if self.measure.meter:
            return self.measure.meter
        logs = self.filter.service is not None or self.filter.level is not None or "service" in self.group_by
        return "logs" if logs else "event_types"

    def breached(self, value: Decimal | None) -> bool:
        """A window without data breaches nothing for a value; for a count it is zero."""
        if value is None:
            return False
        return {">": value > self.threshold, ">=": value >= self.threshold,
                "<": value < self.threshold, "<=": value <= self.threshold}[self.comparison]

    def public(self) -> dict[str, Any]:
        """The rule as the API shows it: a target's scheme and host only (a Slack URL's path is its credential, a
        webhook's may hold a token) and no character of a webhook secret."""
        body = self.model_dump(mode="json", by_alias=True)
        for target in body["targets"]:
            target["url"] = endpoint(target["url"])
            if "secret" in target:
                target["secret"] = "whsec_…"
        return body


class AlertTransition(BaseModel):
    """One transition of one rule and group, as published on tally.alerts.v1 (keyed by rule and group) and as
    the body of an outgoing webhook. `id` is stable: a re-publication after a crash carries the same one."""

    id: str
    type: Literal["alert.firing", "alert.resolved"]
    tenant: str
    rule: dict[str, str]
    group: dict[str, Any]
    value: str | None
    threshold: str
    comparison: str
    window_s: int
    at: datetime
    fired_at: datetime
    detail: dict[str, Any] = Field(default_factory=dict)
