"""Alert delivery against real HTTP receivers on loopback: signed webhooks verified by the library, the Slack
double, backoff persisted in the row, permanent failures, Retry-After, a dead target beside a healthy one,
and two deliverers sharing the rows."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from standardwebhooks import Webhook

import tally.egress.client
from tally.alerts.delivery import Deliverer, DeliveryPolicy
from tally.alerts.ledger import digest
from tally.alerts.transitions import transition
from tally.egress import EgressPolicy, endpoint
from tally.settings import ROOT, Settings
from tests.alerting.helpers import BOX, LOCAL
from tests.alerting.receivers import receiver
from tests.processor.helpers import wait_for
from tests.support import free_port, wait_until

# A deliverer in a process of its own, to be killed with SIGKILL.
_DELIVER_IN_A_PROCESS = """
import asyncio, sys
from tally.alerts.delivery import Deliverer, DeliveryPolicy
from tests.alerting.helpers import BOX, LOCAL
async def main():
    deliverer = await Deliverer.open(sys.argv[1], DeliveryPolicy(timeout_s=60), LOCAL, BOX)
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
    async with tally.egress.client.client(LOCAL) as client:
        yield Deliverer(pool, client, POLICY, LOCAL, BOX)
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
        await db.execute("insert into alert_deliveries (tenant, transition_id, target, kind, url, secret, endpoint,"
                         " target_digest) values ($1, $2, $3, $4, $5, $6, $7, $8)", tenant, tid, position,
                         target_kind, BOX.seal(url), secret and BOX.seal(secret), endpoint(url),
                         digest(target_kind, url))
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

        assert await deliverer.run_once() == {"sent": 8, "retried": 0, "failed": 0, "refused": 0}
        assert await deliverer.run_once() == {"sent": 0, "retried": 0, "failed": 0, "refused": 0}

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

        assert await deliverer.run_once(now) == {"sent": 0, "retried": 1, "failed": 0, "refused": 0}
        row = await _row(db, tid)
        assert (row["status"], row["attempts"], row["last_status"], row["last_error"]) == ("pending", 1, 500, "HTTP 500")
        waited = (row["next_attempt_at"] - now).total_seconds()
        assert 5 <= waited <= 10.5  # backoff_s 10, jittered down by up to half

        assert await deliverer.run_once(now + timedelta(seconds=4.9)) == {"sent": 0, "retried": 0, "failed": 0, "refused": 0}
        second = row["next_attempt_at"]
        assert await deliverer.run_once(second) == {"sent": 0, "retried": 1, "failed": 0, "refused": 0}
        row = await _row(db, tid)
        assert row["attempts"] == 2 and row["last_error"] == "HTTP 500"
        assert 10 <= (row["next_attempt_at"] - second).total_seconds() <= 20.5

        assert await deliverer.run_once(row["next_attempt_at"]) == {"sent": 1, "retried": 0, "failed": 0, "refused": 0}
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
        other = await _transition(db, tenant, [("webhook", f"{rx.url}/other", _secret())], "firing", rule="latency")
        now = await db.fetchval("select now()")

        assert await deliverer.run_once(now) == {"sent": 1, "retried": 1, "failed": 0, "refused": 0}
        assert (rx.ids("/hook"), rx.ids("/other")) == ([f"alert-{first}"], [f"alert-{other}"])
        assert (await _row(db, second))["attempts"] == 0

        assert await deliverer.run_once((await _row(db, first))["next_attempt_at"]) == {
            "sent": 2, "retried": 0, "failed": 0, "refused": 0}
        assert rx.ids("/hook") == [f"alert-{first}"] * 2 + [f"alert-{second}"]


async def test_a_400_is_failed_at_once_with_its_status_and_reason(
        db: asyncpg.Connection, tenant: str, deliverer: Deliverer) -> None:
    with receiver() as rx:
        rx.answers["/slack"] = [(400, {}, b"invalid_payload")]
        tid = await _transition(db, tenant, [("slack", f"{rx.url}/slack", None)])
        assert await deliverer.run_once() == {"sent": 0, "retried": 0, "failed": 1, "refused": 0}
        assert len(rx.at("/slack")) == 1
    row = await _row(db, tid)
    assert (row["status"], row["attempts"], row["last_status"], row["last_error"]) == (
        "failed", 1, 400, "HTTP 400")  # the receiver's body is never read, so never shown
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
        assert await deliverer.run_once(now + timedelta(hours=1)) == {"sent": 0, "retried": 0, "failed": 0, "refused": 0}


