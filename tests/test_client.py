"""The producer client against the real gateway: every event accepted once through a broker outage
and a gateway restart, rejected items reported and never re-sent, 429 waited out, a full buffer; and,
against a stand-in answering as a rate-limited gateway does, Retry-After held by every sender."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import asyncpg
import pytest

from tally.ingest.auth import create_key
from tally.client import AsyncTallyClient, BufferFull, TallyClient, event
from tally.settings import Settings
from tally.topics import create_topics
from tests.processor.helpers import drained, wait_for
from tests.scratch_kafka import ScratchKafka
from tests.gateway.helpers import healthy
from tests.support import TallyProcess, free_port, running, wait_until



async def _key(settings: Settings, scopes: tuple[str, ...] = ("events:write", "logs:write")) -> tuple[str, str]:
    tenant = f"client-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(settings.database_url)
    try:
        _, secret = await create_key(conn, tenant, "client-test", list(scopes))
    finally:
        await conn.close()
    return tenant, secret


async def _stored(db: asyncpg.Connection, tenant: str) -> dict[str, int]:
    rows = await db.fetch("select id, count(*) as n from events where tenant = $1 group by id", tenant)
    return {row["id"]: row["n"] for row in rows}


@pytest.mark.slow
async def test_every_event_is_stored_once_through_a_broker_outage_and_a_gateway_restart(
    settings: Settings, db: asyncpg.Connection, scratch_kafka: ScratchKafka
) -> None:
    run = uuid.uuid4().hex[:8]
    own = settings.model_copy(update={
        "kafka_bootstrap": scratch_kafka.bootstrap, "topic_prefix": f"{settings.topic_prefix}{run}.",
        "consumer_group": f"{settings.consumer_group}-{run}", "processor_metrics_port": 0,
    })
    await asyncio.to_thread(create_topics, own)
    tenant, secret = await _key(own)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sent: list[str] = []
    stop = threading.Event()

    def produce(client: TallyClient) -> None:
        n = 0
        while not stop.is_set():
            item = event("order.placed", source="client-test", subject=f"customer-{n % 7}", data={"n": n})
            client.send(item)
            sent.append(item["id"])
            n += 1
            time.sleep(0.002)

    with running("processor", ["process"], own):
        gateway = TallyProcess("gateway", ["gateway", "--port", str(port)], own)
        try:
            await asyncio.to_thread(wait_until, lambda: healthy(url), 30, 0.1, "the gateway")
            client = TallyClient(url, secret, batch_size=50, retry_max_s=1.0, give_up_after_s=300)
            producer = threading.Thread(target=produce, args=(client,))
            producer.start()
            await asyncio.sleep(2)
            await asyncio.to_thread(scratch_kafka.stop)  # the gateway answers 503 now
            await asyncio.sleep(3)
            await asyncio.to_thread(scratch_kafka.start)
            await asyncio.sleep(3)
            gateway.stop()  # the gateway goes away: connections are refused until it is back
            await asyncio.sleep(1)
            gateway = TallyProcess("gateway", ["gateway", "--port", str(port)], own)
            await asyncio.to_thread(wait_until, lambda: healthy(url), 30, 0.1, "the restarted gateway")
            await asyncio.sleep(2)
            stop.set()
            await asyncio.to_thread(producer.join)
            assert await asyncio.to_thread(client.flush, 120), client.metrics
            await asyncio.to_thread(client.close)
        finally:
            gateway.stop()
        await wait_for(lambda: drained(own, db), 90, "the processor to drain the topic")

    metrics = client.metrics
    assert metrics.retried > 0, "the outage and the restart were met"
    assert (metrics.sent, metrics.rejected, metrics.dropped) == (len(sent), 0, 0)
    assert await _stored(db, tenant) == {event_id: 1 for event_id in sent}


@pytest.fixture
async def gateway_url(isolated: Settings):  # noqa: ANN201
    settings = isolated.model_copy(update={"gateway_rate_limit_per_s": 4.0, "gateway_rate_limit_burst": 2})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running("gateway", ["gateway", "--port", str(port)], settings):
        await asyncio.to_thread(wait_until, lambda: healthy(url), 30, 0.1, "the gateway")
        yield settings, url


async def test_rejected_items_are_reported_once_and_429_is_waited_out(gateway_url: tuple[Settings, str]) -> None:
    settings, url = gateway_url
    _, secret = await _key(settings)
    rejected: list[tuple[dict, dict]] = []
    with TallyClient(url, secret, batch_size=10, on_rejected=lambda item, problem: rejected.append((item, problem)),
                     retry_initial_s=0.05) as client:
        good = [event("order.placed", source="client-test", subject="c", data={"n": n}) for n in range(60)]
        bad = {"specversion": "1.0", "id": "no-type", "source": "client-test"}
        for item in good[:5] + [bad] + good[5:]:
            client.send(item)
        assert await asyncio.to_thread(client.flush, 60)
        metrics = client.metrics
    assert [item["id"] for item, _ in rejected] == ["no-type"]
    assert rejected[0][1]["status"] == 400 and "type" in str(rejected[0][1])
    # 7 batches against a limit of 2 at once and 4 a second: some met 429 and were sent again.
    assert metrics.retried > 0
    assert (metrics.sent, metrics.rejected, metrics.dropped) == (60, 1, 0)


async def test_the_async_client_delivers_every_event(gateway_url: tuple[Settings, str], db: asyncpg.Connection) -> None:
    settings, url = gateway_url
    tenant, secret = await _key(settings)
    async with AsyncTallyClient(url, secret, batch_size=100, retry_initial_s=0.05) as client:
        items = [event("order.placed", source="client-test", subject="c", data={"n": n}) for n in range(250)]
        for item in items:
            await client.send(item)
        assert await client.flush(60)
    assert (client.metrics.sent, client.metrics.dropped) == (250, 0)
    with running("processor", ["process"], settings.model_copy(update={"processor_metrics_port": 0})):
        await wait_for(lambda: drained(settings, db), 60, "the processor to drain the topic")
    assert await _stored(db, tenant) == {item["id"]: 1 for item in items}


def test_a_full_buffer_raises_or_blocks_and_close_counts_what_was_never_sent() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    client = TallyClient(nowhere, "tly_none", max_buffer=10, when_full="raise", retry_initial_s=0.05)
    for n in range(10):
        client.send(event("t", source="s", data={"n": n}))
    with pytest.raises(BufferFull):
        client.send(event("t", source="s"))
    client.close(timeout_s=0.5)
    assert client.metrics.dropped == 10 and client.metrics.sent == 0

    blocking = TallyClient(nowhere, "tly_none", max_buffer=2, block_timeout_s=0.3, retry_initial_s=0.05)
    blocking.send(event("t", source="s"))
    blocking.send(event("t", source="s"))
    started = time.monotonic()
    with pytest.raises(BufferFull):
        blocking.send(event("t", source="s"))
    assert time.monotonic() - started >= 0.3
    blocking.close(timeout_s=0.2)



async def test_a_cancelled_flush_is_cancelled_even_as_the_gateway_takes_the_last_batch(
        gateway_url: tuple[Settings, str]) -> None:
    """A cancel that lands in the loop steps between the buffer emptying and flush resuming is not swallowed.

    Each round cancels the flushing task a given number of loop steps after the client settles the last
    batch, so some round cancels it just as its wait is satisfied (asyncio.wait_for dropped that one on 3.11).
    """
    settings, url = gateway_url
    _, secret = await _key(settings)
    loop = asyncio.get_running_loop()
    async with AsyncTallyClient(url, secret, batch_size=10, retry_initial_s=0.05) as client:
        core = client._core
        settle = core.settle
        for steps in range(40):
            await client.send(event("order.placed", source="client-test", subject="c", data={"steps": steps}))
            flushing = asyncio.create_task(client.flush(30))
            cancels: list[bool] = []

            def cancel_after(n: int, task: asyncio.Task = flushing, cancels: list[bool] = cancels) -> None:
                if n:
                    loop.call_soon(cancel_after, n - 1)
                elif not task.done():
                    cancels.append(task.cancel())

            def settle_then_cancel(batch, verdict, steps: int = steps) -> None:  # noqa: ANN001
                settle(batch, verdict)
                if not core.buffer and not core.in_flight:
                    loop.call_soon(cancel_after, steps)

            core.settle = settle_then_cancel
            try:
                flushed = await flushing
            except asyncio.CancelledError:
                flushed = None
            core.settle = settle
            if cancels:
                assert flushed is None and flushing.cancelled(), \
                    f"the cancel {steps} loop steps after the last batch settled was swallowed"


class HeldRelay:
    """A TCP relay to the real gateway that holds each request until released: a gateway slow to answer."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.received = threading.Event()
        self.release = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        first = conn.recv(65536)
        self.received.set()
        self.release.wait()
        upstream.sendall(first)
        threading.Thread(target=_pipe, args=(conn, upstream), daemon=True).start()
        _pipe(upstream, conn)

    def close(self) -> None:
        self.release.set()
        self.listener.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _cpu_s(threads: list[threading.Thread]) -> float:
    return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threads if t.ident)


