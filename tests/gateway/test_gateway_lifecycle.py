"""The gateway under failure and shutdown: a stopped broker gets 503, SIGTERM drains (fuzzing: test_gateway_openapi)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from tally.settings import ROOT, Settings
from tally.topics import create_topics
from tests.gateway.helpers import Gateway, event, for_tenant, start_gateway
from tests.support import free_port, wait_until

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


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def _start_request(port: int, secret: str, body: bytes) -> socket.socket:
    """Send a request's head and half its body; return once the gateway has begun reading the body.

    `Expect: 100-continue` makes the server answer "100 Continue" when the app first asks for the body,
    so that answer proves the request is inside the gateway, not queued in the kernel."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {secret}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n")
    conn.sendall(head.encode())
    assert conn.recv(1024).startswith(b"HTTP/1.1 100 ")
    conn.sendall(body[:len(body) // 2])
    return conn


def _finish_request(conn: socket.socket, body: bytes) -> bytes:
    conn.sendall(body[len(body) // 2:])
    response = b""
    while chunk := conn.recv(65536):
        response += chunk
    conn.close()
    return response


async def test_sigterm_stops_accepting_and_exits_cleanly_with_every_202_in_kafka(
    gateway_settings: Settings, api_key: tuple[str, str]
) -> None:
    tenant, secret = api_key
    bodies = [orjson.dumps(event(id=f"term-{n}")) for n in range(3)]
    with start_gateway("gateway-sigterm", gateway_settings) as gateway:
        port = int(gateway.url.rsplit(":", 1)[1])
        in_flight = [await asyncio.to_thread(_start_request, port, secret, body) for body in bodies]
        gateway.process.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_until, lambda: _refused(port), 15, 0.05, "the gateway to stop listening")
        assert gateway.process.alive(), "the gateway exited before answering the requests in flight"
        with pytest.raises(httpx.ConnectError):
            async with gateway.client(secret) as client:
                await client.post("/v1/events", json=event(id="term-after"))
        responses = [await asyncio.to_thread(_finish_request, conn, body) for conn, body in zip(in_flight, bodies)]
        code = await asyncio.to_thread(gateway.process.proc.wait, 30)
        output = gateway.process.output()
    for response in responses:
        assert response.startswith(b"HTTP/1.1 202 "), response
        assert b"connection: close" in response.lower(), response
    assert code in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal after its graceful shutdown
    assert "gateway stopped: producer flushed, nothing undelivered" in output
    assert "Traceback" not in output
    in_kafka = sorted(v["id"] for v in for_tenant(gateway.messages(), tenant))
    assert in_kafka == ["term-0", "term-1", "term-2"]


@pytest.mark.slow
@pytest.mark.parametrize("redis", ["up", "down"])
async def test_schemathesis_finds_no_server_error(gateway_settings: Settings, api_key: tuple[str, str], redis: str) -> None:
    """Generated requests with Redis reachable and with Redis gone (the default open policy); half the bodies
    carry nesting up to 250 deep or numbers past 64 bits (tests/gateway/fuzz_hooks.py)."""
    _, secret = api_key
    own = gateway_settings if redis == "up" else gateway_settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with start_gateway(f"gateway-fuzz-redis-{redis}", own, TALLY_GATEWAY_RATE_LIMIT_BURST="100000") as gateway:
        command = [
            str(Path(sys.executable).parent / "schemathesis"), "run", f"{gateway.url}/openapi.json",
            "--checks", "not_a_server_error", "--header", f"Authorization: Bearer {secret}",
            "--max-examples", "100", "--request-timeout", "15", "--max-time", "90", "--workers", "1",
            "--suppress-health-check", "all", "--seed", "14",
        ]  # one worker: with two, runs failed inside the fuzzer (SystemError from Python 3.11.7's parser)
        run = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                                      env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.gateway.fuzz_hooks"})
        output = gateway.process.output()
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "unhandled error" not in output, output[-4000:]


def _deep(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


# Beyond what the fuzzer can carry (its JSON copy stops at 255 levels): written as raw text.
ODD_DATA = [
    pytest.param(_deep(300), id="nested 300 deep"),
    pytest.param(_deep(100_000), id="nested 100,000 deep"),
    pytest.param("1" + "0" * 400, id="integer of 400 digits"),
    pytest.param("-18446744073709551617", id="negative integer past 64 bits"),
    pytest.param("1e999", id="float past a double"),
    pytest.param("1e-999", id="float below a double"),
]


@pytest.mark.parametrize("data", ODD_DATA)
@pytest.mark.parametrize("route", ["/v1/events", "/v1/events/batch"])
async def test_deep_nesting_and_huge_numbers_get_an_answer_not_a_server_error(
    gateway: Gateway, api_key: tuple[str, str], data: str, route: str
) -> None:
    _, secret = api_key
    one = f'{{"specversion":"1.0","id":"odd-{uuid.uuid4().hex}","source":"tests","type":"t","data":{data}}}'
    body = one if route == "/v1/events" else f"[{one}]"
    errors_before = gateway.process.output().count("unhandled error")
    async with gateway.client(secret) as client:
        response = await client.post(route, content=body, headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    assert gateway.process.output().count("unhandled error") == errors_before
