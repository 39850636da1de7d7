"""Usage alerts fire once per threshold per period across a processor kill -9, a re-delivery of the same
events and two replays from the dead-letter topic; through the alert lifecycle (`tally alerts`) they reach
tally.alerts.v1, the in-app list and the Slack double; a failing Slack is visible in the delivery log."""

from __future__ import annotations

import asyncio
from datetime import date, datetime, timedelta, timezone

import asyncpg
import httpx
import orjson

from tally.schemas.envelope import Envelope
from tally.settings import Settings
from tests.alerting.helpers import LOCAL_TARGETS
from tests.gateway.helpers import start_gateway
from tests.metering.helpers import metered, run_tally, tenant_keys
from tests.metering.recording_server import recording_server
from tests.processor.helpers import drained, produce, wait_for
from tests.support import TallyProcess, read_topic, running

SUBJECT = "acme"


def _event(n: int, at: datetime) -> dict:
    return {"specversion": "1.0", "id": f"a-{n}", "source": "app", "type": "api.call", "subject": SUBJECT,
            "time": at.isoformat(), "data": {}}


async def _alerts(api: httpx.AsyncClient, **params: str) -> list[dict]:
    return (await api.get("/v1/usage/alerts", params={"subject": SUBJECT, **params})).json()["alerts"]


async def _slack(db: asyncpg.Connection, tenant: str) -> list[str]:
    """The tenant's Slack deliveries' states, oldest first (alert_deliveries: the delivery log)."""
    rows = await db.fetch("select d.status from alert_deliveries d join alert_transitions t on t.id = d.transition_id"
                          " where t.tenant = $1 and d.kind = 'slack' order by t.id", tenant)
    return [r["status"] for r in rows]


async def _setup(api: httpx.AsyncClient, slack_url: str) -> None:
    plan = {"id": "team", "meters": [{"meter": "api_calls", "included": 10, "thresholds": [80, 100]}]}
    assert (await api.post("/v1/plans", json=plan)).status_code == 201
    start = (date.today() - timedelta(days=40)).isoformat()
    assert (await api.put(f"/v1/subscriptions/{SUBJECT}", json={"plan_id": "team", "start_date": start})
            ).status_code == 200
    assert (await api.put("/v1/usage/slack", json={"webhook_url": slack_url})).status_code == 200


async def test_each_threshold_alerts_once_across_a_restart_and_a_replay(isolated: Settings,
                                                                      db: asyncpg.Connection) -> None:
    settings = metered(isolated).model_copy(update=LOCAL_TARGETS)  # the Slack double listens on loopback
    tenant, admin, writer = await tenant_keys(settings)
    failing_tenant, failing_admin, failing_writer = await tenant_keys(settings)
    at = datetime.now(timezone.utc) - timedelta(minutes=1)
    env = {"TALLY_USAGE_ALERTS_REFRESH_S": "0.5"}
    delivery = {"TALLY_ALERTS_DELIVERY_MAX_ATTEMPTS": "2", "TALLY_ALERTS_DELIVERY_BACKOFF_S": "0.2",
                "TALLY_ALERTS_METRICS_PORT": "0"}
    with recording_server() as slack, start_gateway("gateway", settings) as gw, \
            running("jobs", ["jobs"], settings, **env), running("alerts", ["alerts"], settings, **delivery):
        processor = TallyProcess("processor", ["process"], settings)
        try:
            async with gw.client(admin) as api, gw.client(writer) as writes, \
                    gw.client(failing_admin) as failing_api, gw.client(failing_writer) as failing_writes:
                await _setup(api, f"{slack.url}/hooks/ok")
                await _setup(failing_api, f"{slack.url}/fail")
                for n in range(8):
                    assert (await writes.post("/v1/events", json=_event(n, at))).status_code == 202
                    assert (await failing_writes.post("/v1/events", json=_event(n, at))).status_code == 202

                async def alerted(count: int) -> bool:
                    return len(await _alerts(api)) >= count

                await wait_for(lambda: alerted(1), 60, "the 80% alert")

                processor.kill9()
                processor = TallyProcess("processor", ["process"], settings)
                now = datetime.now(timezone.utc)
                produce(settings, [Envelope(id=f"a-{n}", source="app", type="api.call", subject=SUBJECT, time=at,
                                            received_at=now, data={}, tenant=tenant) for n in range(8)])
                await wait_for(lambda: drained(settings, db), 60, "the replay to be processed")
                await asyncio.sleep(2)  # several alert refreshes
                assert [a["threshold"] for a in await _alerts(api)] == [80]

                # The last two calls are dead-lettered by a processor that refuses their type, then replayed
                # from the dead-letter topic twice by one that accepts it: 100% fires once.
                processor.stop()
                processor = TallyProcess("processor", ["process"], settings, TALLY_ACCEPT_TYPES="llm.*")
                for n in range(8, 10):
                    assert (await writes.post("/v1/events", json=_event(n, at))).status_code == 202
                await wait_for(lambda: drained(settings, db), 60, "the two calls to be dead-lettered")
                assert len(await _alerts(api)) == 1
                processor.stop()
                processor = TallyProcess("processor", ["process"], settings)
                for _ in range(2):
                    code, out = run_tally(["dlq", "replay", "--stage", "validate"], settings)
                    assert code == 0 and "replayed 2/2" in out, out
                    await wait_for(lambda: drained(settings, db), 60, "the replay to be processed")
                await wait_for(lambda: alerted(2), 60, "the 100% alert")
                await asyncio.sleep(2)  # several alert refreshes

                async def slack_done() -> bool:
                    return (await _slack(db, tenant) == ["sent", "sent"]
                            and await _slack(db, failing_tenant) == ["failed"])

                await wait_for(slack_done, 60, "Slack deliveries")
                alerts = await _alerts(api)
                assert [a["threshold"] for a in alerts] == [100, 80]
                assert all(a["alert"].startswith("alert-") for a in alerts)
                read = await api.post(f"/v1/usage/alerts/{alerts[1]['id']}/read")
                assert read.status_code == 200 and read.json()["read"] is True
                assert [a["threshold"] for a in await _alerts(api, unread="true")] == [100]
                failed = await db.fetchval("select d.last_error from alert_deliveries d join alert_transitions t"
                                           " on t.id = d.transition_id where t.tenant = $1", failing_tenant)
                assert "500" in failed
        finally:
            processor.stop()

    sent = [body for path, body in slack.received if path == "/hooks/ok"]
    assert len(sent) == 2
    assert all(b["blocks"][0]["type"] == "header" and "of included api_calls" in b["text"] for b in sent)
    on_topic = [orjson.loads(m.value()) for m in read_topic(settings.kafka_bootstrap, settings.topics.alerts)]
    mine = [a for a in on_topic if a["tenant"] == tenant]
    assert sorted(a["rule"]["id"] for a in mine) == ["usage:api_calls:100", "usage:api_calls:80"]
    assert {a["type"] for a in mine} == {"alert.firing"} and {a["group"]["subject"] for a in mine} == {SUBJECT}
    assert len({a["id"] for a in mine}) == 2
    assert await db.fetchval("select count(*) from usage_alerts where tenant = $1", tenant) == 2

