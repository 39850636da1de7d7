"""The OpenAPI document agrees with the server (review 2026-11): the statuses a write route can answer
are documented, the documented time range is the accepted one, and fuzzing with the review's hostile
inputs as explicit examples finds no server error."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from tally.ingest.auth import SCOPES, create_key
from tally.settings import ROOT, Settings
from tests.gateway.helpers import Gateway, event, start_gateway

WRITE_ROUTES = ("/v1/events", "/v1/events/batch", "/v1/logs")
FUZZ_CONFIG = Path(__file__).parent / "schemathesis.toml"


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


def _operations(spec: dict) -> list[str]:
    return [f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item
            if method in ("get", "put", "post", "delete", "patch")]


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


async def _all_scopes(settings: Settings) -> str:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return (await create_key(conn, f"fuzz-{uuid.uuid4().hex[:8]}", "fuzz", list(SCOPES)))[1]
    finally:
        await conn.close()


def _schemathesis(spec: dict, url: str, secret: str, tmp_path: Path, *options: str,
                  hooks: bool = False) -> subprocess.CompletedProcess:
    schema = tmp_path / f"openapi-{uuid.uuid4().hex[:6]}.json"
    schema.write_text(json.dumps(spec))
    command = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(FUZZ_CONFIG), "--no-color",
               "run", str(schema), "--url", url, "--checks", "all", "--header", f"Authorization: Bearer {secret}",
               "--request-timeout", "15", "--workers", "1", "--suppress-health-check", "all", "--seed", "19", *options]
    env = {**os.environ, **({"SCHEMATHESIS_HOOKS": "tests.gateway.fuzz_hooks"} if hooks else {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


async def test_schemathesis_passes_on_the_whole_document(gateway_settings: Settings, tmp_path: Path) -> None:
    """Every operation of the document (intake and every product route), every check, and the stateful phase
    along the links schemathesis finds between operations; then the hooks' NUL, deep nesting and huge numbers
    in every parameter and body, and the review's hostile bodies as examples, with every check but
    positive_data_acceptance: those values are past limits the document states in words (issue 19 item 5).
    Bounded: a few examples per operation and a time budget per run."""
    secret = await _all_scopes(gateway_settings)
    with start_gateway("gateway-fuzz", gateway_settings, TALLY_GATEWAY_RATE_LIMIT_BURST="100000",
                       TALLY_USAGE_LINK_SECRET="fuzz-link-secret", TALLY_GATEWAY_READS_PER_TENANT="100") as gateway:
        async with gateway.client() as client:
            spec = (await client.get("/openapi.json")).json()
        documented = await asyncio.to_thread(
            _schemathesis, spec, gateway.url, secret, tmp_path, "--phases", "examples,coverage,fuzzing,stateful",
            "--max-examples", "8", "--max-time", "150")
        hostile = await asyncio.to_thread(
            _schemathesis, _with_hostile_examples(spec), gateway.url, secret, tmp_path, "--phases",
            "examples,fuzzing", "--max-examples", "25", "--exclude-checks", "positive_data_acceptance",
            hooks=True)
        output = gateway.process.output()
    operations = len(_operations(spec))
    for run in (documented, hostile):
        print(run.stdout[-3000:])
        assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-2000:]
        assert f"{operations} selected / {operations} total" in run.stdout  # every operation of the document
        assert re.search(rf"Tested: +{operations}\b", run.stdout), run.stdout[-3000:]
    assert re.search(r"Stateful .*\n(.*\n){0,4}.*✅ [1-9][0-9]* passed", documented.stdout), documented.stdout[-3000:]
    assert "unhandled error" not in output and "Traceback" not in output, output[-4000:]


async def test_what_schemathesis_found_is_fixed(gateway: Gateway, gateway_settings: Settings) -> None:
    """Issue 19 item 5, each as a plain request: a NUL in a query parameter, a usage Slack body that is not an
    object, and the Allow header of a path with several methods."""
    secret = await _all_scopes(gateway_settings)
    async with gateway.client(secret) as client:
        nul = await client.get("/v1/events", params={"type": "a\x00b"})
        nul_path = await client.get("/v1/alert-rules/a%00b")
        slack = await client.put("/v1/usage/slack", json=[None, None])
        plans = await client.request("DELETE", "/v1/plans")
        history = await client.post("/v1/usage/history")
    assert nul.status_code == 400 and nul.json()["errors"][0]["field"] == "type"
    assert nul_path.status_code == 404
    assert slack.status_code == 400
    assert plans.status_code == 405 and set(plans.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    assert history.status_code == 405 and set(history.headers["allow"].split(", ")) == {"GET", "HEAD"}
