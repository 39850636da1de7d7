"""Alert rules through the API and the rules file, against a real gateway and database: CRUD, the 400/422
refusals, tenant isolation, masked credentials, the file's ownership, and /v1/alerts pages."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import orjson
import pytest

from tally.alerts.ledger import digest
from tally.egress import endpoint
from tally.ingest.auth import create_key
from tally.settings import Settings
from tests.gateway.helpers import Gateway, start_gateway
from tests.metering.helpers import run_tally

SLACK = "https://hooks.slack.com/services/T0001/B0001/SlackPathIsTheCredential"
SECRET = "whsec_" + "QWxlcnRSdWxlc1Rlc3RTZWNyZXQ="
RULE = {"id": "checkout-errors", "name": "Checkout errors", "filter": {"service": "checkout", "level": "error"},
        "window": "5m", "comparison": ">", "threshold": 20, "for": "1m",
        "targets": [{"type": "slack", "url": SLACK},
                    {"type": "webhook", "url": "https://ops.example.com/hook?token=QueryToken", "secret": SECRET}]}


@pytest.fixture(scope="module")
def gateway(settings: Settings) -> Iterator[Gateway]:
    with start_gateway("gateway-alerts", settings, TALLY_GATEWAY_RATE_LIMIT_BURST="100000",
                       TALLY_ALERTS_MAX_RULES_PER_TENANT="3") as gw:
        yield gw


async def _tenant(db: asyncpg.Connection) -> tuple[str, str, str]:
    """(tenant, a key that reads and writes rules, a key that only reads them)."""
    tenant = f"alerts-{uuid.uuid4().hex[:8]}"
    _, writer = await create_key(db, tenant, "rules", ["alerts:read", "alerts:write"])
    _, reader = await create_key(db, tenant, "reader", ["alerts:read"])
    return tenant, writer, reader


async def _apply(settings: Settings, path: Path, tenant: str) -> tuple[int, str]:
    """`tally alert-rules apply`: (exit status, output)."""
    return await asyncio.to_thread(run_tally, ["alert-rules", "apply", str(path), "--tenant", tenant], settings)


def _rules_file(tmp_path: Path, *rules: dict) -> Path:
    path = tmp_path / f"rules-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(orjson.dumps({"rules": list(rules)}).decode())  # JSON is YAML
    return path


async def test_a_rule_is_created_read_replaced_and_deleted(gateway: Gateway, db: asyncpg.Connection) -> None:
    _, writer, reader = await _tenant(db)
    async with gateway.client(writer) as client:
        created = await client.post("/v1/alert-rules", json=RULE)
        assert created.status_code == 201, created.text
        assert created.headers["location"] == "/v1/alert-rules/checkout-errors"
        body = created.json()
        assert (body["origin"], body["version"], body["window"], body["for"]) == ("api", 1, 300, 60)
        assert (await client.post("/v1/alert-rules", json=RULE)).status_code == 409
        null_id = await client.put("/v1/alert-rules/checkout-errors", json={**RULE, "id": None})
        assert null_id.status_code == 400, "an id of null is not the path's"
        replaced = await client.put("/v1/alert-rules/checkout-errors",
                                    json={k: v for k, v in RULE.items() if k != "id"} | {"threshold": 5})
        assert replaced.status_code == 200, replaced.text
        assert (replaced.json()["threshold"], replaced.json()["version"]) == ("5", 2)
        other = await client.put("/v1/alert-rules/second", json={**RULE, "id": "second"})
        assert other.status_code == 201
        mismatch = await client.put("/v1/alert-rules/second", json={**RULE, "id": "third"})
        assert mismatch.status_code == 400 and mismatch.json()["errors"][0]["field"] == "id"
    async with gateway.client(reader) as client:
        listed = (await client.get("/v1/alert-rules")).json()["rules"]
        assert [(r["id"], r["threshold"]) for r in listed] == [("checkout-errors", "5"), ("second", "20")]
        assert (await client.get("/v1/alert-rules/second")).json()["name"] == "Checkout errors"
        refused = await client.delete("/v1/alert-rules/second")
        assert refused.status_code == 403 and refused.json()["required_scope"] == "alerts:write"
    async with gateway.client(writer) as client:
        assert (await client.delete("/v1/alert-rules/second")).status_code == 204
        gone = await client.get("/v1/alert-rules/second")
        assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json"
        assert (await client.delete("/v1/alert-rules/second")).status_code == 404
        assert [r["id"] for r in (await client.get("/v1/alert-rules")).json()["rules"]] == ["checkout-errors"]


@pytest.mark.parametrize(("change", "fields"), [
    ({"window": "90s"}, {"(body)"}),
    ({"for": "5 minutes", "threshold": "many"}, {"for", "threshold"}),
    ({"filter": {"level": "loud"}, "targets": [{"type": "webhook", "url": "https://x.example", "secret": "s"}]},
     {"filter.level", "targets.0.webhook.secret"}),
    ({"surprise": 1}, {"surprise"}),
], ids=["window-not-minutes", "duration-and-threshold", "level-and-secret", "unknown-field"])
async def test_an_invalid_rule_is_a_400_naming_each_field(gateway: Gateway, db: asyncpg.Connection, change: dict,
                                                          fields: set[str]) -> None:
    _, writer, _ = await _tenant(db)
    async with gateway.client(writer) as client:
        response = await client.post("/v1/alert-rules", json={**RULE, **change})
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert {e["field"] for e in response.json()["errors"]} == fields
        too_big = await client.post("/v1/alert-rules", content=b'{"name": "' + b"x" * 70_000 + b'"}',
                                    headers={"content-type": "application/json"})
        assert too_big.status_code == 413
        assert (await client.get("/v1/alert-rules")).json()["rules"] == []


@pytest.mark.parametrize(("change", "problem"), [
    ({"filter": {"event_type": "payment.*", "level": "error"}, "measure": {"meter": "event_types"}},
     "meter 'event_types' does not group by 'level'"),
    ({"filter": {"event_type": "order.*"}, "measure": {"meter": "events"}},
     "meter 'events' keeps no minute windows"),
    ({"measure": {"meter": "nope"}}, "no meter 'nope'"),
], ids=["level-on-event-types", "no-minute-windows", "unknown-meter"])
async def test_a_rule_the_meters_cannot_evaluate_is_a_422_naming_the_problem(
        gateway: Gateway, db: asyncpg.Connection, change: dict, problem: str) -> None:
    _, writer, _ = await _tenant(db)
    async with gateway.client(writer) as client:
        for send in (client.post("/v1/alert-rules", json={**RULE, **change}),
                     client.put("/v1/alert-rules/checkout-errors", json={**RULE, **change})):
            response = await send
            assert response.status_code == 422, response.text
            assert any(p.startswith(problem) for p in response.json()["problems"]), response.json()
        assert (await client.get("/v1/alert-rules")).json()["rules"] == []


async def test_another_tenants_rules_are_not_found(gateway: Gateway, db: asyncpg.Connection) -> None:
    tenant, writer, _ = await _tenant(db)
    _, intruder, _ = await _tenant(db)
    async with gateway.client(writer) as client:
        assert (await client.post("/v1/alert-rules", json=RULE)).status_code == 201
    async with gateway.client(intruder) as client:
        assert (await client.get("/v1/alert-rules/checkout-errors")).status_code == 404
        assert (await client.delete("/v1/alert-rules/checkout-errors")).status_code == 404
        assert (await client.get("/v1/alert-rules")).json()["rules"] == []
        # A PUT names a rule of the caller's own: it creates the intruder's, and leaves the other one alone.
        own = await client.put("/v1/alert-rules/checkout-errors", json={**RULE, "threshold": 1})
        assert own.status_code == 201 and own.json()["version"] == 1
    async with gateway.client(writer) as client:
        mine = (await client.get("/v1/alert-rules/checkout-errors")).json()
        assert (mine["threshold"], mine["version"]) == ("20", 1)
    assert await db.fetchval("select count(*) from alert_rules where id = 'checkout-errors' and tenant = $1",
                             tenant) == 1


async def test_credentials_are_masked_wherever_a_rule_is_shown(gateway: Gateway, db: asyncpg.Connection) -> None:
    tenant, writer, _ = await _tenant(db)
    async with gateway.client(writer) as client:
        answers = [await client.post("/v1/alert-rules", json=RULE), await client.get("/v1/alert-rules"),
                   await client.get("/v1/alert-rules/checkout-errors"),
                   await client.put("/v1/alert-rules/checkout-errors", json=RULE)]
    for answer in answers:
        assert answer.status_code in (200, 201)
        for credential in (SECRET, "SlackPathIsTheCredential", "QueryToken"):
            assert credential not in answer.text
    slack, webhook = answers[2].json()["targets"]
    assert slack == {"type": "slack", "url": "https://hooks.slack.com"}
    assert webhook == {"type": "webhook", "url": "https://ops.example.com", "secret": "whsec_…"}
    stored = await db.fetchval("select definition::text from alert_rules where tenant = $1", tenant)
    for credential in (SECRET, SECRET.removeprefix("whsec_"), "SlackPathIsTheCredential", "QueryToken", "/hook"):
        assert credential not in stored  # sealed at rest


async def test_applying_the_same_file_twice_changes_nothing(settings: Settings, db: asyncpg.Connection,
                                                            tmp_path: Path) -> None:
    tenant, _, _ = await _tenant(db)
    path = _rules_file(tmp_path, RULE, {**RULE, "id": "second", "threshold": 0.5})
    first = await _apply(settings, path, tenant)
    assert first[0] == 0 and "2 saved, 0 unchanged, 0 deleted" in first[1], first
    before = await db.fetch("select id, version, updated_at from alert_rules where tenant = $1 order by id", tenant)
    again = await _apply(settings, path, tenant)
    assert again[0] == 0 and "0 saved, 2 unchanged, 0 deleted" in again[1], again
    after = await db.fetch("select id, version, updated_at from alert_rules where tenant = $1 order by id", tenant)
    assert after == before and [r["version"] for r in after] == [1, 1]
    listed = await asyncio.to_thread(run_tally, ["alert-rules", "list", "--tenant", tenant], settings)
    assert [line.split()[:3] for line in listed[1].splitlines()] == [["checkout-errors", "file", "v1"],
                                                                     ["second", "file", "v1"]]


async def test_a_file_with_any_problem_is_refused_whole(settings: Settings, db: asyncpg.Connection,
                                                        tmp_path: Path) -> None:
    tenant, _, _ = await _tenant(db)
    applied = await _apply(settings, _rules_file(tmp_path, RULE), tenant)
    assert applied[0] == 0, applied
    before = await db.fetch("select * from alert_rules where tenant = $1", tenant)
    bad = _rules_file(tmp_path, {**RULE, "threshold": 1}, {**RULE, "id": "fresh", "window": "90s"},
                      {**RULE, "id": "fresh2", "measure": {"meter": "events"}}, {**RULE, "id": "fresh2"})
    code, output = await _apply(settings, bad, tenant)
    assert code == 2, output
    lines = output.splitlines()
    assert any("rules[1] (fresh): (body):" in line and "whole number of minutes" in line for line in lines), output
    assert any("rules[2] (fresh2): meter 'events' keeps no minute windows" in line for line in lines), output
    assert any("rules[3] (fresh2): the id 'fresh2' is given twice" in line for line in lines), output
    assert lines[-1].endswith("refused, nothing applied")
    assert await db.fetch("select * from alert_rules where tenant = $1", tenant) == before


async def test_file_rules_belong_to_the_file(gateway: Gateway, settings: Settings, db: asyncpg.Connection,
                                             tmp_path: Path) -> None:
    tenant, writer, _ = await _tenant(db)
    async with gateway.client(writer) as client:
        assert (await client.post("/v1/alert-rules", json={**RULE, "id": "by-api"})).status_code == 201
    both = _rules_file(tmp_path, RULE, {**RULE, "id": "old"})
    assert (await _apply(settings, both, tenant))[0] == 0
    async with gateway.client(writer) as client:
        assert (await client.get("/v1/alert-rules/old")).json()["origin"] == "file"
        for response in (await client.put("/v1/alert-rules/old", json={**RULE, "id": "old"}),
                         await client.delete("/v1/alert-rules/old"), await client.post("/v1/alert-rules", json=RULE)):
            assert response.status_code == 409, response.text
        assert "rules file" in (await client.delete("/v1/alert-rules/old")).json()["detail"]
    clash = _rules_file(tmp_path, RULE, {**RULE, "id": "by-api"})
    code, output = await _apply(settings, clash, tenant)
    assert code == 2 and "by-api: a rule made through the API has this id" in output, output
    one = _rules_file(tmp_path, RULE)
    code, output = await _apply(settings, one, tenant)
    assert code == 0 and "deleted old" in output, output
    rows = await db.fetch("select id, origin from alert_rules where tenant = $1 order by id", tenant)
    assert [(r["id"], r["origin"]) for r in rows] == [("by-api", "api"), ("checkout-errors", "file")]


async def _transitions(db: asyncpg.Connection, tenant: str, n: int) -> list[int]:
    """`n` transitions of two rules, alternately firing and resolved, one minute apart; a delivery to Slack each."""
    start = datetime.now(timezone.utc) - timedelta(days=1)
    rows = [(tenant, f"rule-{i % 2}", f"Rule {i % 2}", "firing" if i % 4 < 2 else "resolved",
             start + timedelta(minutes=i)) for i in range(n)]
    ids = [await db.fetchval(
        "insert into alert_transitions (tenant, rule_id, rule_name, group_key, grp, kind, value, threshold, comparison,"
        " window_s, at, fired_at) values ($1, $2, $3, '{}', '{}', $4, 3, 1, '>', 300, $5, $5) returning id", *row)
        for row in rows]
    await db.executemany("insert into alert_deliveries (tenant, transition_id, target, kind, endpoint, target_digest,"
                         " status, attempts, sent_at) values ($1, $2, 0, 'slack', $3, $4, 'sent', 1, now())",
                         [(tenant, i, endpoint(SLACK), digest("slack", SLACK)) for i in ids])
    return ids


async def test_alerts_are_paged_newest_first_each_seen_once(gateway: Gateway, db: asyncpg.Connection) -> None:
    tenant, _, reader = await _tenant(db)
    _, _, other_reader = await _tenant(db)
    ids = await _transitions(db, tenant, 250)
    await _transitions(db, f"other-{tenant}", 5)
    seen: list[dict] = []
    async with gateway.client(reader) as client:
        response = await client.get("/v1/alerts", params={"limit": 40})
        pages = [response]
        while response.json()["next"]:
            response = await client.get(response.json()["next"])
            assert response.status_code == 200, response.text
            pages.append(response)
        firing = await client.get("/v1/alerts", params={"status": "firing", "rule_id": "rule-1", "limit": 500})
        assert (await client.get("/v1/alerts", params={"status": "pending"})).status_code == 400
        assert (await client.get("/v1/alerts", params={"cursor": "made.up"})).status_code == 400
    for page in pages:
        seen += page.json()["alerts"]
    assert len(pages) == 7
    assert [a["id"] for a in seen] == [f"alert-{i}" for i in reversed(ids)]
    assert {a["tenant"] for a in seen} == {tenant}
    assert seen[0]["deliveries"] == [{"target": 0, "kind": "slack", "url": "https://hooks.slack.com",
                                      "status": "sent", "attempts": 1, "last_status": None, "last_error": None,
                                      "sent_at": seen[0]["deliveries"][0]["sent_at"]}]
    assert "SlackPathIsTheCredential" not in "".join(page.text for page in pages)
    assert [a["id"] for a in firing.json()["alerts"]] == [f"alert-{i}" for n, i in reversed(list(enumerate(ids)))
                                                          if n % 2 == 1 and n % 4 < 2]
    async with gateway.client(other_reader) as client:
        assert (await client.get("/v1/alerts")).json() == {"alerts": [], "next": None}
        stolen = await client.get(pages[0].json()["next"])
        assert stolen.status_code == 400 and stolen.json()["title"] == "Invalid cursor"
    async with gateway.client(reader) as client:
        other_filters = await client.get(pages[0].json()["next"] + "&status=firing")
        assert other_filters.status_code == 400


async def test_active_lists_the_groups_firing_now_for_the_tenant_only(gateway: Gateway, db: asyncpg.Connection) -> None:
    tenant, writer, reader = await _tenant(db)
    other, _, other_reader = await _tenant(db)
    async with gateway.client(writer) as client:
        assert (await client.post("/v1/alert-rules", json=RULE)).status_code == 201
    fired = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    await db.executemany(
        "insert into alert_states (tenant, rule_id, group_key, grp, status, pending_since, fired_at)"
        " values ($1, $2, $3, $4::jsonb, $5, $6, $7)",
        [(tenant, "checkout-errors", group, group, status, since, at) for group, status, since, at in (
            ('{"service": "checkout"}', "firing", fired - timedelta(minutes=1), fired),
            ('{"service": "cart"}', "pending", fired, None))] + [(other, "checkout-errors", "{}", "{}", "firing", fired,
                                                                    fired)])
    async with gateway.client(reader) as client:
        active = (await client.get("/v1/alerts/active")).json()["active"]
    assert active == [{"rule": {"id": "checkout-errors", "name": "Checkout errors"}, "group": {"service": "checkout"},
                       "breaching_since": "2026-11-01T11:59:00+00:00", "fired_at": "2026-11-01T12:00:00+00:00"}]
    async with gateway.client(other_reader) as client:
        assert [a["rule"] for a in (await client.get("/v1/alerts/active")).json()["active"]] == [
            {"id": "checkout-errors", "name": None}]


@pytest.mark.parametrize(("target", "field"), [
    ({"type": "webhook", "url": "http://127.0.0.1:8080/v1/alert-rules", "secret": SECRET}, "targets[0].url"),
    ({"type": "webhook", "url": "http://169.254.169.254/latest/meta-data/", "secret": SECRET}, "targets[0].url"),
    ({"type": "webhook", "url": "http://localhost:1/", "secret": SECRET}, "targets[0].url"),
    ({"type": "slack", "url": "http://127.0.0.1:9104/"}, "targets[0].url"),
    ({"type": "slack", "url": "https://hooks.evil.example/services/x"}, "targets[0].url"),
])
async def test_a_target_a_tenant_may_not_call_is_refused_naming_it(gateway: Gateway, db: asyncpg.Connection,
                                                                   target: dict, field: str) -> None:
    """Security review H2: the review's probe rule is refused when saved (the default allows public addresses
    and Slack's hook host only)."""
    _, writer, _ = await _tenant(db)
    async with gateway.client(writer) as client:
        answer = await client.put("/v1/alert-rules/ssrf", json={**RULE, "id": "ssrf", "targets": [target]})
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in answer.json()["errors"]] == [field]


