"""Meters: load their definitions, check events against them, fold new events into counter deltas.

Every event is checked while its batch is validated, so an event a meter cannot read (a SUM whose
value is missing or not a number) is a dead letter before anything is written, never a silent zero.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson
import yaml

from processors.windows import bounds
from schemas.counters import CounterDelta, CounterKey, Scalar
from schemas.envelope import Envelope
from schemas.meters import DEFAULT_METERS, Aggregation, Meter, MetersConfig, Window
from sinks.base import Record

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


_ONE = Decimal(1)


class MeterSet:
    """The configured meters, compiled once: type filters become a regex per meter.

    `check` runs in step 1 on every event; `aggregate` runs inside the PostgreSQL transaction on the
    events that turned out to be new, folding them into one delta per counter window.
    """

    def __init__(self, config: MetersConfig) -> None:
        self.meters = config.meters
        self._compiled = [
            (m, re.compile(fnmatch.translate(m.event_type)).match, sorted(m.group_by.items())) for m in config.meters
        ]
        self._bounds: dict[tuple[Window, datetime], tuple[datetime, datetime]] = {}

    def check(self, envelope: Envelope) -> None:
        """Raise MeterError if a meter that matches this event cannot read its value."""
        doc = None
        for meter, matches, _ in self._compiled:
            if meter.aggregation is not Aggregation.COUNT and matches(envelope.type):
                doc = doc or _document(envelope)
                _number(_resolve(doc, meter.value_path or ""), meter)

    def aggregate(self, records: Iterable[Record]) -> list[tuple[str, CounterDelta]]:
        """One delta per counter window touched by these records, sorted by key text (the lock order)."""
        acc: dict[tuple, list] = {}
        for record in records:
            if not record.counted:
                continue
            e = record.envelope
            doc = None
            for meter, matches, group_by in self._compiled:
                if not matches(e.type):
                    continue
                doc = doc or _document(e)
                aggregation = meter.aggregation
                value = _ONE if aggregation is Aggregation.COUNT else _number(_resolve(doc, meter.value_path or ""), meter)
                group = tuple((name, _scalar(_resolve(doc, path))) for name, path in group_by)
                subject = e.subject if meter.per_subject else None
                for window in meter.windows:
                    start, end = self._window(window, e.time)
                    key = (e.tenant, meter.slug, window.value, start, subject, group)
                    current = acc.get(key)
                    if current is None:
                        acc[key] = [aggregation, value, 1, e.time, end]
                    else:
                        _fold(current, value, e.time)
        out = []
        for (tenant, slug, window_name, start, subject, group), (aggregation, value, count, latest, end) in acc.items():
            key = CounterKey(tenant, slug, window_name, start, subject, group)
            out.append((key.to_text(), CounterDelta(key, end, aggregation, value, count, latest)))
        out.sort(key=lambda item: item[0])
        return out

    def _window(self, window: Window, at: datetime) -> tuple[datetime, datetime]:
        """windows.bounds, memoised per minute: a batch's events share few windows."""
        minute = at.replace(second=0, microsecond=0)
        cached = self._bounds.get((window, minute))
        if cached is None:
            if len(self._bounds) > 100_000:
                self._bounds.clear()
            cached = self._bounds[(window, minute)] = bounds(window, minute)
        return cached


def _document(e: Envelope) -> dict[str, Any]:
    return {"type": e.type, "source": e.source, "subject": e.subject, "id": e.id, "data": e.data}


def _fold(current: list, value: Decimal, at: datetime) -> None:
    """Add one event's value to a window's running [aggregation, value, count, latest_time, end]."""
    aggregation = current[0]
    if aggregation is Aggregation.COUNT or aggregation is Aggregation.SUM:
        current[1] += value
    elif aggregation is Aggregation.MAX:
        current[1] = max(current[1], value)
    elif aggregation is Aggregation.MIN:
        current[1] = min(current[1], value)
    elif at >= current[3]:
        current[1] = value
    current[2] += 1
    current[3] = max(current[3], at)
