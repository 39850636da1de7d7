"""The gateway under failure and shutdown: a stopped broker gets 503, SIGTERM drains (fuzzing: test_gateway_openapi)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid

import httpx
import pytest

from tally.settings import ROOT, Settings
from tally.topics import create_topics
from tests.gateway.helpers import event, for_tenant, start_gateway
from tests.support import free_port

KAFKA = ROOT / "deploy" / "local" / "kafka.sh"


def _kafka(command: str, env: dict[str, str]) -> None:
    subprocess.run(["bash", str(KAFKA), command], env={**os.environ, **env}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)


@pytest.mark.slow
async def test_with_the_broker_stopped_no_request_gets_202_and_clients_get_503(
    gateway_settings: Settings, api_key: tuple[str, str]
) -> None:
    _, secret = api_key
    port = free_port()
    broker = {"KAFKA_INSTANCE": f"gw503-{uuid.uuid4().hex[:6]}", "KAFKA_PORT": str(port),
              "KAFKA_CONTROLLER_PORT": str(free_port())}
    await asyncio.to_thread(_kafka, "start", broker)
    try:
        own = gateway_settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}"})
        await asyncio.to_thread(create_topics, own)
        with start_gateway("gateway-503", own, TALLY_GATEWAY_PRODUCE_TIMEOUT_MS="3000") as gateway:
            async with gateway.client(secret) as client:
                before = await client.post("/v1/events", json=event(id="before"))
                assert before.status_code == 202, before.text
                await asyncio.to_thread(_kafka, "stop", broker)
                during = await asyncio.gather(
                    client.post("/v1/events", json=event(id="during-1")),
                    client.post("/v1/events/batch", json=[event(id="during-2"), event(id="during-3")]),
                    client.post("/v1/logs", json={"service": "s", "message": "m"}),
                )
                ready = await client.get("/readyz")
            assert gateway.process.alive()
        for response in during:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "5"
            assert response.headers["content-type"] == "application/problem+json"
        assert ready.status_code == 503 and ready.json()["kafka"] == "down"
    finally:
        await asyncio.to_thread(_kafka, "reset", broker)


async def test_sigterm_stops_accepting_and_exits_cleanly_with_every_202_in_kafka(
    gateway_settings: Settings, api_key: tuple[str, str]
) -> None:
    tenant, secret = api_key
    with start_gateway("gateway-sigterm", gateway_settings) as gateway:
        async with gateway.client(secret) as client:
            async def post(n: int) -> tuple[str, int | None]:
                try:
                    response = await client.post("/v1/events", json=event(id=f"term-{n}"))
                    return f"term-{n}", response.status_code
                except httpx.HTTPError:
                    return f"term-{n}", None

            tasks = [asyncio.create_task(post(n)) for n in range(100)]
            await asyncio.sleep(0.05)
            code = await asyncio.to_thread(gateway.process.stop, 30)
            results = await asyncio.gather(*tasks)
        output = gateway.process.output()
    assert code in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal after its graceful shutdown
    assert "gateway stopped: producer flushed, nothing undelivered" in output
    assert "Traceback" not in output
    acked = {event_id for event_id, status in results if status == 202}
    assert all(status in (202, None) for _, status in results), results
    in_kafka = {v["id"] for v in for_tenant(gateway.messages(), tenant)}
    assert acked <= in_kafka