async def test_a_flush_waiting_on_a_batch_in_flight_does_not_spin_the_idle_senders(
        gateway_url: tuple[Settings, str]) -> None:
    """While a flush waits for a slow answer, the senders with nothing to take sleep instead of looping."""
    settings, url = gateway_url
    _, secret = await _key(settings)
    relay = HeldRelay(url)
    client = TallyClient(relay.url, secret, flush_interval_s=60, concurrency=4)
    try:
        client.send(event("order.placed", source="client-test", subject="c"))
        flushing = asyncio.create_task(asyncio.to_thread(client.flush, 60))
        assert await asyncio.to_thread(relay.received.wait, 30)
        before = _cpu_s(client._threads)
        await asyncio.sleep(1.5)  # the window measured: one batch held in flight, the buffer empty
        spent = _cpu_s(client._threads) - before
        relay.release.set()
        assert await flushing
    finally:
        relay.close()
        await asyncio.to_thread(client.close, 5)
    assert client.metrics.sent == 1
    assert spent < 0.1, f"the idle senders used {spent:.2f} s of CPU in 1.5 s while the flush waited"


class RateLimitedGateway:
    """A stand-in for a rate-limited gateway's `/v1/events/batch`, answering as the gateway does.

    The first request meets 429 with `Retry-After: 1` (the gateway's problem+json and RateLimit
    headers); so does every request that arrives before a 429 already answered allows one; after that
    the items are accepted with the gateway's 202 results. It records when each request arrived, which
    event ids it carried, and when each 429 was answered.
    """

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.arrivals: list[tuple[float, list[str]]] = []
        self.refusals: list[tuple[float, list[str]]] = []  # when each 429 was answered, for which ids
        self.accepted: dict[str, int] = {}
        self.closed_until: float | None = None
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_POST(self) -> None:
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/events/batch":
                    return self._answer(404, {"type": "about:blank", "title": "Not Found", "status": 404})
                if self.headers.get("Authorization") != f"Bearer {stand_in.secret}":
                    return self._answer(401, {"type": "about:blank", "title": "Unauthorized", "status": 401})
                ids = [item["id"] for item in json.loads(body)]
                with stand_in.lock:
                    stand_in.arrivals.append((arrived, ids))
                    refused = stand_in.closed_until is None or arrived < stand_in.closed_until
                    if refused:
                        stand_in.closed_until = max(stand_in.closed_until or 0.0, time.monotonic() + 1)
                    else:
                        for event_id in ids:
                            stand_in.accepted[event_id] = stand_in.accepted.get(event_id, 0) + 1
                if refused:
                    self._answer(429, {"type": "about:blank", "title": "Too many requests", "status": 429,
                                       "detail": "rate limit of events exceeded; retry after 1 s"},
                                 {"Retry-After": "1", "RateLimit-Policy": '"events";q=2;w=1',
                                  "RateLimit": '"events";r=0;t=1'})
                    with stand_in.lock:
                        stand_in.refusals.append((time.monotonic(), ids))
                    return None
                results = [{"index": n, "id": event_id, "status": "accepted"} for n, event_id in enumerate(ids)]
                return self._answer(202, {"accepted": len(ids), "rejected": 0, "failed": 0, "results": results})

            def _answer(self, status: int, doc: dict, headers: dict[str, str] | None = None) -> None:
                payload = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if status == 202 else "application/problem+json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def early(self, tolerance_s: float) -> list[str]:
        """Requests that arrived after a 429 but before its Retry-After ran out: a re-send of its items at
        any time, any other request from 0.2 s after the answer on (one arriving sooner was under way)."""
        out = []
        for arrived, ids in self.arrivals:
            for answered, refused_ids in self.refusals:
                too_soon = answered + 1 - tolerance_s
                if arrived < too_soon and (arrived > answered + 0.2 or (arrived > answered and set(ids) & set(refused_ids))):
                    out.append(f"{ids} arrived {arrived - answered:.3f} s after a 429 for {refused_ids}")
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("kind", ["threads", "asyncio"])
async def test_after_a_429_no_sender_posts_before_retry_after(kind: str) -> None:
    """Retry-After holds for the whole client: an idle sender does not take a batch another sender was told to hold."""
    gateway = RateLimitedGateway("tly_standin")
    items = [event("order.placed", source="client-test", subject="c", data={"n": n}) for n in range(6)]
    options = {"batch_size": 2, "concurrency": 4, "retry_initial_s": 0.05}
    try:
        if kind == "threads":
            client = TallyClient(gateway.url, gateway.secret, **options)
            for item in items:
                client.send(item)
            assert await asyncio.to_thread(client.flush, 30)
            await asyncio.to_thread(client.close)
        else:
            async with AsyncTallyClient(gateway.url, gateway.secret, **options) as client:
                for item in items:
                    await client.send(item)
                assert await client.flush(30)
    finally:
        gateway.close()
    assert gateway.refusals, "the stand-in answered 429"
    assert gateway.early(tolerance_s=0.02) == []
    assert gateway.accepted == {item["id"]: 1 for item in items}
    assert (client.metrics.sent, client.metrics.dropped) == (6, 0) and client.metrics.retried > 0
