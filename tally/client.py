"""Tally's producer client: buffer events, post them in batches, re-send exact copies until the gateway has them.

An event's id and time are fixed when it enters the client, so every retry is the same event and the
pipeline's dedup keeps it once (a retry that rebuilt the event would be a conflict, ADR 0014). A batch
is posted to `/v1/events/batch` (or `/v1/logs`); each item's result decides its fate: accepted items
are done, rejected ones are reported to `on_rejected` and never sent again, failed ones are sent
again. A whole request that meets 429, 503, another 5xx or a network error is sent again after a
backoff with jitter, or after the server's `Retry-After`; the backoff holds for the whole client, so no
sender posts anything until it has passed.

    with TallyClient("http://127.0.0.1:8080", api_key) as client:
        client.send(event("order.placed", source="checkout", subject="customer-7", data={"amount": 42}))

`AsyncTallyClient` is the same for asyncio. Both depend on `schemas` only, never on the server.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import httpx
import orjson

EVENTS_ROUTE = "/v1/events/batch"
LOGS_ROUTE = "/v1/logs"
MAX_ITEMS = 1000  # the gateway's batch limit
RETRIABLE = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

Rejected = Callable[[dict[str, Any], dict[str, Any]], None]


class BufferFull(Exception):
    """The client holds `max_buffer` events that the gateway has not accepted yet."""


def event(type: str, *, source: str, subject: str | None = None, data: Any = None, id: str | None = None,
          time: datetime | None = None, **attributes: Any) -> dict[str, Any]:
    """A CloudEvent with its id and time fixed now, so that any re-send of it is an exact copy."""
    moment = time or datetime.now(timezone.utc)
    out = {"specversion": "1.0", "id": id or uuid.uuid4().hex, "source": source, "type": type,
           "time": moment.isoformat(), **attributes}
    if subject is not None:
        out["subject"] = subject
    if data is not None:
        out["data"] = data
    return out


@dataclass
class ClientMetrics:
    """What the client did, for the application's own metrics."""

    sent: int = 0
    retried: int = 0
    rejected: int = 0
    dropped: int = 0
    requests: int = 0


@dataclass
class ClientConfig:
    batch_size: int = 100
    batch_bytes: int = 1024 * 1024
    flush_interval_s: float = 0.25
    max_buffer: int = 10_000
    when_full: Literal["block", "raise"] = "block"
    block_timeout_s: float = 5.0
    retry_initial_s: float = 0.1
    retry_max_s: float = 10.0
    give_up_after_s: float = 600.0
    idempotency_keys: bool = True
    timeout_s: float = 10.0
    concurrency: int = 4  # batches in flight at once: one at a time leaves the gateway waiting on each round trip

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= MAX_ITEMS:
            raise ValueError(f"batch_size must be between 1 and {MAX_ITEMS}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")


@dataclass
class _Pending:
    item: dict[str, Any]
    encoded: bytes
    first_tried: float | None = None


@dataclass
class _Verdict:
    """What one response means for the items of its request."""

    accepted: list[_Pending] = field(default_factory=list)
    rejected: list[tuple[_Pending, dict[str, Any]]] = field(default_factory=list)
    again: list[_Pending] = field(default_factory=list)


