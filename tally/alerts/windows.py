"""The minute counter windows the rules read, newest revision per window, and a rule's measure over them.

States arrive from `tally.counters.v1` and, after a restart, from PostgreSQL's `counters` (the topic's
source): either way the highest revision of a window wins, so reading a state twice or late is harmless.
A rule's sliding window of N minutes is the N whole minute windows before the current one and the current one
so far: it never empties at a minute's turn (ADR 0050).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from tally.alerts.ledger import group_key
from tally.alerts.rules import group_of, matches
from tally.meters.definitions import Window
from tally.meters.windows import bounds
from tally.schemas.alerts import AlertRule
from tally.schemas.counters import Aggregation, CounterState
from tally.sinks.outbox import STATE_COLUMNS, state_of

MINUTE = timedelta(minutes=1)

_RECOVER = f"""
select {STATE_COLUMNS} from counters
where window_name = 'minute' and meter = any($1::text[]) and window_start >= $2
"""


def minute_start(at: datetime) -> datetime:
    return bounds(Window.MINUTE, at)[0]


class MinuteWindows:
    def __init__(self) -> None:
        self._meters: frozenset[str] = frozenset()
        self._horizon = MINUTE
        self._states: dict[tuple[str, str], dict[str, CounterState]] = {}

    def watch(self, meters: Iterable[str], horizon: timedelta) -> bool:
        """Keep these counters' windows (by `Meter.counter`) for this long; True when that asks for more than was
        kept (recover it)."""
        meters, horizon = frozenset(meters), max(horizon, MINUTE)
        more = bool(meters - self._meters) or horizon > self._horizon
        self._meters, self._horizon = meters, horizon
        return more

    def offer_raw(self, raw: bytes) -> bool:
        """A message value from the counter topic; parsed only when it is a minute window of a watched meter."""
        fields = orjson.loads(raw)
        if fields.get("window") != Window.MINUTE.value or fields.get("meter") not in self._meters:
            return False
        return self.offer(CounterState.model_validate(fields))

    def offer(self, state: CounterState) -> bool:
        if state.window != Window.MINUTE.value or state.meter not in self._meters:
            return False
        windows = self._states.setdefault((state.tenant, state.meter), {})
        current = windows.get(state.key)
        if current is not None and current.revision >= state.revision:
            return False
        windows[state.key] = state
        return True

    async def recover(self, conn: asyncpg.Pool | asyncpg.Connection, now: datetime) -> int:
        """Read the watched windows within the horizon from PostgreSQL; returns how many were newer."""
        rows = await conn.fetch(_RECOVER, sorted(self._meters), minute_start(now) - self._horizon)
        return sum(self.offer_raw(state_of(r).value) for r in rows)

    def prune(self, now: datetime) -> None:
        oldest = minute_start(now) - self._horizon
        for key in list(self._states):
            windows = self._states[key]
            for name in [k for k, s in windows.items() if s.window_start < oldest]:
                del windows[name]
            if key[1] not in self._meters or not windows:
                del self._states[key]

    def measure(self, tenant: str, counter: str, rule: AlertRule,
                now: datetime) -> dict[str, tuple[dict[str, Any], Decimal | None]]:
        """The rule's value per group over its window ending now, read from its meter's `counter`: {group_key:
        (group, value)}; a value is None when the window held no data for a value measure. A rule without group_by
        always has the group {}."""
        oldest = minute_start(now) - timedelta(seconds=rule.window)
        folds: dict[str, tuple[dict[str, Any], list[CounterState]]] = {}
        if not rule.group_by:
            folds["{}"] = ({}, [])
        for state in self._states.get((tenant, counter), {}).values():
            if oldest <= state.window_start <= now and matches(rule, state):
                group = group_of(rule, state)
                folds.setdefault(group_key(group), (group, []))[1].append(state)
        return {key: (group, fold(rule, states)) for key, (group, states) in folds.items()}

    def __len__(self) -> int:
        return sum(len(w) for w in self._states.values())


def fold(rule: AlertRule, states: list[CounterState]) -> Decimal | None:
    count = sum(s.count for s in states)
    if rule.measure.of == "count" or (states and states[0].aggregation is Aggregation.COUNT):
        return Decimal(count)
    if not states:
        return None
    aggregation = states[0].aggregation
    if aggregation is Aggregation.MAX:
        return max(Decimal(s.value) for s in states)
    if aggregation is Aggregation.MIN:
        return min(Decimal(s.value) for s in states)
    if aggregation is Aggregation.AVG:
        return sum(Decimal(s.sum or 0) for s in states) / count if count else None
    return sum((Decimal(s.value) for s in states), Decimal(0))