async def test_a_429_with_retry_after_waits_that_long(db: asyncpg.Connection, tenant: str,
                                                       deliverer: Deliverer) -> None:
    with receiver() as rx:
        rx.answers["/slack"] = [(429, {"retry-after": "30"}, b"rate_limited")]
        tid = await _transition(db, tenant, [("slack", f"{rx.url}/slack", None)])
        now = await db.fetchval("select now()")
        assert await deliverer.run_once(now) == {"sent": 0, "retried": 1, "failed": 0, "refused": 0}
        row = await _row(db, tid)
        assert row["last_status"] == 429 and 30 <= (row["next_attempt_at"] - now).total_seconds() <= 30.5
        assert await deliverer.run_once(now + timedelta(seconds=29)) == {"sent": 0, "retried": 0, "failed": 0, "refused": 0}
        assert await deliverer.run_once(row["next_attempt_at"]) == {"sent": 1, "retried": 0, "failed": 0, "refused": 0}
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
        assert await deliverer.run_once() == {"sent": 1, "retried": 2, "failed": 0, "refused": 0}
        assert rx.at("/slack")[0].at - start < POLICY.timeout_s
    assert (await _row(db, healthy))["status"] == "sent"
    hung, refused_row = await _row(db, hanging), await _row(db, dead)
    assert hung["status"] == "pending" and hung["last_error"] == "no answer within 1 s"
    assert refused_row["status"] == "pending" and refused_row["last_error"] == "ConnectError"
    assert refused_row["last_status"] is None


async def test_a_signature_with_the_wrong_secret_is_refused_by_the_receiver(
        db: asyncpg.Connection, tenant: str, deliverer: Deliverer) -> None:
    right, wrong = _secret(), _secret()
    with receiver() as rx:
        rx.secrets["/hook"] = right
        tid = await _transition(db, tenant, [("webhook", f"{rx.url}/hook", wrong)])
        assert await deliverer.run_once() == {"sent": 0, "retried": 0, "failed": 1, "refused": 0}
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
            async with tally.egress.client.client(LOCAL) as client:
                outcomes = await asyncio.gather(*(Deliverer(pool, client, POLICY, LOCAL, BOX).run_once()
                                                  for pool in pools))
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
        assert (row["status"], row["attempts"]) == ("pending", 0)  # claimed, never recorded
        assert await deliverer.run_once() == {"sent": 0, "retried": 0, "failed": 0, "refused": 0}  # leased

        assert await deliverer.run_once(row["lease_until"]) == {"sent": 1, "retried": 0, "failed": 0, "refused": 0}
        assert rx.ids("/hook") == [f"alert-{tid}"] * 2  # the one duplicate window: same id, receivers dedupe
    assert (await _row(db, tid))["attempts"] == 1


async def test_the_loop_delivers_until_stopped(db: asyncpg.Connection, tenant: str, settings: Settings) -> None:
    with receiver() as rx:
        policy = DeliveryPolicy(poll_s=0.05, timeout_s=1)
        deliverer = await Deliverer.open(settings.database_url, policy, LOCAL, BOX)
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