class _Core:
    """The I/O-free part both clients share: batching, request bodies, reading results, backoff."""

    def __init__(self, url: str, api_key: str, route: str, config: ClientConfig, on_rejected: Rejected | None) -> None:
        self.url = url.rstrip("/") + route
        self.headers = {"Authorization": f"Bearer {api_key}",
                        "Content-Type": "application/cloudevents-batch+json" if route == EVENTS_ROUTE
                        else "application/json"}
        self.config = config
        self.on_rejected = on_rejected
        self.metrics = ClientMetrics()
        self.buffer: deque[_Pending] = deque()
        self.buffered_bytes = 0
        self.in_flight = 0
        self.retry_attempt = 0
        # Every sender holds off until then: a backoff or Retry-After is the gateway's word to the whole
        # client, and an idle sender that took the batch at once would hammer a gateway that is rate limiting.
        self.not_before = 0.0

    def admit(self, item: dict[str, Any]) -> _Pending:
        pending = _Pending(item, orjson.dumps(item))
        self.buffer.append(pending)
        self.buffered_bytes += len(pending.encoded)
        return pending

    def full(self) -> bool:
        return len(self.buffer) + self.in_flight >= self.config.max_buffer

    def ready(self, since_flush_s: float, flushing: bool) -> bool:
        return bool(self.buffer) and not self.backing_off() and (
            flushing or len(self.buffer) >= self.config.batch_size
            or self.buffered_bytes >= self.config.batch_bytes or since_flush_s >= self.config.flush_interval_s)

    def backing_off(self) -> bool:
        return time.monotonic() < self.not_before

    def idle_s(self) -> float:
        """How long a sender with nothing ready may sleep: until the backoff ends, or one flush interval."""
        return max(self.not_before - time.monotonic(), 0.0) or self.config.flush_interval_s

    def take(self) -> list[_Pending]:
        """The next batch; nothing while the client is backing off."""
        batch: list[_Pending] = []
        if self.backing_off():
            return batch
        size = 2
        while self.buffer and len(batch) < self.config.batch_size:
            nxt = len(self.buffer[0].encoded) + 1
            if batch and size + nxt > self.config.batch_bytes:
                break
            pending = self.buffer.popleft()
            self.buffered_bytes -= len(pending.encoded)
            size += nxt
            batch.append(pending)
        self.in_flight += len(batch)
        now = time.monotonic()
        for pending in batch:
            pending.first_tried = pending.first_tried or now
        return batch

    def request(self, batch: list[_Pending]) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        if self.config.idempotency_keys:
            # Derived from the items: the same batch sent again carries the same key, a smaller one another.
            ids = "\n".join(str(p.item.get("id", "")) + "\t" + hashlib.blake2b(p.encoded, digest_size=8).hexdigest()
                            for p in batch)
            headers["Idempotency-Key"] = '"tally-client-' + hashlib.blake2b(ids.encode(), digest_size=16).hexdigest() + '"'
        self.metrics.requests += 1
        return b"[" + b",".join(p.encoded for p in batch) + b"]", headers

    def judge(self, batch: list[_Pending], status: int | None, headers: httpx.Headers | None, body: bytes) -> _Verdict:
        verdict = _Verdict()
        results = _results(body) if status in (202, 400) else None
        if results is not None and len(results) == len(batch):
            for pending, result in zip(batch, results):
                state = result.get("status")
                if state == "accepted":
                    verdict.accepted.append(pending)
                elif state == "rejected":
                    verdict.rejected.append((pending, result.get("problem") or {}))
                else:
                    verdict.again.append(pending)
        elif status is None or status in RETRIABLE:
            verdict.again = list(batch)
        else:
            problem = _json(body) or {"status": status}
            verdict.rejected = [(pending, problem) for pending in batch]
        if verdict.again:
            self.not_before = max(self.not_before, time.monotonic() + self._backoff(headers))
        else:
            self.retry_attempt = 0
        return verdict

    def settle(self, batch: list[_Pending], verdict: _Verdict) -> None:
        """Account for a judged batch: the items to send again go back to the front of the buffer."""
        self.in_flight -= len(batch)
        self.metrics.sent += len(verdict.accepted)
        self.metrics.rejected += len(verdict.rejected)
        if self.on_rejected is not None:
            for pending, problem in verdict.rejected:
                self.on_rejected(pending.item, problem)
        deadline = time.monotonic() - self.config.give_up_after_s
        again = [p for p in verdict.again if (p.first_tried or 0) > deadline]
        self.metrics.dropped += len(verdict.again) - len(again)
        self.metrics.retried += len(again)
        for pending in reversed(again):
            self.buffer.appendleft(pending)
            self.buffered_bytes += len(pending.encoded)

    def drop_all(self) -> None:
        self.metrics.dropped += len(self.buffer)
        self.buffer.clear()
        self.buffered_bytes = 0

    def _backoff(self, headers: httpx.Headers | None) -> float:
        self.retry_attempt += 1
        ceiling = min(self.config.retry_max_s, self.config.retry_initial_s * 2 ** (self.retry_attempt - 1))
        wait = random.uniform(ceiling / 2, ceiling)
        retry_after = headers.get("retry-after") if headers is not None else None
        if retry_after is not None:
            try:
                wait = max(wait, float(retry_after))
            except ValueError:
                pass
        return wait


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _results(body: bytes) -> list[dict[str, Any]] | None:
    doc = _json(body)
    results = doc.get("results") if isinstance(doc, dict) else None
    return sorted(results, key=lambda r: r.get("index", 0)) if isinstance(results, list) else None