async def test_rules_and_targets_per_tenant_are_bounded(gateway: Gateway, db: asyncpg.Connection) -> None:
    """Security review M4: the gateway allows 3 rules per tenant here; 5 targets per rule and `every` >= 5s."""
    _, writer, _ = await _tenant(db)
    hooks = [{"type": "webhook", "url": f"https://ops.example.com/{n}", "secret": SECRET} for n in range(6)]
    async with gateway.client(writer) as client:
        many = await client.post("/v1/alert-rules", json={**RULE, "targets": hooks})
        assert many.status_code == 422 and many.json()["errors"][0]["field"] == "targets", many.text
        often = await client.post("/v1/alert-rules", json={**RULE, "every": "1s"})
        assert often.status_code == 422 and often.json()["errors"][0]["field"] == "every", often.text
        for n in range(3):
            assert (await client.post("/v1/alert-rules", json={**RULE, "id": f"r{n}"})).status_code == 201
        for over in (await client.post("/v1/alert-rules", json={**RULE, "id": "r3"}),
                     await client.put("/v1/alert-rules/r3", json=RULE | {"id": "r3"})):
            assert over.status_code == 422 and over.json()["title"] == "Rule quota reached", over.text
        assert (await client.put("/v1/alert-rules/r0", json={**RULE, "id": "r0", "threshold": 1})).status_code == 200


