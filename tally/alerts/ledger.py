"""What the alert lifecycle writes, inside the caller's transaction: where a rule and group stands, and each
transition with one delivery row per target. The evaluator and the usage take-up write through here alike.

A standing moves only from the one the writer last saw (`move`): an evaluator whose view is stale (a commit whose
answer was lost, a second evaluator, a leader that lost its lock) finds no row to move, its transaction is
refused (`Stale`) and it reads the standings again, so an incident fires once (billing review M5). The leader's
epoch (`lead`, `fence`) refuses a deposed leader's commits outright.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg
import orjson

from tally.alerts.lifecycle import Standing
from tally.egress import endpoint
from tally.schemas.alerts import Target
from tally.sealed import SecretBox, Unreadable


class Stale(RuntimeError):
    """The standing is not the one this writer saw: someone else decided since."""


class Fenced(RuntimeError):
    """Another evaluator has become leader since this one did."""


_INSERT_STANDING = """
insert into alert_states (tenant, rule_id, group_key, grp, status, pending_since, fired_at, targets)
values ($1, $2, $3, $4::jsonb, $5, $6, $7, $8::jsonb)
on conflict (tenant, rule_id, group_key) do nothing
returning 1
"""

_MOVE_STANDING = """
update alert_states set status = $4, pending_since = $5, fired_at = $6, targets = coalesce($7::jsonb, targets),
                        updated_at = now()
where tenant = $1 and rule_id = $2 and group_key = $3 and status = $8 and pending_since = $9
returning 1
"""

_DROP_STANDING = """
delete from alert_states
where tenant = $1 and rule_id = $2 and group_key = $3 and status = $4 and pending_since = $5
returning coalesce(targets::text, '')
"""

_TRANSITION = """
insert into alert_transitions (tenant, rule_id, rule_name, group_key, grp, kind, value, threshold, comparison,
                               window_s, at, fired_at, detail)
values ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, $13::jsonb)
returning id
"""

_DELIVERY = """
insert into alert_deliveries (tenant, transition_id, target, kind, url, secret, endpoint, target_digest, status,
                              last_error)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
"""

_COOLDOWN = """
insert into alert_cooldowns (tenant, rule_id, group_key, resolved_at) values ($1, $2, $3, $4)
on conflict (tenant, rule_id, group_key) do update set resolved_at = excluded.resolved_at
"""


def group_key(values: dict[str, Any]) -> str:
    """The canonical text of a group's values: how states, transitions and cooldowns name a group."""
    return orjson.dumps(values, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True)
class Group:
    """One rule and group of one tenant."""

    tenant: str
    rule_id: str
    key: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Destination:
    """Where one delivery goes, in clear. `problem`: why it cannot be used (the delivery is recorded refused)."""

    kind: str
    url: str | None
    secret: str | None = None
    problem: str | None = None


def destinations(targets: list[Target]) -> list[Destination]:
    return [Destination(t.type, t.url, getattr(t, "secret", None)) for t in targets]


def seal(dests: list[Destination], box: SecretBox) -> str:
    """Destinations as a standing keeps them, sealed."""
    return orjson.dumps([{"kind": d.kind, "url": d.url and box.seal(d.url), "secret": d.secret and box.seal(d.secret),
                          "problem": d.problem} for d in dests]).decode()


def unseal(text: str, box: SecretBox) -> list[Destination]:
    out = []
    for d in orjson.loads(text):
        try:
            out.append(Destination(d["kind"], d["url"] and box.open(d["url"]), d["secret"] and box.open(d["secret"]),
                                   d["problem"]))
        except Unreadable as exc:
            out.append(Destination(d["kind"], None, None, str(exc)))
    return out


@dataclass(frozen=True)
class Transition:
    kind: Literal["firing", "resolved"]
    rule_name: str
    value: Decimal | None
    threshold: Decimal
    comparison: str
    window_s: int
    at: datetime
    fired_at: datetime
    targets: list[Destination]
    detail: dict[str, Any]


async def lead(conn: asyncpg.Connection) -> int:
    """A new leader's epoch (the caller holds the leader lock): every earlier leader's commits are fenced off."""
    return await conn.fetchval("update alert_leader set epoch = epoch + 1 where id = 1 returning epoch")


async def fence(conn: asyncpg.Connection, epoch: int) -> None:
    """Inside a commit: refuse it unless `epoch` is still the leader's. The share lock makes a new leader's `lead`
    wait for this transaction, so a commit is either before the change of leader or refused."""
    current = await conn.fetchval("select epoch from alert_leader where id = 1 for share")
    if current != epoch:
        raise Fenced(f"leader epoch {current} is not this evaluator's ({epoch})")


async def move(conn: asyncpg.Connection, group: Group, previous: Standing | None, standing: Standing | None,
               targets: str | None = None) -> str | None:
    """Move the group from `previous` to `standing` (None: ok, its row goes), recording the sealed `targets` it
    fires to; returns the targets the previous standing kept ('' when it kept none). Stale if `previous` is not
    what is stored."""
    if previous is None and standing is None:
        return None
    if previous is None:
        moved = await conn.fetchval(_INSERT_STANDING, group.tenant, group.rule_id, group.key,
                                    orjson.dumps(group.values).decode(), standing.status, standing.pending_since,
                                    standing.fired_at, targets)
        kept = None
    elif standing is None:
        kept = moved = await conn.fetchval(_DROP_STANDING, group.tenant, group.rule_id, group.key, previous.status,
                                           previous.pending_since)
    else:
        moved = await conn.fetchval(_MOVE_STANDING, group.tenant, group.rule_id, group.key, standing.status,
                                    standing.pending_since, standing.fired_at, targets, previous.status,
                                    previous.pending_since)
        kept = None
    if moved is None:
        raise Stale(f"{group.tenant}/{group.rule_id} {group.key} is no longer {previous.status if previous else 'ok'}")
    return kept


async def record(conn: asyncpg.Connection, group: Group, t: Transition, box: SecretBox) -> int:
    """The transition and its deliveries (targets copied, sealed; one that cannot be used recorded refused with
    its reason); a resolution also starts the group's cooldown."""
    transition_id = await conn.fetchval(
        _TRANSITION, group.tenant, group.rule_id, t.rule_name, group.key, orjson.dumps(group.values).decode(),
        t.kind, t.value, t.threshold, t.comparison, t.window_s, t.at, t.fired_at, orjson.dumps(t.detail).decode())
    rows = []
    for n, d in enumerate(t.targets):
        if d.problem is not None or d.url is None:
            rows.append((group.tenant, transition_id, n, d.kind, None, None, "(unusable)", hashlib.sha256(b"").digest(),
                         "refused", d.problem or "no URL"))
        else:
            rows.append((group.tenant, transition_id, n, d.kind, box.seal(d.url), d.secret and box.seal(d.secret),
                         endpoint(d.url), digest(d.kind, d.url), "pending", None))
    await conn.executemany(_DELIVERY, rows)
    if t.kind == "resolved":
        await conn.execute(_COOLDOWN, group.tenant, group.rule_id, group.key, t.at)
    return transition_id


def digest(kind: str, url: str) -> bytes:
    """Names one target without opening it (the same as migration 0075 computes for older rows)."""
    return hashlib.sha256(f"{kind} {url}".encode()).digest()