@contextmanager
def tarpit(headers_too: bool) -> Iterator[tuple[str, list[socket.socket]]]:
    """The review's tarpit (security review H3): answers 500 with a huge Content-Length and drips the body a byte
    a second; with `headers_too`, drips the status line itself, so an answer never starts."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []
    done = threading.Event()

    def drip(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.recv(65536)
            if not headers_too:
                conn.sendall(b"HTTP/1.1 500 X\r\nContent-Length: 99999999\r\n\r\n")
            while not done.wait(1.0):
                conn.sendall(b"H" if headers_too else b"x")

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn = server.accept()[0]
                accepted.append(conn)
                threading.Thread(target=drip, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        done.set()
        server.close()
        for conn in accepted:
            conn.close()


async def test_a_dripping_target_holds_up_no_other_tenant_and_no_transaction(
        db: asyncpg.Connection, settings: Settings) -> None:
    """Tenant A's targets drip forever; tenant B's alert, recorded while A's requests hang, goes out at once; no
    connection sits idle in a transaction meanwhile; A's requests end at the total deadline."""
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    policy = DeliveryPolicy(timeout_s=20, poll_s=0.1, backoff_s=60, concurrency=4)
    with tarpit(False) as (body_drip, body_conns), tarpit(True) as (head_drip, head_conns), receiver() as rx:
        await _transition(db, a, [("webhook", f"{head_drip}/hook", _secret()),
                                  ("webhook", f"{body_drip}/hook", _secret())])
        deliverer = await Deliverer.open(settings.database_url, policy, LOCAL, BOX)
        stop = asyncio.Event()
        task = asyncio.create_task(deliverer.run(stop))
        try:
            await asyncio.to_thread(wait_until, lambda: bool(head_conns and body_conns), 30, 0.05, "A's requests")
            started = time.monotonic()
            tid = await _transition(db, b, [("slack", f"{rx.url}/slack", None)])
            await asyncio.to_thread(wait_until, lambda: bool(rx.at("/slack")), 30, 0.05, "B's delivery")
            assert rx.at("/slack")[0].at - started < 5  # A's hang for 20 s
            assert (await _row(db, tid))["status"] == "sent"
            idle = await db.fetchval("select count(*) from pg_stat_activity where datname = current_database()"
                                     " and state like 'idle in transaction%'")
            assert idle == 0
            head = await db.fetchrow("select d.* from alert_deliveries d join alert_transitions t on"
                                     " t.id = d.transition_id where t.tenant = $1 and d.target = 0", a)
            assert head["attempts"] == 0 and head["lease_until"] is not None  # still in flight

            async def settled() -> bool:
                return (await db.fetchval("select attempts from alert_deliveries d join alert_transitions t on"
                                          " t.id = d.transition_id where t.tenant = $1 and d.target = 0", a)) == 1

            await wait_for(settled, 30, "A's hung request to end at its deadline")
            assert time.monotonic() - started < policy.timeout_s + 3
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
            await deliverer.close()
    rows = await db.fetch("select d.status, d.last_status, d.last_error from alert_deliveries d join"
                          " alert_transitions t on t.id = d.transition_id where t.tenant = $1 order by d.target", a)
    assert [tuple(r) for r in rows] == [("pending", None, "no answer within 20 s"), ("pending", 500, "HTTP 500")]
    await db.execute("delete from alert_transitions where tenant = any($1::text[])", [a, b])


async def test_a_target_that_may_not_be_called_is_refused_and_shown(
        db: asyncpg.Connection, tenant: str, settings: Settings) -> None:
    """The default policy: loopback and the metadata address refused at connect time, a stored URL no worker
    can use refused before any request, a secret no key opens refused; the reason is recorded, nothing retried."""
    with receiver() as rx:
        tid = await _transition(db, tenant, [("webhook", "http://93.184.215.14/hook", _secret()),
                                             ("slack", "http://", None),
                                             ("webhook", "http://169.254.169.254/latest", _secret())])
        await db.execute("update alert_deliveries set secret = 'sealed:gAAAAAnotatoken' where transition_id = $1"
                         " and target = 0", tid)
        other = await _transition(db, tenant, [("webhook", f"{rx.url.replace('127.0.0.1', 'localhost')}/hook",
                                                _secret()), ("webhook", f"{rx.url}/hook", _secret())], rule="b")
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
        default = Deliverer(pool, tally.egress.client.client(EgressPolicy()), POLICY, EgressPolicy(), BOX)
        try:
            assert await default.run_once() == {"sent": 0, "retried": 0, "failed": 0, "refused": 5}
        finally:
            await default.client.aclose()
            await pool.close()
        assert rx.received == []
    reasons = [r["last_error"] for r in await db.fetch(
        "select last_error from alert_deliveries where transition_id = any($1::bigint[]) order by transition_id,"
        " target", [tid, other])]
    assert reasons[0] == "no configured TALLY_SECRETS_KEY opens this sealed value"
    assert reasons[1] == "the URL names no host"
    assert reasons[2] == "the target resolves to a link-local address, which tenants may not reach"
    assert reasons[3] == reasons[4] == "the target resolves to a loopback address, which tenants may not reach"
    settled = await db.fetch("select status, url, secret from alert_deliveries where transition_id = any($1::bigint[])",
                             [tid, other])
    assert {(r["status"], r["url"], r["secret"]) for r in settled} == {("refused", None, None)}
