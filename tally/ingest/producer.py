"""An asyncio face on confluent-kafka's producer: a send is done only when the broker acked it.

Delivery reports are served by the event loop itself: while any send waits, a timer calls poll(0)
every `POLL_INTERVAL_S`, and the callbacks resolve the futures right there. A poll thread would have
to take the GIL from the busy loop thread for every batch of reports and wake the loop again for
each; under load that hand-off, not Kafka, set the latency (measured in ADR 2). Each send is one
`Delivery` that counts its reports down and owns one future, however many messages it holds.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

Headers = list[tuple[str, bytes]]
POLL_INTERVAL_S = 0.001


class Unavailable(Exception):
    """Kafka did not take the message within the bound: the client should retry later."""


class Refused(Exception):
    """Kafka refuses this message for good (too large): retrying cannot help."""


# errors that say "never this message", not "not now"
PERMANENT = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD})


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Durable by default: idempotent, acks from every in-sync replica, bounded delivery time."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 200000,
        "message.timeout.ms": 10000,
        "socket.connection.setup.timeout.ms": 3000,
        # requests are small and a client waits on each ack: do not let the kernel hold them back
        "socket.nagle.disable": True,
    }
    config.update(overrides)
    return config


class Delivery:
    """The reports of one send: one error (or None) per message, and a future set when all are in."""

    __slots__ = ("future", "deadline", "errors", "count", "pending")

    def __init__(self, future: asyncio.Future[None], deadline: float, count: int) -> None:
        self.future = future
        self.deadline = deadline
        self.errors: list[KafkaError | None] | None = None
        self.count = count
        self.pending = count

    def results(self) -> list[KafkaError | None]:
        return self.errors if self.errors is not None else [None] * self.count


class EventProducer:
    def __init__(self, config: dict[str, Any], queue_full_wait_s: float = 2.0) -> None:
        self._producer = Producer(config)
        self._queue_full_wait_s = queue_full_wait_s
        # librdkafka reports every message by message.timeout.ms; this is only a backstop past it
        self._report_timeout_s = int(config.get("message.timeout.ms", 300000)) / 1000 + 5
        self._waiting = 0
        self._polling = False
        # sends in the order they started; all share one timeout, so the oldest expires first
        self._deadlines: deque[Delivery] = deque()

    def _poll_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._polling:
            self._polling = True
            loop.call_later(POLL_INTERVAL_S, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve every delivery report that is ready; keep ticking while a send still waits."""
        self._polling = False
        self._producer.poll(0)
        self._expire()
        if self._waiting:
            self._poll_soon(loop)

    def _expire(self) -> None:
        """The backstop: a send still without all its reports past the bound fails with Unavailable."""
        deadlines = self._deadlines
        while deadlines and (deadlines[0].future.done() or deadlines[0].deadline <= time.monotonic()):
            delivery = deadlines.popleft()
            if not delivery.future.done():
                delivery.future.set_exception(Unavailable("no delivery report in time"))

    def _report(self, delivery: Delivery, index: int, err: KafkaError | None, _msg: Any) -> None:
        """Runs inside poll() or flush(), on the thread that called it, for each message."""
        if err is not None:
            if delivery.errors is None:
                delivery.errors = [None] * delivery.count
            delivery.errors[index] = err
        delivery.pending -= 1
        if delivery.pending == 0:
            self._waiting -= 1
            if not delivery.future.done():
                delivery.future.set_result(None)

    def queue_depth(self) -> int:
        return len(self._producer)

    def reachable(self, topic: str, timeout_s: float = 2.0) -> bool:
        """Blocking: does a broker answer a metadata request for the topic within the timeout?"""
        try:
            metadata = self._producer.list_topics(topic, timeout=timeout_s)
        except KafkaException:
            return False
        found = metadata.topics.get(topic)
        return bool(metadata.brokers) and found is not None and found.error is None

    async def send(self, topic: str, key: bytes, value: bytes, headers: Headers) -> None:
        await self.send_many(topic, [(key, value, headers)])

    async def send_many(self, topic: str, messages: Sequence[tuple[bytes, bytes, Headers]]) -> list[KafkaError | None]:
        """Produce all, wait for every delivery report, return one error (or None) per message."""
        count = len(messages)
        if not count:
            return []
        loop = asyncio.get_running_loop()
        delivery = Delivery(loop.create_future(), time.monotonic() + self._report_timeout_s, count)
        self._waiting += 1
        self._deadlines.append(delivery)
        report = self._report
        produce = self._producer.produce
        produced = 0
        try:
            for index, (key, value, headers) in enumerate(messages):
                on_delivery = partial(report, delivery, index)
                try:
                    produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                except BufferError:
                    await self._produce_when_room(loop, topic, key, value, headers, on_delivery)
                produced += 1
        except KafkaException as exc:
            self._abandon(delivery, count - produced)
            if exc.args and exc.args[0].code() in PERMANENT:
                raise Refused(str(exc)) from exc
            raise Unavailable(str(exc)) from exc
        except BaseException:
            self._abandon(delivery, count - produced)
            raise
        finally:
            self._poll_soon(loop)
        await delivery.future
        return delivery.results()

    def _abandon(self, delivery: Delivery, unproduced: int) -> None:
        """A send failed part-way: stop waiting for reports that will never come."""
        delivery.future.cancel()
        delivery.pending -= unproduced
        if delivery.pending == 0:
            self._waiting -= 1

    async def _produce_when_room(self, loop: asyncio.AbstractEventLoop, topic: str, key: bytes, value: bytes,
                                 headers: Headers, on_delivery: Any) -> None:
        """The local queue is full: retry for a bounded time (polling frees it), then give up with Unavailable."""
        self._poll_soon(loop)
        waited = 0.0
        while True:
            if waited >= self._queue_full_wait_s:
                raise Unavailable("the producer queue is full")
            await asyncio.sleep(0.01)
            waited += 0.01
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:
                continue

    def flush(self, timeout_s: float = 10.0) -> int:
        """Deliver what is in flight; returns how many messages are still undelivered."""
        return self._producer.flush(timeout_s)

    def close(self, timeout_s: float = 10.0) -> int:
        return self.flush(timeout_s)
