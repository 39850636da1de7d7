"""What a rule means against counter windows: whether the configured meters can answer it, which windows
count toward it and in which group. The API and the rules file both check with `problems`, so both refuse
the same rules with the same words.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from tally.meters import rules as meter_rules
from tally.meters.definitions import MetersConfig
from tally.schemas.alerts import AlertRule
from tally.schemas.counters import Aggregation, CounterState

# Aggregations whose minute windows add up to the window's value (UNIQUE_COUNT and WEIGHTED_SUM do not).
_VALUE_MEASURES = {Aggregation.COUNT, Aggregation.SUM, Aggregation.MAX, Aggregation.MIN, Aggregation.AVG}


def problems(rule: AlertRule, meters: MetersConfig) -> list[str]:
    """What stops this rule being evaluated: a missing meter, a meter without minute windows, a field it lacks."""
    meter = next((m for m in meters.meters if m.slug == rule.meter), None)
    if meter is None:
        return [f"no meter {rule.meter!r}: a rule reads a meter's minute windows (configured: "
                f"{', '.join(m.slug for m in meters.meters)})"]
    out = [e["message"] for e in meter_rules.alertable(meter)]
    if rule.measure.of == "value" and meter.aggregation not in _VALUE_MEASURES:
        out.append(f"meter {meter.slug!r} is {meter.aggregation.value}: its minute values do not add up to a window; "
                   "measure its count")
    wanted = {"type": rule.filter.event_type, "level": rule.filter.level, **rule.filter.attributes}
    fields = {name for name, value in wanted.items() if value is not None}
    fields |= {name for name in rule.group_by if name in ("type", "level")}
    out += [f"meter {meter.slug!r} does not group by {name!r}" for name in sorted(fields - set(meter.group_by))]
    by_subject = rule.filter.service or rule.filter.subject or {"service", "subject"} & set(rule.group_by)
    if by_subject and not meter.per_subject:
        out.append(f"meter {meter.slug!r} is not kept per subject (service)")
    return out


def matches(rule: AlertRule, state: CounterState) -> bool:
    """Does this counter window count toward the rule? (Its meter and tenant are matched by the caller.)"""
    f = rule.filter
    if f.service is not None and state.subject != f.service:
        return False
    if f.subject is not None and state.subject != f.subject:
        return False
    if f.event_type is not None and not fnmatchcase(str(state.group.get("type")), f.event_type):
        return False
    if f.level is not None and state.group.get("level") not in f.level.and_above():
        return False
    return all(state.group.get(name) == value for name, value in f.attributes.items())


def group_of(rule: AlertRule, state: CounterState) -> dict[str, Any]:
    return {name: state.subject if name in ("service", "subject") else state.group.get(name) for name in rule.group_by}
