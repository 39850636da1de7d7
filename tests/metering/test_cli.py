"""`tally plans` and `tally subscriptions`: a plan from YAML, a subscriber, their listings, refusals."""

from __future__ import annotations

import uuid
from pathlib import Path

from tally.settings import Settings
from tests.metering.helpers import metered, run_tally


def test_plans_and_subscriptions_commands(settings: Settings, tmp_path: Path) -> None:
    settings = metered(settings)
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    plan = tmp_path / "plan.yaml"
    plan.write_text("id: pro\nreport: usage\nmeters:\n  - {meter: api_calls, included: 1000, limit_mode: hard,"
                    " overage_price: '0.002', thresholds: [50, 90]}\n")
    code, out = run_tally(["plans", "create", "--tenant", tenant, "--file", str(plan)], settings)
    assert code == 0 and "saved plan pro" in out, out
    code, out = run_tally(["plans", "list", "--tenant", tenant], settings)
    assert "api_calls" in out and "hard" in out and "[50, 90]" in out, out

    base = ["subscriptions", "set", "--tenant", tenant, "--subject", "acme", "--stripe-customer", "cus_9"]
    code, out = run_tally([*base, "--plan", "pro", "--anchor-day", "15", "--time-zone", "America/New_York",
                           "--start-date", "2026-02-15"], settings)
    assert code == 0 and "acme is on plan pro" in out, out
    code, out = run_tally(["subscriptions", "list", "--tenant", tenant], settings)
    assert "America/New_York" in out and "cus_9" in out and "2026-02-15" in out, out

    code, out = run_tally([*base, "--plan", "missing"], settings)
    assert code == 1 and "no plan 'missing'" in out, out
    code, out = run_tally([*base, "--plan", "pro", "--time-zone", "Asia/Kathmandu"], settings)
    assert code == 1 and "whole-hour" in out, out
    plan.write_text("id: bad\nmeters: []\n")
    code, out = run_tally(["plans", "create", "--tenant", tenant, "--file", str(plan)], settings)
    assert code == 1 and "not a valid plan" in out, out
