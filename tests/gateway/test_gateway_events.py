"""Single events, batches and logs through a real gateway into real Kafka; every bad input gets its problem."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import httpx
import orjson
import pytest

from tests.gateway.helpers import Gateway, event, for_tenant


@pytest.fixture
def gateway(intake_gateway: Gateway) -> Gateway:
    """Every test here runs over both intake adapters, plain ASGI and Starlette (ADR 121)."""
    return intake_gateway


PROBLEM = "application/problem+json"


async def test_an_accepted_event_is_in_kafka_with_key_headers_and_the_keys_tenant(
    gateway: Gateway, api_key: tuple[str, str]
) -> None:
    tenant, secret = api_key
    body = event(id="evt-tenant", subject="customer-9")  # a tenant in the body is refused (hostile input tests)
    async with gateway.client(secret) as client:
        response = await client.post("/v1/events", json=body, headers={"content-type": "application/cloudevents+json"})
    assert response.status_code == 202, response.text
    assert response.json() == {"id": "evt-tenant", "status": "accepted"}

    [message] = [m for m in gateway.messages() if orjson.loads(m.value())["id"] == "evt-tenant"
                 and orjson.loads(m.value())["tenant"] == tenant]
    value = orjson.loads(message.value())
    assert value["tenant"] == tenant
    assert value["subject"] == "customer-9" and value["data"] == {"n": 1}
    assert value["received_at"] != "2000-01-01T00:00:00Z"
    assert message.key() == f"{tenant}/customer-9".encode()
    headers = dict(message.headers())
    assert headers["tenant"] == tenant.encode()
    assert headers["content-type"] == b"application/cloudevents+json"
    assert headers["schema-version"] == b"1"
    assert datetime.fromisoformat(headers["received-at"].decode()).tzinfo is not None


async def test_binary_mode_takes_attributes_from_ce_headers(gateway: Gateway, api_key: tuple[str, str]) -> None:
    tenant, secret = api_key
    headers = {"ce-specversion": "1.0", "ce-id": "bin-1", "ce-source": "sensors%2Fkitchen", "ce-type": "temp.read",
               "ce-subject": "s1", "content-type": "application/json"}
    async with gateway.client(secret) as client:
        response = await client.post("/v1/events", content=b'{"celsius": 21.5}', headers=headers)
        text = await client.post("/v1/events", content=b"plain words",
                                 headers={**headers, "ce-id": "bin-2", "content-type": "text/plain"})
    assert response.status_code == 202, response.text
    assert text.status_code == 202, text.text
    values = {v["id"]: v for v in for_tenant(gateway.messages(), tenant)}
    assert values["bin-1"]["source"] == "sensors/kitchen"
    assert values["bin-1"]["data"] == {"celsius": 21.5}
    assert values["bin-2"]["data"] == "plain words"


@pytest.mark.parametrize(("body", "headers", "status", "field"), [
    (b'{"id": "x", "source": "s", "type": ', {"content-type": "application/json"}, 400, "(body)"),
    (b"", {"content-type": "application/json"}, 400, "(body)"),
    (b'[1, 2]', {"content-type": "application/json"}, 400, "(body)"),
    (b'{"source": "s", "type": "t"}', {"content-type": "application/json"}, 400, "id"),
    (orjson.dumps({"id": "x" * 257, "source": "s", "type": "t"}), {"content-type": "application/json"}, 400, "id"),
    (orjson.dumps({"id": "", "source": "s", "type": "t"}), {"content-type": "application/json"}, 400, "id"),
    (orjson.dumps({"id": "x", "source": "s", "type": "t", "specversion": "0.3"}),
     {"content-type": "application/json"}, 400, "specversion"),
    (orjson.dumps({"id": "x", "source": "s", "type": "t", "time": "2024-01-01T00:00:00"}),
     {"content-type": "application/json"}, 400, "time"),
    (orjson.dumps({"id": "x", "source": "s", "type": "t",
                   "time": (datetime.now(timezone.utc) + timedelta(days=30)).isoformat()}),
     {"content-type": "application/json"}, 400, "time"),
    (orjson.dumps({"id": "x", "source": "s", "type": "t", "time": "1000-01-01T00:00:00Z"}),
     {"content-type": "application/json"}, 400, "time"),
    (b'{"id": "x", "source": "s", "type": "t", "data": NaN}', {"content-type": "application/json"}, 400, "(body)"),
    (b'{"id": "\\ud800", "source": "s", "type": "t"}', {"content-type": "application/json"}, 400, "(body)"),
    (b'{"id": "x", "source": "s", "type": "t"}', {"content-type": "text/plain"}, 415, None),
    (b'{"id": "x", "source": "s", "type": "t"}', {}, 415, None),
    (b"\x00\x01", {"content-type": "application/octet-stream", "ce-specversion": "1.0", "ce-id": "x",
                   "ce-source": "s", "ce-type": "t"}, 415, None),
    (b'{"x": 1}', {"content-type": "application/json", "ce-specversion": "1.0", "ce-source": "s", "ce-type": "t"},
     400, "id"),
    (b'{"id": "x", "source": "s", "type": "t"}', {"content-type": "application/json", "idempotency-key": "a b"},
     400, "Idempotency-Key"),
])
async def test_bad_input_gets_the_right_problem(
    gateway: Gateway, api_key: tuple[str, str], body: bytes, headers: dict[str, str], status: int, field: str | None
) -> None:
    _, secret = api_key
    async with gateway.client(secret) as client:
        response = await client.post("/v1/events", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status and problem["title"]
    if field is not None:
        assert field in [e["field"] for e in problem["errors"]], problem


async def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(
    gateway: Gateway, api_key: tuple[str, str]
) -> None:
    _, secret = api_key
    limit = gateway.settings.gateway_max_event_bytes
    big = orjson.dumps(event(data="x" * (limit + 10)))

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the gateway must count while streaming
        for start in range(0, len(big), 16384):
            yield big[start:start + 16384]

    async with gateway.client(secret) as client:
        declared = await client.post("/v1/events", content=big, headers={"content-type": "application/json"})
        streamed = await client.post("/v1/events", content=chunks(), headers={"content-type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["max_bytes"] == limit

    # A declared size over the limit is answered at once, though the body never comes.
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 99999999\r\n\r\n{".encode())
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413"), status_line


async def test_auth_problems(gateway: Gateway, new_key) -> None:  # noqa: ANN001
    _, logs_only = await new_key(["logs:write"])
    async with gateway.client() as client:
        missing = await client.post("/v1/events", json=event())
        basic = await client.post("/v1/events", json=event(), headers={"Authorization": "Basic dXNlcjpwYXNz"})
        unknown = await client.post("/v1/events", json=event(), headers={"Authorization": "Bearer tly_unknown"})
        scope = await client.post("/v1/events", json=event(), headers={"Authorization": f"Bearer {logs_only}"})
    for response in (missing, basic, unknown):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.headers["content-type"] == PROBLEM
    assert scope.status_code == 403
    assert scope.json()["required_scope"] == "events:write"


async def test_unknown_routes_and_methods_are_problems_too(gateway: Gateway) -> None:
    async with gateway.client() as client:
        missing = await client.get("/v2/nothing")
        method = await client.delete("/v1/events")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    assert method.status_code == 405 and method.headers["content-type"] == PROBLEM
    assert "POST" in method.headers["allow"]


async def test_a_batch_accepts_valid_items_and_reports_each_rejected_one(
    gateway: Gateway, api_key: tuple[str, str]
) -> None:
    tenant, secret = api_key
    items = [event(id="b-0"), {"id": "b-1", "source": "s"}, event(id="b-2"), "not an object",
             event(id="b-4", time="2999-01-01T00:00:00Z"), event(id="b-0")]
    async with gateway.client(secret) as client:
        response = await client.post("/v1/events/batch", content=orjson.dumps(items),
                                     headers={"content-type": "application/cloudevents-batch+json"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["accepted"], body["rejected"], body["failed"]) == (3, 3, 0)
    statuses = [(r["index"], r["status"]) for r in body["results"]]
    assert statuses == [(0, "accepted"), (1, "rejected"), (2, "accepted"), (3, "rejected"), (4, "rejected"),
                        (5, "accepted")]
    assert "type" in [e["field"] for e in body["results"][1]["problem"]["errors"]]
    assert body["results"][4]["problem"]["errors"][0]["field"] == "time"
    ids = sorted(v["id"] for v in for_tenant(gateway.messages(), tenant))
    assert ids == ["b-0", "b-0", "b-2"]  # the duplicate is the processors' to drop, by (tenant, source, id)


async def test_batch_limits_and_all_invalid(gateway: Gateway, api_key: tuple[str, str]) -> None:
    _, secret = api_key
    too_many = [event(id=f"m-{i}") for i in range(gateway.settings.gateway_max_batch_items + 1)]
    async with gateway.client(secret) as client:
        long = await client.post("/v1/events/batch", json=too_many)
        invalid = await client.post("/v1/events/batch", json=[{"id": "x"}, 3])
        empty = await client.post("/v1/events/batch", json=[])
        single = await client.post("/v1/events/batch", json=event())
        wrong_type = await client.post("/v1/events/batch", content=b"[]", headers={"content-type": "text/csv"})
    assert long.status_code == 413 and long.json()["max_items"] == gateway.settings.gateway_max_batch_items
    assert invalid.status_code == 400 and invalid.json()["rejected"] == 2
    assert empty.status_code == 400 and single.status_code == 400
    assert wrong_type.status_code == 415


async def test_logs_one_many_and_ndjson_become_log_events(gateway: Gateway, api_key: tuple[str, str]) -> None:
    tenant, secret = api_key
    now = datetime.now(timezone.utc).isoformat()
    one = {"service": "api", "level": "ERROR", "message": "boom", "time": now, "trace_id": "a" * 32,
           "attributes": {"path": "/x"}}
    many = [{"service": "worker", "message": "started"}, {"service": "worker", "level": "loud", "message": "?"}]
    ndjson = b'{"service": "edge", "level": "warning", "message": "slow", "id": "log-7"}\n\n{"service": "edge"}\n'
    async with gateway.client(secret) as client:
        single = await client.post("/v1/logs", json=one)
        array = await client.post("/v1/logs", json=many)
        lines = await client.post("/v1/logs", content=ndjson, headers={"content-type": "application/x-ndjson"})
        again = await client.post("/v1/logs", json=one)
    assert single.status_code == 202, single.text
    assert array.status_code == 202 and array.json()["rejected"] == 1
    assert array.json()["results"][1]["problem"]["errors"][0]["field"] == "level"
    assert lines.status_code == 202 and [r["status"] for r in lines.json()["results"]] == ["accepted", "rejected"]
    assert again.json()["results"][0]["id"] == single.json()["results"][0]["id"]  # same record, same id
    values = for_tenant(gateway.messages(), tenant)
    assert {v["type"] for v in values} == {"tally.log"}
    error = next(v for v in values if v["subject"] == "api")
    assert error["source"] == "logs/api" and error["data"]["level"] == "error"
    assert error["data"]["attributes"] == {"path": "/x"} and error["data"]["trace_id"] == "a" * 32
    assert next(v for v in values if v["subject"] == "edge")["id"] == "log-7"


async def test_health_readiness_metrics_and_docs(gateway: Gateway, api_key: tuple[str, str]) -> None:
    _, secret = api_key
    async with gateway.client(secret) as client:
        await client.post("/v1/events", json=event())
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        metrics = await client.get("/metrics")
        spec = await client.get("/openapi.json")
        docs = await client.get("/docs")
        assets = [await client.get(f"/docs/{name}") for name in ("swagger-ui-bundle.js", "swagger-ui.css", "init.js")]
        unknown_asset = await client.get("/docs/other.js")
    assert health.status_code == 200
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "kafka": "up", "redis": "up"}
    text = metrics.text
    for name in ("tally_gateway_requests_total", "tally_gateway_request_seconds_bucket",
                 "tally_gateway_events_accepted_total", "tally_gateway_produce_seconds_bucket",
                 "tally_gateway_producer_queue_depth", "tally_gateway_events_rejected_total"):
        assert name in text, name
    assert 'route="/v1/events",status="202"' in text
    assert spec.json()["openapi"].startswith("3.1") and "/v1/events/batch" in spec.json()["paths"]
    assert docs.status_code == 200 and "/openapi.json" in init_js(assets)
    assert "http" not in docs.text  # served from the swagger-ui-bundle package, no CDN
    assert all(a.status_code == 200 and a.content for a in assets) and unknown_asset.status_code == 404


def init_js(assets: list[httpx.Response]) -> str:
    return assets[-1].text