class TallyClient:
    """Thread-safe; background threads post batches (`concurrency` of them). `close()` runs at interpreter exit too."""

    def __init__(self, url: str, api_key: str, *, route: str = EVENTS_ROUTE, on_rejected: Rejected | None = None,
                 transport: httpx.BaseTransport | None = None, **config: Any) -> None:
        self._core = _Core(url, api_key, route, ClientConfig(**config), on_rejected)
        self._http = httpx.Client(timeout=self._core.config.timeout_s, transport=transport)
        self._lock = threading.Condition()
        self._closing = False
        self._flush_requested = False
        self._threads = [threading.Thread(target=self._run, name=f"tally-client-{n}", daemon=True)
                         for n in range(self._core.config.concurrency)]
        for thread in self._threads:
            thread.start()
        atexit.register(self.close)

    @property
    def metrics(self) -> ClientMetrics:
        return self._core.metrics

    def send(self, item: dict[str, Any]) -> None:
        """Buffer one event (or log record); blocks or raises BufferFull when the buffer is full."""
        with self._lock:
            if self._closing:
                raise RuntimeError("the client is closed")
            if self._core.full():
                if self._core.config.when_full == "raise" or not self._lock.wait_for(
                        lambda: not self._core.full() or self._closing, self._core.config.block_timeout_s):
                    raise BufferFull(f"{self._core.config.max_buffer} events are waiting for the gateway")
            self._core.admit(item)
            if len(self._core.buffer) == self._core.config.batch_size:
                self._lock.notify()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every buffered event was accepted, rejected or dropped; False on timeout."""
        with self._lock:
            self._flush_requested = True
            self._lock.notify_all()
            done = self._lock.wait_for(lambda: not self._core.buffer and not self._core.in_flight, timeout_s)
            self._flush_requested = False
            return done

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush for up to `timeout_s`, then stop; what is still unsent then is counted as dropped."""
        atexit.unregister(self.close)
        if self._closing:
            return
        self.flush(timeout_s)
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(self._core.config.timeout_s + 1)
        with self._lock:
            self._core.drop_all()
        self._http.close()

    def __enter__(self) -> TallyClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            with self._lock:
                # A flush wakes the thread only while there is something to take: `wait_for` does not wait
                # when its predicate already holds, so a flush with an empty buffer would spin this loop.
                self._lock.wait_for(lambda since=last_flush: self._closing
                                    or self._core.ready(time.monotonic() - since, self._flush_requested),
                                    self._core.idle_s())
                if self._closing:
                    return
                batch = self._core.take()
            last_flush = time.monotonic()
            if not batch:
                continue
            body, headers = self._core.request(batch)
            try:
                response = self._http.post(self._core.url, content=body, headers=headers)
                status, reply_headers, reply = response.status_code, response.headers, response.content
            except httpx.HTTPError:
                status, reply_headers, reply = None, None, b""
            with self._lock:
                verdict = self._core.judge(batch, status, reply_headers, reply)
                self._core.settle(batch, verdict)
                self._lock.notify_all()


class AsyncTallyClient:
    """The same client for asyncio: `concurrency` tasks post batches while the application sends."""

    def __init__(self, url: str, api_key: str, *, route: str = EVENTS_ROUTE, on_rejected: Rejected | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, **config: Any) -> None:
        self._core = _Core(url, api_key, route, ClientConfig(**config), on_rejected)
        self._http = httpx.AsyncClient(timeout=self._core.config.timeout_s, transport=transport)
        self._changed = asyncio.Condition()
        self._closing = False
        self._flush_requested = False
        self._tasks = [asyncio.get_running_loop().create_task(self._run())
                       for _ in range(self._core.config.concurrency)]

    @property
    def metrics(self) -> ClientMetrics:
        return self._core.metrics

    async def send(self, item: dict[str, Any]) -> None:
        async with self._changed:
            if self._closing:
                raise RuntimeError("the client is closed")
            if self._core.full():
                if self._core.config.when_full == "raise":
                    raise BufferFull(f"{self._core.config.max_buffer} events are waiting for the gateway")
                try:
                    async with asyncio.timeout(self._core.config.block_timeout_s):
                        await self._changed.wait_for(lambda: not self._core.full() or self._closing)
                except TimeoutError:
                    raise BufferFull(f"{self._core.config.max_buffer} events are waiting for the gateway") from None
            self._core.admit(item)
            self._changed.notify_all()

    async def flush(self, timeout_s: float | None = None) -> bool:
        async with self._changed:
            self._flush_requested = True
            self._changed.notify_all()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait_for(lambda: not self._core.buffer and not self._core.in_flight)
                return True
            except TimeoutError:
                return False
            finally:
                self._flush_requested = False

    async def aclose(self, timeout_s: float = 30.0) -> None:
        if self._closing:
            return
        await self.flush(timeout_s)
        async with self._changed:
            self._closing = True
            self._changed.notify_all()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._core.drop_all()
        await self._http.aclose()

    async def __aenter__(self) -> AsyncTallyClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            async with self._changed:
                try:
                    # A flush wakes the task only while there is something to take: `wait_for` does not yield
                    # when its predicate already holds, so a flush with an empty buffer would spin this loop.
                    async with asyncio.timeout(self._core.idle_s()):
                        await self._changed.wait_for(
                            lambda since=last_flush: self._closing
                            or self._core.ready(time.monotonic() - since, self._flush_requested))
                except TimeoutError:
                    pass
                if self._closing:
                    return
                batch = self._core.take()
            last_flush = time.monotonic()
            if not batch:
                continue
            body, headers = self._core.request(batch)
            try:
                response = await self._http.post(self._core.url, content=body, headers=headers)
                status, reply_headers, reply = response.status_code, response.headers, response.content
            except httpx.HTTPError:
                status, reply_headers, reply = None, None, b""
            async with self._changed:
                verdict = self._core.judge(batch, status, reply_headers, reply)
                self._core.settle(batch, verdict)
                self._changed.notify_all()
