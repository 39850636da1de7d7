"""Usage links and the usage routes' bodies (security review M2, M3, M4 and lows): minting a link needs a
write scope; a link can be revoked alone, with every link of its key, or by revoking the key; the signing
secret can be replaced without breaking the links of the previous one at once; a tenant has a bounded number
of live links; every usage body is read with a byte limit; the page shows no tenant name nor platform ids."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta

import asyncpg
import httpx
import pytest

from tally.ingest.auth import create_key, revoke_key
from tally.settings import Settings
from tests.gateway.helpers import start_gateway
from tests.metering.helpers import metered
from tally.usage import links

OLD, NEW = "usage-link-secret-one", "usage-link-secret-two"


@pytest.fixture
async def tenant(settings: Settings) -> AsyncIterator[dict]:
    """A tenant with an admin key, a second admin key, a read-only key, and a subscriber `acme`."""
    name = f"links-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(settings.database_url)
    keys = {}
    for label, scopes in (("admin", ["admin:write", "usage:read"]), ("other", ["admin:write"]),
                          ("reader", ["usage:read"])):
        keys[label] = await create_key(conn, name, label, scopes)
    yield {"name": name, "keys": keys, "db": conn}
    await conn.close()


def _client(gw, key: tuple[str, str]) -> httpx.AsyncClient:  # noqa: ANN001
    return gw.client(key[1])


async def _mint(api: httpx.AsyncClient, subject: str = "acme") -> dict:
    answer = await api.post("/v1/usage/links", json={"subject": subject, "ttl_s": 600})
    assert answer.status_code == 201, answer.text
    return answer.json()


async def test_links_need_a_write_scope_and_can_be_revoked(settings: Settings, tenant: dict) -> None:
    with start_gateway("gateway-links", settings, TALLY_USAGE_LINK_SECRET=NEW) as gw:
        async with _client(gw, tenant["keys"]["admin"]) as api, _client(gw, tenant["keys"]["other"]) as other, \
                _client(gw, tenant["keys"]["reader"]) as reader, gw.client() as anyone:
            refused = await reader.post("/v1/usage/links", json={"subject": "acme"})
            one, two = await _mint(api), await _mint(api)
            by_other = [await _mint(other), await _mint(other, "beta")]
            assert {one["key_id"], by_other[0]["key_id"]} == {tenant["keys"]["admin"][0], tenant["keys"]["other"][0]}
            assert (await anyone.get(one["url"])).status_code == 200

            assert (await api.delete(f"/v1/usage/links/{one['id']}")).status_code == 204
            assert (await api.delete(f"/v1/usage/links/{one['id']}")).status_code == 404
            after_one = await anyone.get(one["url"])
            still = await anyone.get(two["url"])

            revoked = await api.delete("/v1/usage/links", params={"key_id": tenant["keys"]["other"][0]})
            after_key = [await anyone.get(link["url"]) for link in by_other]

            assert await revoke_key(tenant["db"], tenant["keys"]["admin"][0])
            after_revoked_key = await anyone.get(two["url"])
    assert refused.status_code == 403
    assert after_one.status_code == 403 and "revoked" in after_one.json()["detail"]
    assert still.status_code == 200
    assert revoked.json() == {"revoked": 2}
    assert [a.status_code for a in after_key] == [403, 403]
    assert after_revoked_key.status_code == 403


async def test_the_link_secret_rotates_without_breaking_every_link_at_once(settings: Settings,
                                                                          tenant: dict) -> None:
    with start_gateway("gateway-links-old", settings, TALLY_USAGE_LINK_SECRET=OLD) as gw:
        async with _client(gw, tenant["keys"]["admin"]) as api:
            old = await _mint(api)
    with start_gateway("gateway-links-rotating", settings, TALLY_USAGE_LINK_SECRET=NEW,
                       TALLY_USAGE_LINK_PREVIOUS_SECRETS=OLD) as gw:
        async with _client(gw, tenant["keys"]["admin"]) as api, gw.client() as anyone:
            new = await _mint(api)
            during = [(await anyone.get(link["url"])).status_code for link in (old, new)]
    with start_gateway("gateway-links-rotated", settings, TALLY_USAGE_LINK_SECRET=NEW) as gw:
        async with gw.client() as anyone:
            after = [await anyone.get(link["url"]) for link in (old, new)]
    assert during == [200, 200]
    assert [a.status_code for a in after] == [403, 200]
    assert "no longer accepted" in after[0].json()["detail"]
    assert old["url"].split("token=")[1].split(".")[0] == links.secret_id(OLD)


async def test_a_tenant_has_a_bounded_number_of_live_links(settings: Settings, tenant: dict) -> None:
    with start_gateway("gateway-links-quota", settings, TALLY_USAGE_LINK_SECRET=NEW,
                       TALLY_USAGE_LINKS_PER_TENANT="2") as gw:
        async with _client(gw, tenant["keys"]["admin"]) as api:
            first, _ = await _mint(api), await _mint(api)
            third = await api.post("/v1/usage/links", json={"subject": "acme"})
            await api.delete(f"/v1/usage/links/{first['id']}")
            again = await api.post("/v1/usage/links", json={"subject": "acme"})
    assert third.status_code == 409 and third.headers["content-type"] == "application/problem+json"
    assert again.status_code == 201


async def test_the_page_shows_no_tenant_name_nor_platform_ids(settings: Settings, tenant: dict) -> None:
    db = tenant["db"]
    with start_gateway("gateway-links-page", metered(settings), TALLY_USAGE_LINK_SECRET=NEW) as gw:
        async with _client(gw, tenant["keys"]["admin"]) as api, gw.client() as anyone:
            plan = {"id": "team", "meters": [{"meter": "api_calls", "included": 5}]}
            assert (await api.post("/v1/plans", json=plan)).status_code == 201
            start = (date.today() - timedelta(days=3)).isoformat()
            assert (await api.put("/v1/subscriptions/acme", json={"plan_id": "team", "start_date": start})
                    ).status_code == 200
            period = (await api.get("/v1/usage", params={"subject": "acme"})).json()
            await db.execute(
                "insert into usage_alerts (tenant, subject, meter, period_label, period_end, threshold, used,"
                " included) values ($1, 'acme', 'api_calls', $2, $3, 80, 4, 5)", tenant["name"],
                date.fromisoformat(period["period_start"][:10]), datetime.fromisoformat(period["period_end"]))
            link = await _mint(api)
            page = await anyone.get(link["url"])
            data = await anyone.get(link["url"].replace("?", "/data?"))
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert data.status_code == 200, data.text
    assert tenant["name"] not in data.text
    [alert] = data.json()["alerts"]
    assert "alert" not in alert and "id" not in alert and alert["threshold"] == 80


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/usage/links"), ("PUT", "/v1/usage/slack"),
                                              ("POST", "/v1/plans"), ("PUT", "/v1/subscriptions/acme")])
async def test_usage_bodies_are_read_with_a_byte_limit(settings: Settings, tenant: dict, method: str,
                                                       path: str) -> None:
    """Security review M3: 413 problem+json, whether the size is declared or the body streams without one."""
    async def stream():  # noqa: ANN202 - no Content-Length: the gateway counts as it reads
        for _ in range(2):
            yield b" " * 48 * 1024

    with start_gateway("gateway-usage-bodies", settings, TALLY_USAGE_LINK_SECRET=NEW) as gw:
        async with _client(gw, tenant["keys"]["admin"]) as api:
            declared = await api.request(method, path, content=b" " * (64 * 1024 + 1),
                                         headers={"content-type": "application/json"})
            streamed = await api.request(method, path, content=stream(), headers={"content-type": "application/json"})
    for answer in (declared, streamed):
        assert answer.status_code == 413, answer.text
        assert answer.headers["content-type"] == "application/problem+json"


async def test_marking_an_alert_read_needs_a_write_scope_and_odd_periods_are_400(settings: Settings,
                                                                                  tenant: dict) -> None:
    with start_gateway("gateway-usage-lows", metered(settings)) as gw:
        async with _client(gw, tenant["keys"]["reader"]) as reader, _client(gw, tenant["keys"]["admin"]) as api:
            read = await reader.post("/v1/usage/alerts/1/read")
            plan = {"id": "team", "meters": [{"meter": "api_calls", "included": 5}]}
            assert (await api.post("/v1/plans", json=plan)).status_code == 201
            assert (await api.put("/v1/subscriptions/far", json={"plan_id": "team", "start_date": "2024-01-01"})
                    ).status_code == 200
            far = [await api.get(route, params={"subject": "far", "period": "9999-12-15"})
                   for route in ("/v1/usage", "/v1/usage/history")]
            huge = await api.post(f"/v1/usage/alerts/{2**64}/read")
    assert read.status_code == 403
    assert [a.status_code for a in far] == [400, 400], [a.text for a in far]
    assert all(a.json()["errors"][0]["field"] == "period" for a in far)
    assert huge.status_code == 404

