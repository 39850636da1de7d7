"""The configured meters, compiled: check events against them, fold new events into counter deltas.

Every event is checked while its batch is validated, so an event a meter cannot read (a SUM whose
value is missing or not a number) is a dead letter before anything is written, never a silent zero.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal, Inexact, InvalidOperation
from functools import partial
from typing import Any

import orjson

from tally.meters.definitions import STATEFUL, Meter, MetersConfig, Window
from tally.meters.windows import bounds
from tally.schemas.counters import Aggregation, CounterDelta, CounterKey, Scalar
from tally.schemas.envelope import MAX_GROUP_VALUE_BYTES, over_bytes
from tally.sinks.base import Record, StoredEvent

_MISSING = object()
_MAX_EXPONENT = 100  # far inside PostgreSQL numeric's range, far beyond any real usage value
# Values have digits from 10^100 down to 10^-100 (201 places); a sum of up to 2^63 of them needs 20 more.
# The fold traps Inexact, so a SUM is exact whatever the batching, as PostgreSQL's numeric addition is.
_EXACT = Context(prec=2 * _MAX_EXPONENT + 30, Emax=999_999, Emin=-999_999, traps=[Inexact, InvalidOperation])


class MeterError(ValueError):
    """An event matched a meter but the meter cannot take a value from it."""


_ROOTS = frozenset({"type", "source", "subject", "id", "data"})


def _resolve(event: StoredEvent, parts: tuple[str, ...]) -> Any:
    """The value at a dotted path rooted at the envelope (type, source, subject, id, data)."""
    if parts[0] not in _ROOTS:
        return _MISSING
    node: Any = getattr(event, parts[0])
    for part in parts[1:]:
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
    if not value.is_finite() or abs(value.adjusted()) > _MAX_EXPONENT or value.as_tuple().exponent < -_MAX_EXPONENT:
        raise MeterError(f"meter {meter.slug}: value at {meter.value_path} is not finite, out of range or has digits"
                         f" below 1e-{_MAX_EXPONENT}")
    return value


def _check_group_value(raw: Any, name: str, meter: Meter) -> None:
    """Refuse a group value too long for the counter's key (text of at most a quarter of the limit in
    characters always fits: UTF-8 takes at most 4 bytes a character)."""
    if type(raw) is str:
        if len(raw) * 4 <= MAX_GROUP_VALUE_BYTES:
            return
        value = raw
    elif raw is _MISSING or raw is None or isinstance(raw, (int, float, bool)):
        return
    else:
        value = _scalar(raw)
    if over_bytes(value, MAX_GROUP_VALUE_BYTES):
        raise MeterError(f"meter {meter.slug}: group {name} is longer than {MAX_GROUP_VALUE_BYTES} bytes")


def _present(raw: Any, meter: Meter) -> Any:
    """A UNIQUE_COUNT value: any JSON value but null."""
    if raw is _MISSING or raw is None:
        raise MeterError(f"meter {meter.slug}: no value at {meter.value_path}")
    return raw


def _scalar(raw: Any) -> Scalar:
    if raw is _MISSING:
        return None
    if raw is None or isinstance(raw, (str, int, float, bool)):
        return raw
    return orjson.dumps(raw, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True)
class _TypeOnly:
    """All an event's type tells of it: what `_compile_checks` resolves paths against."""

    type: str


def _read_value(read: Callable[[Any, Meter], Any], meter: Meter, raw: Any) -> None:
    read(raw, meter)


def _read_group(name: str, meter: Meter, raw: Any) -> None:
    _check_group_value(raw, name, meter)


def _checked(step: Callable[[Any], None], parts: tuple[str, ...], event: StoredEvent) -> None:
    step(_resolve(event, parts))


def _refuse(reason: str, event: StoredEvent) -> None:
    raise MeterError(reason)


