"""Meter validation in one place: what makes a meter well formed (checked whenever a Meter is made, from a file,
a stored version or the API), what a plan needs of a meter to bill it, and what an alert rule needs of it.

Each refusal names the meter's field it is about, so the API answers a 422 a client can act on and a file loader
a message that says which line to change. Nothing here imports the Meter model (it calls these rules), so the
rules read a meter by its attributes.
"""

from __future__ import annotations

from typing import Protocol

from tally.schemas.counters import Aggregation

# The aggregations whose hour windows add up to a billing period (docs/adr/0041).
BILLABLE = (Aggregation.COUNT, Aggregation.SUM)


class Shape(Protocol):
    """What the rules read of a meter (tally.meters.definitions.Meter)."""

    slug: str
    aggregation: Aggregation
    value_path: str | None
    group_by: dict[str, str]
    per_subject: bool
    windows: tuple[str, ...]
    unit: object | None


class Refused(ValueError):
    """A well-formed request that cannot be applied: `errors` name each field and why (a 422)."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors


def _error(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def definition(meter: Shape) -> list[dict[str, str]]:
    """What makes a meter's fields contradict each other (each field's own bounds are in its schema)."""
    out = []
    if meter.aggregation is Aggregation.COUNT and meter.value_path:
        out.append(_error("value_path", f"meter {meter.slug}: COUNT takes no value_path"))
    if meter.aggregation is not Aggregation.COUNT and not meter.value_path:
        out.append(_error("value_path", f"meter {meter.slug}: {meter.aggregation.value} needs a value_path"))
    if (meter.aggregation is Aggregation.WEIGHTED_SUM) != (meter.unit is not None):
        out.append(_error("unit", f"meter {meter.slug}: a unit (hour or day) goes with WEIGHTED_SUM and only with it"))
    if not meter.windows:
        out.append(_error("windows", f"meter {meter.slug}: at least one window"))
    if len(set(meter.windows)) != len(meter.windows):
        out.append(_error("windows", f"meter {meter.slug}: a window is listed twice (it would be counted twice)"))
    return out


def billable(meter: Shape) -> list[dict[str, str]]:
    """Why a plan cannot bill this meter: a period is summed from a subject's ungrouped hour windows of an additive
    aggregation (docs/adr/0041); empty when it can."""
    out = []
    if "hour" not in meter.windows:
        out.append(_error("windows", f"meter {meter.slug} has no hour window; periods are summed from hour windows"))
    if meter.group_by:
        out.append(_error("group_by", f"meter {meter.slug} has a group_by; a grouped meter cannot be billed per "
                                      "subject"))
    if not meter.per_subject:
        out.append(_error("per_subject", f"meter {meter.slug} is not per subject"))
    if meter.aggregation not in BILLABLE:
        out.append(_error("aggregation", f"meter {meter.slug} aggregates with {meter.aggregation.value}, whose hour "
                                         "windows do not add up to a period; only COUNT and SUM can be billed"))
    return out


def alertable(meter: Shape) -> list[dict[str, str]]:
    """Why no alert rule can read this meter: rules read minute windows; empty when one can."""
    if "minute" not in meter.windows:
        return [_error("windows", f"meter {meter.slug!r} keeps no minute windows; add `minute` to its windows")]
    return []
