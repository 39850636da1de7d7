"""The OpenAPI document agrees with the server (review 2026-11): the statuses a write route can answer
are documented, the documented time range is the accepted one, and fuzzing with the review's hostile
inputs as explicit examples finds no server error."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tally.settings import ROOT, Settings
from tests.gateway.helpers import Gateway, event, start_gateway

WRITE_ROUTES = ("/v1/events", "/v1/events/batch", "/v1/logs")


async def test_every_status_a_write_route_answers_is_documented(gateway: Gateway, api_key: tuple[str, str]) -> None:
    _, secret = api_key
    async with gateway.client(secret) as client:
        spec = (await client.get("/openapi.json")).json()
        first = await client.post("/v1/events", json=event(id="doc-1"), headers={"Idempotency-Key": "doc"})
        reused = await client.post("/v1/events", json=event(id="doc-2"), headers={"Idempotency-Key": "doc"})
    assert first.status_code == 202 and reused.status_code == 422
    for route in WRITE_ROUTES:
        documented = spec["paths"][route]["post"]["responses"]
        for status in ("202", "400", "401", "403", "408", "409", "413", "415", "422", "429", "503"):
            assert status in documented, (route, status)
    assert {"200", "202", "401", "409"} <= set(spec["paths"]["/v1/webhooks/{source}"]["post"]["responses"])


@pytest.mark.parametrize("when", ["1969-12-31T23:59:59Z", "1970-01-01T00:30:00+01:00", "1970-01-01T00:00:00Z",
                                  "1999-12-31T23:59:59.5-05:00"])
async def test_the_documented_time_range_is_the_accepted_one(
    gateway: Gateway, api_key: tuple[str, str], when: str
) -> None:
    _, secret = api_key
    async with gateway.client(secret) as client:
        spec = (await client.get("/openapi.json")).json()
        log = await client.post("/v1/logs", json={"service": "s", "message": "m", "time": when})
        one = await client.post("/v1/events", json=event(time=when))
    schemas = spec["components"]["schemas"]
    for schema, response in ((schemas["LogRecord"], log), (schemas["CloudEvent"], one)):
        documented = re.match(schema["properties"]["time"]["pattern"], when) is not None
        assert documented == (response.status_code == 202), (when, response.text)


def _with_hostile_examples(spec: dict) -> dict:
    """The document plus the review's inputs as explicit examples: deep JSON on every write route, a
    non-ASCII Stripe-Signature and a NUL character. 200 levels: deeper than the gateway takes, as deep as
    schemathesis itself can write (test_gateway_hostile_input goes to 1,000)."""
    deep: object = []
    for _ in range(200):
        deep = [deep]
    paths = spec["paths"]
    bodies = {
        "/v1/events": {"id": "e", "source": "s", "type": "t", "data": deep},
        "/v1/events/batch": [{"id": "e", "source": "s", "type": "t", "data": deep},
                             {"id": "e\u0000", "source": "s", "type": "t"}],
        "/v1/logs": {"service": "s", "message": "m", "attributes": {"a": deep}},
    }
    for route, body in bodies.items():
        for media in paths[route]["post"]["requestBody"]["content"].values():
            media["examples"] = {"hostile": {"value": body}}
    webhook = paths["/v1/webhooks/{source}"]["post"]
    webhook["parameters"][0]["example"] = "stripe"
    webhook["parameters"].append({"name": "Stripe-Signature", "in": "header", "required": True,
                                  "schema": {"type": "string"}, "example": f"t={int(time.time())},v1=\u00e9"})
    webhook["requestBody"]["content"]["application/json"]["examples"] = {"hostile": {"value": {"id": "x", "d": deep}}}
    return spec


async def test_schemathesis_finds_no_server_error(gateway_settings: Settings, api_key: tuple[str, str],
                                                   tmp_path: Path) -> None:
    _, secret = api_key
    with start_gateway("gateway-fuzz", gateway_settings, TALLY_GATEWAY_RATE_LIMIT_BURST="100000") as gateway:
        async with gateway.client() as client:
            spec = (await client.get("/openapi.json")).json()
        schema = tmp_path / f"openapi-{uuid.uuid4().hex[:6]}.json"
        schema.write_text(json.dumps(_with_hostile_examples(spec)))
        command = [
            str(Path(sys.executable).parent / "schemathesis"), "run", str(schema), "--url", gateway.url,
            "--checks", "not_a_server_error", "--header", f"Authorization: Bearer {secret}",
            "--max-examples", "25", "--request-timeout", "15", "--max-time", "60", "--workers", "1",
            "--suppress-health-check", "all",
        ]
        run = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=240, cwd=ROOT)
        output = gateway.process.output()
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "unhandled error" not in output and "Traceback" not in output, output[-4000:]
    assert "Examples" in run.stdout or "examples" in run.stdout  # the explicit examples phase ran
