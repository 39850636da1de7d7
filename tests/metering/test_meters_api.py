"""A tenant's meters as resources (issue 21, ADR 0140/0141), against a real gateway and PostgreSQL: create, list,
read, change and retire through /v1/meters; a change to what is counted is a new version with its backfill, a
new name is not, the same meter again changes nothing; tenants never see each other's meters; scopes mean what
they say; refusals name the field; a meter a plan or alert rule reads is not retired; a plan naming a tenant meter
that cannot be billed is refused with the reason; `tally meters apply` and `list`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from tally.ingest.auth import create_key
from tally.settings import Settings
from tests.gateway.helpers import Gateway, start_gateway
from tests.metering.helpers import METERS, run_tally

CALLS = {"slug": "calls", "event_type": "api.call", "windows": ["minute", "hour", "day"]}
ALL = ["meters:read", "meters:admin", "admin:write", "usage:read", "alerts:read", "alerts:write"]


@pytest.fixture(scope="module")
def gateway(settings: Settings) -> Iterator[Gateway]:
    deployed = settings.model_copy(update={"meters": METERS})  # api_calls and tokens for every tenant
    with start_gateway("gateway-meters", deployed, TALLY_GATEWAY_RATE_LIMIT_BURST="100000",
                       TALLY_METERS_MAX_PER_TENANT="4") as gw:
        yield gw


async def _key(db: asyncpg.Connection, tenant: str, scopes: list[str]) -> str:
    return (await create_key(db, tenant, "k", scopes))[1]


async def _tenant(db: asyncpg.Connection) -> tuple[str, str]:
    tenant = f"meters-{uuid.uuid4().hex[:8]}"
    return tenant, await _key(db, tenant, ALL)


async def _versions(db: asyncpg.Connection, tenant: str, slug: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "select v.version, v.definition, v.name, b.state from meter_versions v left join meter_backfills b"
        " on b.tenant = v.tenant and b.version_id = v.id where v.tenant = $1 and v.slug = $2 order by v.version",
        tenant, slug)


async def test_a_meter_is_created_versioned_renamed_and_retired(gateway: Gateway, db: asyncpg.Connection) -> None:
    tenant, key = await _tenant(db)
    async with gateway.client(key) as api:
        created = await api.post("/v1/meters", json={**CALLS, "name": "API calls"})
        again = await api.post("/v1/meters", json=CALLS)
        renamed = await api.put("/v1/meters/calls", json={**CALLS, "name": "Calls", "description": "every call"})
        revision = await db.fetchval("select revision from meter_catalog")
        same = await api.put("/v1/meters/calls", json={**CALLS, "name": "Calls", "description": "every call"})
        unmoved = await db.fetchval("select revision from meter_catalog")
        changed = await api.put("/v1/meters/calls", json={**CALLS, "event_type": "api.*", "name": "Calls",
                                                          "description": "every call"})
        listed = (await api.get("/v1/meters")).json()["meters"]
        one = (await api.get("/v1/meters/calls")).json()
        retired = await api.delete("/v1/meters/calls")
        gone = await api.get("/v1/meters/calls")
        listed_after = (await api.get("/v1/meters")).json()["meters"]
        retired_again = await api.delete("/v1/meters/calls")
        revived = await api.post("/v1/meters", json=CALLS)

    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/v1/meters/calls"
    body = created.json()
    assert (body["version"], body["counter"], body["name"], body["event_type"]) == (1, "calls", "API calls", "api.call")
    assert body["backfill"]["state"] == "waiting" and body["created_at"]
    assert again.status_code == 409, again.text
    assert renamed.status_code == 200 and renamed.json()["version"] == 1 and renamed.json()["name"] == "Calls"
    assert same.status_code == 200 and same.json()["version"] == 1
    assert unmoved == revision  # the same meter again wrote nothing
    assert changed.status_code == 200, changed.text
    assert (changed.json()["version"], changed.json()["counter"]) == (2, "calls@2")
    assert [m["slug"] for m in listed] == ["calls"] and listed[0]["version"] == 2
    assert [v["counter"] for v in one["versions"]] == ["calls", "calls@2"]
    assert one["versions"][0]["event_type"] == "api.call" and one["event_type"] == "api.*"
    assert retired.status_code == 204 and gone.status_code == 404 and listed_after == []
    assert retired_again.status_code == 404
    assert revived.status_code == 201 and revived.json()["counter"] == "calls@4", revived.text

    rows = await _versions(db, tenant, "calls")
    assert [(r["version"], r["definition"] is None, r["state"]) for r in rows] == [
        (1, False, "waiting"), (2, False, "waiting"), (3, True, None), (4, False, "waiting")]
    assert rows[0]["name"] == "Calls"  # renamed in place, not a version


async def test_a_tenant_cannot_read_change_or_delete_another_tenants_meter(gateway: Gateway,
                                                                           db: asyncpg.Connection) -> None:
    tenant_a, key_a = await _tenant(db)
    _, key_b = await _tenant(db)
    async with gateway.client(key_a) as a, gateway.client(key_b) as b:
        assert (await a.post("/v1/meters", json=CALLS)).status_code == 201
        read = await b.get("/v1/meters/calls")
        listed = (await b.get("/v1/meters")).json()["meters"]
        deleted = await b.delete("/v1/meters/calls")
        put = await b.put("/v1/meters/calls", json={**CALLS, "event_type": "b.*"})  # B's own meter
        mine = (await a.get("/v1/meters/calls")).json()
    assert read.status_code == 404 and deleted.status_code == 404 and listed == []
    assert put.status_code == 201 and put.json()["version"] == 1
    assert mine["event_type"] == "api.call" and len(mine["versions"]) == 1
    assert [r["version"] for r in await _versions(db, tenant_a, "calls")] == [1]


async def test_scopes_mean_what_they_say(gateway: Gateway, db: asyncpg.Connection) -> None:
    tenant, admin = await _tenant(db)
    reader = await _key(db, tenant, ["meters:read"])
    writer = await _key(db, tenant, ["meters:admin"])
    other = await _key(db, tenant, ["admin:write", "usage:read"])
    async with gateway.client(admin) as api, gateway.client(reader) as r, gateway.client(writer) as w, \
            gateway.client(other) as o:
        assert (await api.post("/v1/meters", json=CALLS)).status_code == 201
        answers = {
            "read post": await r.post("/v1/meters", json={**CALLS, "slug": "more"}),
            "read put": await r.put("/v1/meters/calls", json=CALLS),
            "read delete": await r.delete("/v1/meters/calls"),
            "admin get": await w.get("/v1/meters/calls"),
            "other list": await o.get("/v1/meters"),
            "other post": await o.post("/v1/meters", json={**CALLS, "slug": "more"}),
        }
        allowed = await r.get("/v1/meters/calls")
    assert {what: a.status_code for what, a in answers.items()} == dict.fromkeys(answers, 403)
    assert allowed.status_code == 200


@pytest.mark.parametrize(("body", "status", "field", "words"), [
    ({"slug": "tokens_sum", "aggregation": "SUM"}, 422, "value_path", "needs a value_path"),
    ({"slug": "calls", "value_path": "data.n"}, 422, "value_path", "COUNT takes no value_path"),
    ({"slug": "gb", "aggregation": "WEIGHTED_SUM", "value_path": "data.gb"}, 422, "unit", "unit"),
    ({"slug": "calls", "windows": ["hour", "hour"]}, 422, "windows", "listed twice"),
    ({"slug": "events"}, 422, "slug", "deploy-time"),
    ({"slug": "logs"}, 422, "slug", "deploy-time"),
    ({"slug": "api_calls"}, 422, "slug", "deploy-time"),  # from TALLY_METERS
    ({"slug": "calls", "version": 2}, 400, "version", "not accepted"),
    ({"slug": "Calls@2"}, 400, "slug", "pattern"),
    ({"slug": "calls", "windows": ["week"]}, 400, "windows.0", "minute"),
    ({"slug": "calls", "colour": "red"}, 400, "colour", "not permitted"),
])
async def test_a_refusal_names_the_field(gateway: Gateway, db: asyncpg.Connection, body: dict, status: int,
                                         field: str, words: str) -> None:
    _, key = await _tenant(db)
    async with gateway.client(key) as api:
        answer = await api.post("/v1/meters", json=body)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert any(e["field"] == field and words in e["message"] for e in answer.json()["errors"]), answer.text


async def test_meters_are_bounded_per_tenant_and_in_bytes(gateway: Gateway, db: asyncpg.Connection) -> None:
    _, key = await _tenant(db)
    async with gateway.client(key) as api:
        made = [await api.post("/v1/meters", json={**CALLS, "slug": f"m{i}"}) for i in range(5)]
        retired = await api.delete("/v1/meters/m0")
        after = await api.post("/v1/meters", json={**CALLS, "slug": "m4"})
        huge = await api.post("/v1/meters", json={**CALLS, "description": "x" * 20_000})
    assert [a.status_code for a in made] == [201, 201, 201, 201, 409], made[4].text
    assert "TALLY_METERS_MAX_PER_TENANT" in made[4].json()["detail"]
    assert retired.status_code == 204 and after.status_code == 201  # a retired meter frees its place
    assert huge.status_code == 413


async def test_a_meter_a_plan_or_rule_reads_is_not_retired_nor_made_unreadable(gateway: Gateway,
                                                                               db: asyncpg.Connection) -> None:
    _, key = await _tenant(db)
    rule = {"id": "many-calls", "name": "many calls", "measure": {"meter": "calls"}, "comparison": ">",
            "threshold": 100}
    async with gateway.client(key) as api:
        assert (await api.post("/v1/meters", json=CALLS)).status_code == 201
        plan = await api.post("/v1/plans", json={"id": "pro", "meters": [{"meter": "calls", "included": 10}]})
        alert = await api.post("/v1/alert-rules", json=rule)
        refused = await api.delete("/v1/meters/calls")
        grouped = await api.put("/v1/meters/calls", json={**CALLS, "group_by": {"route": "data.route"}})
        hourly = await api.put("/v1/meters/calls", json={**CALLS, "windows": ["hour"]})
        assert (await api.post("/v1/plans", json={"id": "pro", "meters": [{"meter": "api_calls", "included": 1}]})
                ).status_code == 201
        assert (await api.delete("/v1/alert-rules/many-calls")).status_code == 204
        allowed = await api.delete("/v1/meters/calls")
    assert plan.status_code == 201, plan.text  # a tenant's own meter is billable once created
    assert alert.status_code == 201, alert.text
    assert refused.status_code == 422, refused.text
    messages = [e["message"] for e in refused.json()["errors"]]
    assert any("plan 'pro'" in m for m in messages) and any("alert rule 'many-calls'" in m for m in messages), messages
    assert grouped.status_code == 422 and grouped.json()["errors"][0]["field"] == "group_by", grouped.text
    assert "plan 'pro'" in grouped.json()["errors"][0]["message"]
    assert hourly.status_code == 422 and hourly.json()["errors"][0]["field"] == "windows", hourly.text
    assert "alert rule 'many-calls'" in hourly.json()["errors"][0]["message"]
    assert allowed.status_code == 204, allowed.text


async def test_a_plan_naming_a_tenant_meter_that_cannot_be_billed_is_refused_with_the_reason(
        gateway: Gateway, db: asyncpg.Connection) -> None:
    _, key = await _tenant(db)
    _, other = await _tenant(db)
    cases = {"visitors": ({"aggregation": "UNIQUE_COUNT", "value_path": "data.user"}, "UNIQUE_COUNT"),
             "daily": ({"windows": ["day"]}, "no hour window"),
             "routes": ({"group_by": {"route": "data.route"}}, "group_by"),
             "tenant_wide": ({"per_subject": False}, "not per subject")}
    async with gateway.client(key) as api, gateway.client(other) as elsewhere:
        assert (await elsewhere.post("/v1/meters", json={"slug": "theirs"})).status_code == 201
        for slug, (fields, _) in cases.items():
            assert (await api.post("/v1/meters", json={"slug": slug, **fields})).status_code == 201
        answers = {slug: await api.post("/v1/plans", json={"id": "p", "meters": [{"meter": slug, "included": 1}]})
                   for slug in [*cases, "theirs"]}
        rule = await api.post("/v1/alert-rules", json={"id": "r", "name": "r", "measure": {"meter": "daily"},
                                                        "comparison": ">", "threshold": 1})
    for slug, answer in answers.items():
        assert answer.status_code == 422, answer.text
        [error] = answer.json()["errors"]
        words = cases[slug][1] if slug in cases else "no meter 'theirs'"
        assert error["field"] == "meters.0.meter" and words in error["message"], answer.text
    assert rule.status_code == 422 and "keeps no minute windows" in rule.text, rule.text


async def test_meters_apply_creates_and_versions_each_meter_of_a_file(settings: Settings, db: asyncpg.Connection,
                                                                      tmp_path: Path) -> None:
    tenant = f"meters-cli-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "meters.yaml"

    async def apply(*meters: dict) -> tuple[int, str]:
        path.write_text(orjson.dumps({"meters": list(meters)}).decode())  # JSON is YAML
        return await asyncio.to_thread(run_tally, ["meters", "apply", str(path), "--tenant", tenant], settings)

    tokens = {"slug": "tokens_used", "event_type": "llm.*", "aggregation": "SUM", "value_path": "data.tokens"}
    first = await apply(CALLS, tokens)
    second = await apply({**CALLS, "name": "Calls"}, {**tokens, "event_type": "llm.call"})
    bad = await apply({**CALLS, "event_type": "x"}, {"slug": "sum", "aggregation": "SUM"}, {"slug": "logs"})
    listed = await asyncio.to_thread(run_tally, ["meters", "list", "--tenant", tenant], settings)
    assert first[0] == 0 and "created   calls" in first[1] and "created   tokens_used" in first[1], first[1]
    assert second[0] == 0 and "renamed   calls" in second[1] and "versioned tokens_used" in second[1], second[1]
    assert bad[0] == 2 and "meters[1].value_path" in bad[1] and "meters[2].slug" in bad[1], bad[1]
    assert [r["version"] for r in await _versions(db, tenant, "calls")] == [1]  # refused whole: nothing applied
    assert [r["state"] for r in await _versions(db, tenant, "tokens_used")] == ["waiting", "waiting"]
    assert listed[0] == 0 and "tokens_used@2" in listed[1] and "calls" in listed[1], listed[1]
