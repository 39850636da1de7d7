"""A tenant's alert rules kept in a YAML file (`tally alert-rules apply`), e.g. beside the service's code.

The file owns the rules it names (origin 'file'): applying it saves them and deletes the file rules it no longer
names, in one transaction, and leaves the rules made through the API alone. A file with any problem is refused
whole, before anything is written, so a half-applied file never pages anyone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import yaml
from pydantic import ValidationError

from tally.alerts import rules, stored
from tally.alerts.policy import AlertPolicy
from tally.edge.problems import validation_errors
from tally.meters.definitions import MetersConfig
from tally.schemas.alerts import AlertRule

ORIGIN = "file"


class Refused(Exception):
    """Every problem found, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problem(s)")
        self.problems = problems


@dataclass
class Applied:
    saved: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def parse(text: str, meters: MetersConfig) -> list[AlertRule]:
    """The file's rules, each valid and evaluable with these meters; else Refused naming every problem."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise Refused([f"not YAML: {' '.join(str(exc).split())}"]) from None
    if not isinstance(doc, dict) or set(doc) != {"rules"} or not isinstance(doc["rules"], list):
        raise Refused(["the file holds `rules:` and a list of rules, and nothing else"])
    out: list[AlertRule] = []
    problems: list[str] = []
    for n, item in enumerate(doc["rules"]):
        named = isinstance(item, dict) and isinstance(item.get("id"), str)
        where = f"rules[{n}]" + (f" ({item['id']})" if named else "")
        try:
            rule = AlertRule.model_validate(item)
        except ValidationError as exc:
            problems += [f"{where}: {e['field']}: {e['message']}" for e in validation_errors(exc)]
            continue
        if any(r.id == rule.id for r in out):
            problems.append(f"{where}: the id {rule.id!r} is given twice")
        problems += [f"{where}: {p}" for p in rules.problems(rule, meters)]
        out.append(rule)
    if problems:
        raise Refused(problems)
    return out


async def apply(conn: asyncpg.Connection, tenant: str, wanted: list[AlertRule], policy: AlertPolicy) -> Applied:
    """Make the tenant's file rules exactly `wanted`; a rule unchanged keeps its version. Refused whole when a
    rule names a target it may not call or passes a bound, or the tenant would keep too many rules."""
    done = Applied()
    refused = [f"{rule.id}: {field}: {message}" for rule in wanted for field, message in await policy.problems(rule)]
    if refused:
        raise Refused(refused)
    async with conn.transaction():
        owned = await conn.fetch("select id from alert_rules where tenant = $1 and origin = $2", tenant, ORIGIN)
        gone = {row["id"] for row in owned} - {rule.id for rule in wanted}
        current = {rule_id: await stored.claim(conn, tenant, rule_id)
                   for rule_id in sorted(gone | {rule.id for rule in wanted})}
        clashes = [f"{rule.id}: a rule made through the API has this id; delete it there or rename this one"
                   for rule in wanted if current[rule.id] is not None and current[rule.id]["origin"] != ORIGIN]
        if clashes:
            raise Refused(clashes)
        others = await conn.fetchval("select count(*) from alert_rules where tenant = $1 and origin <> $2",
                                     tenant, ORIGIN)
        over = policy.quota(others + len(wanted) - 1)
        if over:
            raise Refused([over])
        for rule in wanted:
            row = current[rule.id]
            if row is not None and stored.rule_of(row["definition"], policy.box) == rule:
                done.unchanged.append(rule.id)
            else:
                await stored.save(conn, tenant, rule, policy.box, ORIGIN)
                done.saved.append(rule.id)
        done.deleted = sorted(rule_id for rule_id in gone if current[rule_id] is not None)
        await stored.delete(conn, tenant, done.deleted)
    return done