_MINUTE = timedelta(minutes=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class _Compiled:
    """A meter with its type filter and paths prepared once."""

    meter: Meter
    matches: Callable[[str], Any]
    value_path: tuple[str, ...]
    group_by: tuple[tuple[str, tuple[str, ...]], ...]
    counts: bool  # COUNT: no value to read, only events to count
    read: Callable[[Any, Meter], Any]  # the value an event gives, or MeterError
    stateful: bool  # folded by tally/meters/stateful.py against what is stored, not here


@dataclass(frozen=True)
class StatefulInput:
    """One counted event's part in a UNIQUE_COUNT or WEIGHTED_SUM meter: its series and its value."""

    meter: Meter
    tenant: str
    subject: str | None
    group: tuple[tuple[str, Scalar], ...]
    event: StoredEvent
    value: Any  # UNIQUE_COUNT: the raw value; WEIGHTED_SUM: the new level


class MeterSet:
    """The configured meters, compiled once: type filters become a regex per meter, paths are split, and
    the checks an event type needs are made at its first event (docs/adr/0110).

    `check` runs in step 1 on every event; `aggregate` runs inside the PostgreSQL transaction on the
    events that turned out to be new, folding them into one delta per counter window.
    """

    def __init__(self, config: MetersConfig) -> None:
        self.meters = config.meters
        self._compiled = [
            _Compiled(m, re.compile(fnmatch.translate(m.event_type)).match, tuple((m.value_path or "").split(".")),
                      tuple((name, tuple(path.split("."))) for name, path in sorted(m.group_by.items())),
                      m.aggregation is Aggregation.COUNT,
                      _present if m.aggregation is Aggregation.UNIQUE_COUNT else _number,
                      m.aggregation in STATEFUL)
            for m in config.meters
        ]
        self.has_stateful = any(c.stateful for c in self._compiled)
        self._by_type: dict[str, list[tuple[int, _Compiled]]] = {}
        self._checks_by_type: dict[str, tuple[Callable[[StoredEvent], None], ...]] = {}
        self._bounds: dict[tuple[Window, int], tuple[datetime, datetime]] = {}
        self._minutes: dict[datetime, int] = {}

    def check(self, envelope: StoredEvent) -> None:
        """Raise MeterError if a meter that matches this event cannot read its value or group it."""
        checks = self._checks_by_type.get(envelope.type)
        if checks is None:
            checks = self._compile_checks(envelope.type)
        for check in checks:
            check(envelope)

    def readable(self, records: Iterable[Record]) -> tuple[list[Record], list[tuple[Record, MeterError]]]:
        """The stored records these meters can read, and those they cannot with why. Live, such an event is a dead
        letter; a backfill or recount reads events stored before the meter existed and leaves it out the same way,
        so one tenant's data never fails a job shared by every tenant."""
        readable, refused = [], []
        for r in records:
            try:
                self.check(r.envelope)
            except MeterError as exc:
                refused.append((r, exc))
                continue
            readable.append(r)
        return readable, refused

    def _compile_checks(self, event_type: str) -> tuple[Callable[[StoredEvent], None], ...]:
        """The checks an event of this type needs, in the order `check` makes them (so the first failing
        one still names the reason). A path rooted at `type`, or at no envelope attribute, gives the same
        value for every event of the type: it is checked here, once, and left out if it passes."""
        checks: list[Callable[[StoredEvent], None]] = []
        known = _TypeOnly(event_type)
        for _, c in self._matching(event_type):
            steps = [] if c.counts else [(c.value_path, partial(_read_value, c.read, c.meter))]
            steps += [(parts, partial(_read_group, name, c.meter)) for name, parts in c.group_by]
            for parts, step in steps:
                if parts[0] in _ROOTS and parts[0] != "type":
                    checks.append(partial(_checked, step, parts))
                    continue
                try:
                    step(_resolve(known, parts))
                except MeterError as exc:
                    checks.append(partial(_refuse, str(exc)))
        if len(self._checks_by_type) > 10_000:
            self._checks_by_type.clear()
        found = self._checks_by_type[event_type] = tuple(checks)
        return found

    def aggregate(self, records: Iterable[Record]) -> list[tuple[str, CounterDelta]]:
        """One delta per counter window touched by these records, sorted by key text (the lock order).

        Events are folded per meter, minute, tenant, subject and group first (every window starts on a
        UTC minute), and only those few groups are then merged into their windows.
        """
        minutes: dict[tuple, list] = {}
        for e, _, _, counted in records:
            if not counted:
                continue
            at = e.time
            minute = self._minute(at)
            for index, c in self._matching(e.type):
                if c.stateful:
                    continue
                meter = c.meter
                # The type is part of the group: true, 1 and 1.0 are equal in Python but not the same group.
                group = tuple([(name, type(v), v) for name, parts in c.group_by for v in (_scalar(_resolve(e, parts)),)])
                key = (index, minute, e.tenant, e.subject if meter.per_subject else None, group)
                current = minutes.get(key)
                if c.counts:
                    if current is None:
                        minutes[key] = [Aggregation.COUNT, None, 1, at]
                    else:
                        current[2] += 1
                        if at > current[3]:
                            current[3] = at
                    continue
                value = _number(_resolve(e, c.value_path), meter)
                if current is None:
                    minutes[key] = [meter.aggregation, value, 1, at]
                else:
                    _fold(current, value, 1, at)
        windows: dict[tuple, list] = {}
        for (index, minute, tenant, subject, group), (aggregation, value, count, latest) in minutes.items():
            meter = self._compiled[index].meter
            for window in meter.windows:
                start, end = self._window(window, minute)
                key = (tenant, meter.counter, window.value, start, subject, group)
                current = windows.get(key)
                if current is None:
                    windows[key] = [aggregation, value, count, latest, end]
                else:
                    _fold(current, value, count, latest)
        out = []
        for (tenant, counter, window_name, start, subject, group), (aggregation, value, count, latest, end) in windows.items():
            key = CounterKey(tenant, counter, window_name, start, subject, tuple((name, v) for name, _, v in group))
            total = Decimal(count) if aggregation is Aggregation.COUNT else value
            # AVG: the sum goes in `total`; the upsert divides the stored sum by the stored count.
            out.append((key.to_text(), CounterDelta(key, end, aggregation, total, count, latest,
                                                    value if aggregation is Aggregation.AVG else None)))
        out.sort(key=lambda item: item[0])
        return out

    def stateful_inputs(self, records: Iterable[Record]) -> list[StatefulInput]:
        """The counted events' values for the UNIQUE_COUNT and WEIGHTED_SUM meters they match."""
        out = []
        for e, _, _, counted in records:
            if not counted:
                continue
            for _, c in self._matching(e.type):
                if c.stateful:
                    group = tuple([(name, _scalar(_resolve(e, parts))) for name, parts in c.group_by])
                    out.append(StatefulInput(c.meter, e.tenant, e.subject if c.meter.per_subject else None, group, e,
                                             c.read(_resolve(e, c.value_path), c.meter)))
        return out

    def window(self, window: Window, at: datetime) -> tuple[datetime, datetime]:
        """The [start, end) of the window containing `at` (every window starts on a UTC minute)."""
        return self._window(window, self._minute(at))

    def _matching(self, event_type: str) -> list[tuple[int, _Compiled]]:
        """The meters whose type filter matches, memoised per type."""
        found = self._by_type.get(event_type)
        if found is None:
            if len(self._by_type) > 10_000:
                self._by_type.clear()
            found = self._by_type[event_type] = [(i, c) for i, c in enumerate(self._compiled) if c.matches(event_type)]
        return found

    def _minute(self, at: datetime) -> int:
        """Whole minutes from the epoch to `at`, memoised (decoded events share datetime objects)."""
        minute = self._minutes.get(at)
        if minute is None:
            if len(self._minutes) > 100_000:
                self._minutes.clear()
            minute = self._minutes[at] = (at - _EPOCH) // _MINUTE
        return minute

    def _window(self, window: Window, minute: int) -> tuple[datetime, datetime]:
        """windows.bounds of the minute `minute` minutes after the epoch, memoised."""
        cached = self._bounds.get((window, minute))
        if cached is None:
            if len(self._bounds) > 100_000:
                self._bounds.clear()
            cached = self._bounds[(window, minute)] = bounds(window, _EPOCH + minute * _MINUTE)
        return cached


def _fold(current: list, value: Decimal | None, count: int, at: datetime) -> None:
    """Merge `count` events (their folded value, latest time `at`) into a running
    [aggregation, value, count, latest_time, ...]; COUNT keeps no value, only the count."""
    aggregation = current[0]
    if aggregation is Aggregation.SUM or aggregation is Aggregation.AVG:
        current[1] = _EXACT.add(current[1], value)
    elif aggregation is Aggregation.MAX:
        current[1] = max(current[1], value)
    elif aggregation is Aggregation.MIN:
        current[1] = min(current[1], value)
    elif aggregation is Aggregation.LATEST and at >= current[3]:
        current[1] = value
    current[2] += count
    current[3] = max(current[3], at)