async def test_the_usage_slack_url_is_checked_sealed_and_masked(gateway: Gateway, db: asyncpg.Connection) -> None:
    """Security review H1: PUT /v1/usage/slack checks the URL as `tally alerts` does before each delivery."""
    tenant = f"usage-{uuid.uuid4().hex[:8]}"
    _, admin = await create_key(db, tenant, "admin", ["admin:write"])
    async with gateway.client(admin) as client:
        for url in ("http://", "http://a b", "https://hooks.slack.com/" + "a" * 2100, "http://127.0.0.1:9104/",
                    "https://evil.example/services/x", 7):
            refused = await client.put("/v1/usage/slack", json={"webhook_url": url})
            assert refused.status_code == 422, (url, refused.text)
            assert refused.json()["errors"][0]["field"] == "webhook_url"
        for body in ([None, None], {}, {"url": SLACK}):
            assert (await client.put("/v1/usage/slack", json=body)).status_code == 400
        assert await db.fetchval("select count(*) from usage_settings where tenant = $1", tenant) == 0
        taken = await client.put("/v1/usage/slack", json={"webhook_url": SLACK})
        assert taken.status_code == 200 and taken.json() == {"webhook_url": "https://hooks.slack.com"}
    stored = await db.fetchval("select slack_webhook_url from usage_settings where tenant = $1", tenant)
    assert stored.startswith("sealed:") and "SlackPathIsTheCredential" not in stored
