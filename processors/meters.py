"""Meters: load their definitions and turn one event into the counter deltas it contributes.

Evaluation happens while a batch is validated, so an event a meter cannot read (a SUM whose value
is missing or not a number) is a dead letter before anything is written, never a silent zero.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson
import yaml

from processors.windows import bounds
from schemas.counters import CounterDelta, CounterKey, Scalar
from schemas.envelope import Envelope
from schemas.meters import DEFAULT_METERS, Aggregation, Meter, MetersConfig

_MISSING = object()
_MAX_EXPONENT = 100  # far inside PostgreSQL numeric's range, far beyond any real usage value


class MeterError(ValueError):
    """An event matched a meter but the meter cannot take a value from it."""


def load_meters(path: Path | None = None, inline: str = "") -> MetersConfig:
    """Meters from inline JSON/YAML, else a YAML or JSON file, else the default set."""
    if inline.strip():
        return MetersConfig.model_validate(yaml.safe_load(inline))
    if path is not None:
        return MetersConfig.model_validate(yaml.safe_load(path.read_text()))
    return DEFAULT_METERS


def _resolve(event: dict[str, Any], path: str) -> Any:
    node: Any = event
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _number(raw: Any, meter: Meter) -> Decimal:
    if raw is _MISSING or raw is None:
        raise MeterError(f"meter {meter.slug}: no value at {meter.value_path}")
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise MeterError(f"meter {meter.slug}: value at {meter.value_path} is not a number")
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise MeterError(f"meter {meter.slug}: value at {meter.value_path} is not a number") from None
    if not value.is_finite() or abs(value.adjusted()) > _MAX_EXPONENT:
        raise MeterError(f"meter {meter.slug}: value at {meter.value_path} is not finite or out of range")
    return value


def _scalar(raw: Any) -> Scalar:
    if raw is _MISSING:
        return None
    if raw is None or isinstance(raw, (str, int, float, bool)):
        return raw
    return orjson.dumps(raw, option=orjson.OPT_SORT_KEYS).decode()


class MeterSet:
    """The configured meters, compiled once: type filters become a regex per meter."""

    def __init__(self, config: MetersConfig) -> None:
        self.meters = config.meters
        self._matchers: list[Callable[[str], Any]] = [
            re.compile(fnmatch.translate(m.event_type)).match for m in config.meters
        ]

    def deltas(self, envelope: Envelope) -> list[CounterDelta]:
        """Every counter delta one event contributes; raises MeterError if a matching meter cannot read it."""
        out: list[CounterDelta] = []
        doc: dict[str, Any] | None = None
        for meter, matches in zip(self.meters, self._matchers):
            if not matches(envelope.type):
                continue
            if doc is None:
                doc = {"type": envelope.type, "source": envelope.source, "subject": envelope.subject,
                       "id": envelope.id, "data": envelope.data}
            value = Decimal(1) if meter.aggregation is Aggregation.COUNT else _number(_resolve(doc, meter.value_path or ""), meter)
            group = tuple((name, _scalar(_resolve(doc, path))) for name, path in sorted(meter.group_by.items()))
            subject = envelope.subject if meter.per_subject else None
            for window in meter.windows:
                start, end = bounds(window, envelope.time)
                key = CounterKey(envelope.tenant, meter.slug, window.value, start, subject, group)
                out.append(CounterDelta(key, end, meter.aggregation, value, 1, envelope.time))
        return out
