"""What a tenant's alert rules may ask for, beyond their schema: targets that are safe to call (egress/), how many
rules and targets, how often a rule runs (security review M4). The API and the rules file check with `problems`,
so both refuse the same rules with the same words."""

from __future__ import annotations

from dataclasses import dataclass

from tally.egress import EgressPolicy, Refused, check_target
from tally.schemas.alerts import AlertRule
from tally.sealed import SecretBox


@dataclass(frozen=True)
class AlertPolicy:
    egress: EgressPolicy
    box: SecretBox
    max_rules: int = 100
    max_targets: int = 5
    min_every_s: int = 5

    async def problems(self, rule: AlertRule) -> list[tuple[str, str]]:
        """(field, message) for each bound the rule passes or target it may not call."""
        out = []
        if rule.every < self.min_every_s:
            out.append(("every", f"at least {self.min_every_s}s"))
        if len(rule.targets) > self.max_targets:
            out.append(("targets", f"at most {self.max_targets} targets per rule"))
        for n, target in enumerate(rule.targets):
            try:
                await check_target(target.url, target.type, self.egress)
            except Refused as exc:
                out.append((f"targets[{n}].url", str(exc)))
        return out

    def quota(self, rules_kept: int) -> str | None:
        """Why one more rule is refused, if it is."""
        if rules_kept >= self.max_rules:
            return f"a tenant keeps at most {self.max_rules} alert rules; delete one first"
        return None

