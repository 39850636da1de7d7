"""Alert delivery against real HTTP receivers on loopback: signed webhooks verified by the library, the Slack
double, backoff persisted in the row, permanent failures, Retry-After, a dead target beside a healthy one,
and two deliverers sharing the rows."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from standardwebhooks import Webhook

from alerts.delivery import Deliverer, DeliveryPolicy, deliveries
from alerts.transitions import transition
from tally.settings import ROOT, Settings
from tests.alerting.receivers import receiver
from tests.support import free_port, wait_until

# A deliverer in a process of its own, to be killed with SIGKILL.
_DELIVER_IN_A_PROCESS = """
import asyncio, sys
from alerts.delivery import Deliverer, DeliveryPolicy
async def main():
    deliverer = await Deliverer.open(sys.argv[1], DeliveryPolicy(timeout_s=60))
    await deliverer.run_once()
asyncio.run(main())
"""

POLICY = DeliveryPolicy(max_attempts=4, backoff_s=10, backoff_max_s=60, timeout_s=1, concurrency=4)


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@pytest.fixture
async def tenant(db: asyncpg.Connection) -> AsyncIterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    yield name
    await db.execute("delete from alert_transitions where tenant = $1", name)


@pytest.fixture
async def deliverer(settings: Settings) -> AsyncIterator[Deliverer]:
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=POLICY.concurrency)
    async with httpx.AsyncClient() as client:
        yield Deliverer(pool, client, POLICY)
    await pool.close()


async def _transition(db: asyncpg.Connection, tenant: str, targets: list[tuple[str, str, str | None]],
                      kind: str = "firing", rule: str = "errors", group: dict[str, Any] | None = None) -> int:
    """One transition and its delivery rows, as the evaluator writes them."""
    grp = orjson.dumps(group or {}, option=orjson.OPT_SORT_KEYS).decode()
    tid = await db.fetchval(
        "insert into alert_transitions (tenant, rule_id, rule_name, group_key, grp, kind, value, threshold,"
        " comparison, window_s, fired_at)"
        " values ($1, $2, $3, $4::text, $4::text::jsonb, $5, 12, 10, '>', 300, now()) returning id",
        tenant, rule, f"Too many {rule}", grp, kind)
    for position, (target_kind, url, secret) in enumerate(targets):
        await db.execute("insert into alert_deliveries (transition_id, target, kind, url, secret)"
                         " values ($1, $2, $3, $4, $5)", tid, position, target_kind, url, secret)
    return tid


async def _row(db: asyncpg.Connection, tid: int, target: int = 0) -> asyncpg.Record:
    return await db.fetchrow("select * from alert_deliveries where transition_id = $1 and target = $2", tid, target)


async def test_each_transition_reaches_slack_and_the_verified_webhook_once_in_order(
        db: asyncpg.Connection, tenant: str, deliverer: Deliverer) -> None:
    secret = _secret()
    with receiver() as rx:
        rx.secrets["/hook"] = secret
        targets = [("slack", f"{rx.url}/slack/T1/B1/x", None), ("webhook", f"{rx.url}/hook", secret)]
        ids = [await _transition(db, tenant, targets, kind, group={"service": service})
               for kind, service in [("firing", "api"), ("resolved", "api"), ("firing", "api"), ("firing", "web")]]

        assert await deliverer.run_once() == {"sent": 8, "retried": 0, "failed": 0}
        assert await deliverer.run_once() == {"sent": 0, "retried": 0, "failed": 0}

        hooks = rx.at("/hook")
        assert [r.verified for r in hooks] == [True] * 4
        assert sorted(rx.ids("/hook")) == sorted(f"alert-{i}" for i in ids)
        api = [r.headers["webhook-id"] for r in hooks if r.json()["group"] == {"service": "api"}]
        assert api == [f"alert-{i}" for i in ids[:3]]
        rows = {r["id"]: r for r in await db.fetch("select * from alert_transitions where tenant = $1", tenant)}
        for got in hooks:
            assert got.headers["content-type"] == "application/json"
            tid = int(got.headers["webhook-id"].removeprefix("alert-"))
            assert got.json() == transition(rows[tid]).model_dump(mode="json")

        slack = [r.json() for r in rx.at("/slack/T1/B1/x")]
        assert len(slack) == 4
        headers = sorted(m["blocks"][0]["text"]["text"] for m in slack)
        assert headers == ["Firing: Too many errors"] * 3 + ["Resolved: Too many errors"]
        first = next(m for m in slack if f"alert-{ids[0]}" in m["blocks"][2]["elements"][0]["text"])
        fields = [f["text"] for f in first["blocks"][1]["fields"]]
        assert "*Value*\n12" in fields and "*Threshold*\n&gt; 10" in fields and "*Window*\n5m" in fields
        assert "*Group*\nservice=api" in fields
        assert f"tenant {tenant}" in first["blocks"][2]["elements"][0]["text"]
        assert first["text"].startswith("Firing: Too many errors (service=api): 12, threshold &gt; 10")

    for tid in ids:
        for target in (0, 1):
            row = await _row(db, tid, target)
            assert (row["status"], row["attempts"], row["last_status"], row["last_error"]) == ("sent", 1, 200, None)
            assert row["sent_at"] is not None


async def test_500_twice_then_200_is_sent_on_the_third_attempt_after_doubling_backoff(
        db: asyncpg.Connection, tenant: str, deliverer: Deliverer) -> None:
    secret = _secret()
    with receiver() as rx:
        rx.secrets["/hook"] = secret
        rx.answers["/hook"] = [(500, {}, b"down"), (500, {}, b"still down")]
        tid = await _transition(db, tenant, [("webhook", f"{rx.url}/hook", secret)])
        now = await db.fetchval("select now()")

        assert await deliverer.run_once(now) == {"sent": 0, "retried": 1, "failed": 0}
        row = await _row(db, tid)
        assert (row["status"], row["attempts"], row["last_status"], row["last_error"]) == ("pending", 1, 500,
                                                                                          "HTTP 500: down")
        waited = (row["next_attempt_at"] - now).total_seconds()
        assert 5 <= waited <= 10.5  # backoff_s 10, jittered down by up to half

        assert await deliverer.run_once(now + timedelta(seconds=4.9)) == {"sent": 0, "retried": 0, "failed": 0}
        second = row["next_attempt_at"]
        assert await deliverer.run_once(second) == {"sent": 0, "retried": 1, "failed": 0}
        row = await _row(db, tid)
        assert row["attempts"] == 2 and row["last_error"] == "HTTP 500: still down"
        assert 10 <= (row["next_attempt_at"] - second).total_seconds() <= 20.5

        assert await deliverer.run_once(row["next_attempt_at"]) == {"sent": 1, "retried": 0, "failed": 0}
        row = await _row(db, tid)
        assert (row["status"], row["attempts"], row["last_status"], row["last_error"]) == ("sent", 3, 200, None)
        assert rx.ids("/hook") == [f"alert-{tid}"] * 3  # the same id on every attempt: receivers dedupe on it
        assert [r.verified for r in rx.at("/hook")] == [True] * 3


async def test_a_later_transition_waits_for_an_earlier_one_in_backoff(
        db: asyncpg.Connection, tenant: str, deliverer: Deliverer) -> None:
    with receiver() as rx:
        rx.answers["/hook"] = [(503, {}, b"busy")]
        target = [("webhook", f"{rx.url}/hook", _secret())]
        first = await _transition(db, tenant, target, "firing")
        second = await _transition(db, tenant, target, "resolved")
        other = await _transition(db, tenant, target, "firing", rule="latency")
        now = await db.fetchval("select now()")

        assert await deliverer.run_once(now) == {"sent": 1, "retried": 1, "failed": 0}
        assert sorted(rx.ids("/hook")) == sorted([f"alert-{first}", f"alert-{other}"])
        assert (await _row(db, second))["attempts"] == 0

        assert await deliverer.run_once((await _row(db, first))["next_attempt_at"]) == {
            "sent": 2, "retried": 0, "failed": 0}
        assert [i for i in rx.ids("/hook") if i != f"alert-{other}"] == [f"alert-{first}"] * 2 + [f"alert-{second}"]


async def test_a_400_is_failed_at_once_with_its_status_and_reason(
        db: asyncpg.Connection, tenant: str, deliverer: Deliverer) -> None:
    with receiver() as rx:
        rx.answers["/slack"] = [(400, {}, b"invalid_payload")]
        tid = await _transition(db, tenant, [("slack", f"{rx.url}/slack", None)])
        assert await deliverer.run_once() == {"sent": 0, "retried": 0, "failed": 1}
        assert len(rx.at("/slack")) == 1
    row = await _row(db, tid)
    assert (row["status"], row["attempts"], row["last_status"], row["last_error"]) == (
        "failed", 1, 400, "HTTP 400: invalid_payload")
    assert row["sent_at"] is None


async def test_failed_after_the_maximum_attempts(db: asyncpg.Connection, tenant: str, deliverer: Deliverer) -> None:
    with receiver() as rx:
        rx.answers["/hook"] = [(500, {}, b"no")] * 4
        tid = await _transition(db, tenant, [("webhook", f"{rx.url}/hook", _secret())])
        now = await db.fetchval("select now()")
        for attempt in range(1, POLICY.max_attempts + 1):
            outcome = await deliverer.run_once(now)
            row = await _row(db, tid)
            assert row["attempts"] == attempt
            if attempt < POLICY.max_attempts:
                assert outcome["retried"] == 1 and row["status"] == "pending"
                now = row["next_attempt_at"]
        assert outcome["failed"] == 1 and row["status"] == "failed"
        assert len(rx.at("/hook")) == POLICY.max_attempts
        assert await deliverer.run_once(now + timedelta(hours=1)) == {"sent": 0, "retried": 0, "failed": 0}


async def test_a_429_with_retry_after_waits_that_long(db: asyncpg.Connection, tenant: str,
                                                       deliverer: Deliverer) -> None:
    with receiver() as rx:
        rx.answers["/slack"] = [(429, {"retry-after": "30"}, b"rate_limited")]
        tid = await _transition(db, tenant, [("slack", f"{rx.url}/slack", None)])
        now = await db.fetchval("select now()")
        assert await deliverer.run_once(now) == {"sent": 0, "retried": 1, "failed": 0}
        row = await _row(db, tid)
        assert row["last_status"] == 429 and 30 <= (row["next_attempt_at"] - now).total_seconds() <= 30.5
        assert await deliverer.run_once(now + timedelta(seconds=29)) == {"sent": 0, "retried": 0, "failed": 0}
        assert await deliverer.run_once(row["next_attempt_at"]) == {"sent": 1, "retried": 0, "failed": 0}
        assert len(rx.at("/slack")) == 2


async def test_a_dead_target_does_not_delay_a_healthy_one(db: asyncpg.Connection, tenant: str,
                                                          deliverer: Deliverer) -> None:
    refused = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: connection refused
    with receiver() as rx:
        rx.slow["/hang"] = 5  # longer than the policy's timeout
        hanging = await _transition(db, tenant, [("webhook", f"{rx.url}/hang", _secret())], rule="a")
        dead = await _transition(db, tenant, [("webhook", refused, _secret())], rule="b")
        healthy = await _transition(db, tenant, [("slack", f"{rx.url}/slack", None)], rule="c")
        start = time.monotonic()
        assert await deliverer.run_once() == {"sent": 1, "retried": 2, "failed": 0}
        assert rx.at("/slack")[0].at - start < POLICY.timeout_s
    assert (await _row(db, healthy))["status"] == "sent"
    hung, refused_row = await _row(db, hanging), await _row(db, dead)
    assert hung["status"] == "pending" and hung["last_error"].startswith("ReadTimeout")
    assert refused_row["status"] == "pending" and refused_row["last_error"].startswith("ConnectError")
    assert refused_row["last_status"] is None


async def test_a_signature_with_the_wrong_secret_is_refused_by_the_receiver(
        db: asyncpg.Connection, tenant: str, deliverer: Deliverer) -> None:
    right, wrong = _secret(), _secret()
    with receiver() as rx:
        rx.secrets["/hook"] = right
        tid = await _transition(db, tenant, [("webhook", f"{rx.url}/hook", wrong)])
        assert await deliverer.run_once() == {"sent": 0, "retried": 0, "failed": 1}
        got = rx.at("/hook")[0]
        assert got.verified is False
        assert Webhook(wrong).verify(got.body, got.headers)["id"] == f"alert-{tid}"
    row = await _row(db, tid)
    assert (row["status"], row["last_status"]) == ("failed", 401)


async def test_two_deliverers_deliver_each_row_once(db: asyncpg.Connection, tenant: str, settings: Settings) -> None:
    secret = _secret()
    with receiver() as rx:
        rx.secrets["/hook"] = secret
        rx.slow["/hook"] = 0.05
        target = [("webhook", f"{rx.url}/hook", secret)]
        spread = [await _transition(db, tenant, target, group={"subject": str(n)}) for n in range(16)]
        ordered = [await _transition(db, tenant, target, kind, rule="one-group")
                   for kind in ["firing", "resolved"] * 3]
        pools = [await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4) for _ in range(2)]
        try:
            async with httpx.AsyncClient() as client:
                outcomes = await asyncio.gather(*(Deliverer(pool, client, POLICY).run_once() for pool in pools))
        finally:
            for pool in pools:
                await pool.close()
        assert sum(o["sent"] for o in outcomes) == 22
        assert Counter(rx.ids("/hook")) == Counter(f"alert-{i}" for i in spread + ordered)
        assert all(r.verified for r in rx.at("/hook"))
        assert [i for i in rx.ids("/hook") if int(i.removeprefix("alert-")) in ordered] == [
            f"alert-{i}" for i in ordered]
    attempts = await db.fetch("select d.attempts from alert_deliveries d join alert_transitions t"
                              " on t.id = d.transition_id where t.tenant = $1", tenant)
    assert [r["attempts"] for r in attempts] == [1] * 22


def test_backoff_doubles_to_its_cap_jittered_and_honours_retry_after() -> None:
    policy = DeliveryPolicy(backoff_s=15, backoff_max_s=900)
    for attempts, full in [(1, 15), (2, 30), (3, 60), (7, 900), (8, 900)]:
        waits = [policy.backoff(attempts) for _ in range(200)]
        assert full / 2 <= min(waits) and max(waits) <= full
    assert policy.backoff(1, retry_after=120) == 120
    assert policy.backoff(1, retry_after=86400) == 900
    assert policy.backoff(3, retry_after=1) >= 30


async def test_a_kill_9_mid_request_leaves_the_row_pending_and_it_is_resent_with_the_same_id(
        db: asyncpg.Connection, tenant: str, settings: Settings, deliverer: Deliverer) -> None:
    secret = _secret()
    with receiver() as rx:
        rx.secrets["/hook"] = secret
        rx.slow["/hook"] = 30  # the receiver has the request; the deliverer dies before it learns the answer
        tid = await _transition(db, tenant, [("webhook", f"{rx.url}/hook", secret)])
        process = subprocess.Popen([sys.executable, "-c", _DELIVER_IN_A_PROCESS, settings.database_url], cwd=ROOT)
        try:
            await asyncio.to_thread(wait_until, lambda: bool(rx.at("/hook")), 30, 0.05, "the request")
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        rx.released.set()
        rx.slow.clear()
        row = await _row(db, tid)
        assert (row["status"], row["attempts"]) == ("pending", 0)  # the claim died with its connection

        assert await deliverer.run_once() == {"sent": 1, "retried": 0, "failed": 0}
        assert rx.ids("/hook") == [f"alert-{tid}"] * 2  # the one duplicate window: same id, receivers dedupe
    assert (await _row(db, tid))["attempts"] == 1


async def test_the_loop_delivers_until_stopped(db: asyncpg.Connection, tenant: str, settings: Settings) -> None:
    with receiver() as rx:
        policy = DeliveryPolicy(poll_s=0.05, timeout_s=1)
        deliverer = await Deliverer.open(settings.database_url, policy)
        stop = asyncio.Event()
        task = asyncio.create_task(deliverer.run(stop))
        try:
            tid = await _transition(db, tenant, [("slack", f"{rx.url}/slack", None)])
            for _ in range(100):
                if rx.at("/slack"):
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
            await deliverer.close()
        assert len(rx.at("/slack")) == 1
    assert (await _row(db, tid))["status"] == "sent"


async def test_the_delivery_log_for_the_api_hides_urls_and_secrets(
        db: asyncpg.Connection, tenant: str, deliverer: Deliverer) -> None:
    with receiver() as rx:
        rx.answers["/hook"] = [(500, {}, b"down")]
        tid = await _transition(db, tenant, [("slack", f"{rx.url}/slack", None),
                                             ("webhook", f"{rx.url}/hook", _secret())])
        await deliverer.run_once()
    log = await deliveries(db, tenant, [tid])
    assert list(log) == [tid]
    slack, hook = log[tid]
    assert set(slack) == {"target", "kind", "status", "attempts", "last_status", "last_error", "sent_at",
                          "next_attempt_at"}
    assert (slack["kind"], slack["status"], slack["attempts"], slack["next_attempt_at"]) == ("slack", "sent", 1, None)
    assert isinstance(slack["sent_at"], datetime)
    assert (hook["status"], hook["last_status"], hook["last_error"]) == ("pending", 500, "HTTP 500: down")
    assert hook["next_attempt_at"] is not None
    assert await deliveries(db, "someone-else", [tid]) == {}
