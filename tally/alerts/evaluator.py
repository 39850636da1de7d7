"""Every rule of every tenant against its sliding window, and the decisions committed in one transaction each.

The standing of each rule and group (pending, firing) is kept in memory and in `alert_states`; memory changes
only after the transaction that records the decision and its transition commits. So a kill -9 anywhere either
loses an uncommitted decision, which the next evaluation takes again, or leaves it committed, which the next
start reads back: a breach fires once and resolves once (docs/adr/0050). Each standing moves only from the one
stored (ledger.move): a commit whose answer was lost, or a second evaluator, is refused and the standings are
read again, never a second firing.

A resolution goes to the targets the firing went to (kept with the standing), whatever the rule says now; a
group the rule no longer makes (its group_by changed) resolves and goes (billing review M6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg
import orjson

from tally.alerts import ledger, metrics
from tally.alerts import rules as rulebook
from tally.alerts import stored
from tally.alerts.lifecycle import Standing, Step, step
from tally.alerts.windows import MinuteWindows
from tally.meters.fresh import LiveCatalog
from tally.schemas.alerts import AlertRule
from tally.sealed import SecretBox

log = logging.getLogger("tally.alerts")

GroupId = tuple[str, str, str]  # tenant, rule id, group key


@dataclass(frozen=True)
class Decision:
    rule: AlertRule
    group: ledger.Group
    value: Decimal | None
    previous: Standing | None
    step: Step


class Evaluator:
    """`epoch`: the leader epoch this evaluator commits under (ledger.lead), None outside a leader (tests).
    Each tenant's rules read its readable meters (`Catalog.readable`), taken up again when the catalog moves."""

    def __init__(self, pool: asyncpg.Pool, catalog: LiveCatalog, windows: MinuteWindows, box: SecretBox,
                 epoch: int | None = None, min_every_s: int = 1) -> None:
        self._pool = pool
        self._catalog = catalog
        self._revision: int | None = None  # the catalog revision the rules were taken up at
        self._counters: dict[tuple[str, str], str] = {}  # (tenant, meter) -> the counter its windows are read under
        self._box = box
        self._epoch = epoch
        self._min_every_s = min_every_s
        self.windows = windows
        self._rules: dict[str, list[AlertRule]] = {}
        self._standings: dict[GroupId, Standing] = {}
        self._resolved: dict[GroupId, datetime] = {}
        self._due: dict[tuple[str, str], datetime] = {}
        self._unsure = False  # a commit ended without an answer: read the standings again before deciding

    async def load(self, now: datetime) -> None:
        """Rules, standings and cooldowns from PostgreSQL, and the windows the rules need."""
        await self.reload_rules(now)
        await self._read_standings()

    async def _read_standings(self) -> None:
        # Rule ids with a colon are the usage take-up's (tally/alerts/usage.py), not rules of this evaluator.
        self._standings = {(r["tenant"], r["rule_id"], r["group_key"]): Standing(r["status"], r["pending_since"],
                                                                                 r["fired_at"])
                           for r in await self._pool.fetch("select * from alert_states where strpos(rule_id, ':') = 0")}
        self._resolved = {(r["tenant"], r["rule_id"], r["group_key"]): r["resolved_at"]
                          for r in await self._pool.fetch("select * from alert_cooldowns")}
        self._unsure = False

    async def reload_rules(self, now: datetime) -> None:
        """Take up added, changed and deleted rules; a rule that cannot be evaluated is logged and skipped.
        Standings of rules that are gone or disabled are dropped without a transition."""
        catalog = await self._catalog.current(self._pool)
        loaded = await stored.load(self._pool, self._box)
        usable: dict[str, list[AlertRule]] = {}
        counters: dict[tuple[str, str], str] = {}
        for tenant, rules in loaded.items():
            meters = catalog.readable(tenant)
            for rule in rules:
                if not rule.enabled:
                    continue
                trouble = rulebook.problems(rule, meters)
                if trouble:
                    log.warning("rule %s/%s is not evaluated: %s", tenant, rule.id, "; ".join(trouble))
                    continue
                usable.setdefault(tenant, []).append(rule)
                counters[(tenant, rule.meter)] = catalog.counters(tenant, [rule.meter])[rule.meter]
        self._rules, self._counters, self._revision = usable, counters, catalog.revision
        metrics.RULES.set(sum(len(rules) for rules in usable.values()))
        live = {(tenant, rule.id) for tenant, rules in usable.items() for rule in rules}
        gone = [g for g in self._standings if g[:2] not in live]
        if gone:
            async with self._pool.acquire() as conn:
                await conn.executemany("delete from alert_states where tenant = $1 and rule_id = $2 and group_key = $3",
                                       gone)
            for g in gone:
                del self._standings[g]
        horizon = max((timedelta(seconds=r.window) for rules in usable.values() for r in rules), default=timedelta(0))
        if self.windows.watch(set(counters.values()), horizon):
            await self.windows.recover(self._pool, now)

    def decide(self, now: datetime) -> list[Decision]:
        """Evaluate the rules that are due; returns what changes (standings or transitions)."""
        out = []
        for tenant, rules in self._rules.items():
            for rule in rules:
                due = self._due.get((tenant, rule.id))
                if due is not None and now < due:
                    continue
                self._due[(tenant, rule.id)] = now + timedelta(seconds=max(rule.every, self._min_every_s))
                measured = self.windows.measure(tenant, self._counters[(tenant, rule.meter)], rule, now)
                orphans = set()
                for g in self._standings:
                    if g[:2] == (tenant, rule.id) and g[2] not in measured:
                        values = orjson.loads(g[2])
                        if set(values) != set(rule.group_by):  # a group of an earlier group_by: it ends here
                            orphans.add(g[2])
                        measured[g[2]] = (values, Decimal(0) if rule.measure.of == "count" else None)
                for key, (group, value) in measured.items():
                    current = self._standings.get((tenant, rule.id, key))
                    result = step(current, rule.breached(value) and key not in orphans, now, for_s=rule.for_,
                                  cooldown_s=rule.cooldown, resolved_at=self._resolved.get((tenant, rule.id, key)))
                    if result.standing != current or result.transition:
                        out.append(Decision(rule, ledger.Group(tenant, rule.id, key, group), value, current, result))
        return out

    async def commit(self, decisions: list[Decision], now: datetime) -> int:
        """Record the decisions and their transitions and deliveries in one transaction, then take them up."""
        if not decisions:
            return 0
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if self._epoch is not None:
                    await ledger.fence(conn, self._epoch)
                for d in decisions:
                    await _record(conn, d, now, self._box)
        except ledger.Stale as exc:
            metrics.STALE.inc()
            log.warning("decisions refused, reading the standings again: %s", exc)
            await self._read_standings()
            return 0
        except BaseException:
            self._unsure = True  # committed or not: the database knows, this process does not
            raise
        for d in decisions:
            g = (d.group.tenant, d.rule.id, d.group.key)
            if d.step.standing is None:
                self._standings.pop(g, None)
            else:
                self._standings[g] = d.step.standing
            if d.step.transition == "resolved":
                self._resolved[g] = now
            if d.step.transition:
                metrics.TRANSITIONS.labels(d.step.transition).inc()
        return sum(d.step.transition is not None for d in decisions)

    async def evaluate(self, now: datetime) -> int:
        """Decide and commit; returns how many transitions were recorded."""
        if (await self._catalog.current(self._pool)).revision != self._revision:
            await self.reload_rules(now)  # a meter came, changed or finished its backfill: take it up now
        if self._unsure:
            await self._read_standings()
        self.windows.prune(now)
        return await self.commit(self.decide(now), now)


async def _record(conn: asyncpg.Connection, d: Decision, now: datetime, box: SecretBox) -> None:
    rule, group = d.rule, d.group
    targets = ledger.destinations(rule.targets)
    kept = await ledger.move(conn, group, d.previous, d.step.standing,
                             ledger.seal(targets, box) if d.step.transition == "firing" else None)
    if d.step.transition is not None:
        fired_at = d.previous.fired_at if d.step.transition == "resolved" and d.previous else now
        if d.step.transition == "resolved" and kept:  # where it fired (a standing from before 0075 kept none)
            targets = ledger.unseal(kept, box)
        await ledger.record(conn, group, ledger.Transition(
            d.step.transition, rule.name, d.value, rule.threshold, rule.comparison, rule.window, now,
            fired_at or now, targets, {}), box)
