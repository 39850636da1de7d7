"""Hard limits at intake: at a stated rate the gateway starts refusing within the bound of ADR 0042, with
its own problem type, the meter, the period end and Retry-After; a soft limit keeps accepting; an upgrade
lets the subject through again; tenants without hard limits are never refused; the soft meter's overage
(and the hard meter's overshoot) is reported to Stripe. The gateway copies the blocks again only when the
decision changed."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import redis.asyncio as redis

from tally.ingest.limits import PROBLEM_TYPE, UsageLimits
from tally.settings import Settings
from tests.metering.helpers import metered, pipeline, run_tally, tenant_keys
from tests.processor.helpers import drained, wait_for
from tests.support import running
from tally.usage.limits import publish, tenant_key

RATE = 20  # events per second
INCLUDED = 40
# ADR 0042: overshoot <= rate x (processing lag + limits refresh 0.5 s + gateway copy 0.5 s); allowing
# up to 4 s of processing lag on a loaded machine, at 20 events/s:
BOUND = RATE * 5


def _event(subject: str, type_: str = "api.call", data: dict | None = None) -> dict:
    return {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "app", "type": type_, "subject": subject,
            "data": data or {}}


async def test_hard_limit_refuses_within_the_bound_and_soft_keeps_accepting(isolated: Settings,
                                                                          db: asyncpg.Connection) -> None:
    settings = metered(isolated).model_copy(update={"jobs_tick_s": 1.0})
    tenant, admin, writer = await tenant_keys(settings)
    _, _, other_writer = await tenant_keys(settings)
    subject, customer = "limited-customer", f"cus_{uuid.uuid4().hex[:10]}"
    with pipeline(settings) as gw, running("jobs", ["jobs"], settings):
        async with gw.client(admin) as api, gw.client(writer) as writes, gw.client(other_writer) as others:
            plan = {"id": "starter", "meters": [
                {"meter": "api_calls", "included": INCLUDED, "limit_mode": "hard"},
                {"meter": "tokens", "included": 100, "limit_mode": "soft", "overage_price": "0.002"}]}
            assert (await api.post("/v1/plans", json=plan)).status_code == 201
            start = (date.today() - timedelta(days=40)).isoformat()
            assert (await api.put(f"/v1/subscriptions/{subject}", json={
                "plan_id": "starter", "start_date": start, "stripe_customer_id": customer})).status_code == 200

            accepted, refusal, t0 = 0, None, time.monotonic()
            for n in range(BOUND * 3):
                answer = await writes.post("/v1/events", json=_event(subject))
                if answer.status_code == 429:
                    refusal = answer
                    break
                assert answer.status_code == 202, answer.text
                accepted += 1
                # soft-limited tokens and another tenant's events keep flowing meanwhile
                assert (await writes.post("/v1/events", json=_event(subject, "llm.call", {"tokens": 10}))
                        ).status_code == 202
                assert (await others.post("/v1/events", json=_event(subject))).status_code == 202
                await asyncio.sleep(max(0.0, t0 + (n + 1) / RATE - time.monotonic()))
            assert refusal is not None, f"no refusal after {accepted} events"
            overshoot = accepted - INCLUDED
            print(f"hard limit: {accepted} accepted for {INCLUDED} included at {RATE}/s: overshoot {overshoot}")
            assert 0 <= overshoot <= BOUND

            problem = refusal.json()
            assert refusal.headers["content-type"] == "application/problem+json"
            assert problem["type"] == PROBLEM_TYPE and problem["meter"] == "api_calls"
            assert "period_end" in problem and int(refusal.headers["Retry-After"]) > 0
            batch = await writes.post("/v1/events/batch", json=[_event(subject), _event(subject, "llm.call",
                                                                                         {"tokens": 1})])
            assert [r["status"] for r in batch.json()["results"]] == ["rejected", "accepted"]

            await wait_for(lambda: drained(settings, db), 60, "the processor")
            usage = {m["meter"]: m for m in
                     (await api.get("/v1/usage", params={"subject": subject})).json()["meters"]}
            assert Decimal(usage["api_calls"]["used"]) == accepted
            assert Decimal(usage["tokens"]["used"]) == accepted * 10 + 1
            assert Decimal(usage["tokens"]["overage"]) == accepted * 10 + 1 - 100
            # the soft meter's overage, and the hard meter's overshoot, are billed (stripe-mock)
            code, out = run_tally(["jobs", "run", "stripe_report"], settings)
            assert code == 0, out
            # the worker's own daily run may have reported part of it while the events flowed
            reported = {r["meter"]: (r["value"], r["status"]) for r in await db.fetch(
                "select meter, sum(value) as value, max(status) as status from stripe_reports"
                " where stripe_customer_id = $1 group by meter", customer)}
            expected = {"tokens": (accepted * 10 + 1 - 100, "sent")}
            if overshoot:
                expected["api_calls"] = (overshoot, "sent")
            assert reported == expected

            plan["meters"][0]["included"] = accepted + 1000  # an upgrade lifts the block
            assert (await api.post("/v1/plans", json=plan)).status_code == 201

            async def let_through() -> bool:
                return (await writes.post("/v1/events", json=_event(subject))).status_code == 202

            await wait_for(let_through, 30, "the upgrade to lift the block")


async def test_the_gateway_copies_the_blocks_again_only_when_the_decision_changed(settings: Settings) -> None:
    prefix = f"{settings.redis_prefix}copy-{uuid.uuid4().hex[:6]}:"
    client = redis.Redis.from_url(settings.redis_url)
    until = (datetime.now(timezone.utc) + timedelta(days=3)).isoformat()
    limits = UsageLimits(client, prefix, 60)
    try:
        await publish(client, prefix, {"t": {"a": [["api.*", "api_calls", until]]}}, 60)
        await limits.load()
        assert limits.refused("t", {"type": "api.call", "subject": "a"}, datetime.now(timezone.utc)) is not None
        await client.hdel(tenant_key(prefix, "t"), "a")  # not a decision: the digest is unchanged, the copy kept
        await limits.load()
        assert limits.refused("t", {"type": "api.call", "subject": "a"}, datetime.now(timezone.utc)) is not None
        await publish(client, prefix, {"t": {"b": [["api.*", "api_calls", until]]}}, 60)
        await limits.load()
        assert limits.refused("t", {"type": "api.call", "subject": "a"}, datetime.now(timezone.utc)) is None
        assert limits.refused("t", {"type": "api.call", "subject": "b"}, datetime.now(timezone.utc)) is not None
    finally:
        await client.aclose()
