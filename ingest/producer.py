"""An asyncio face on confluent-kafka's producer: a send is done only when the broker acked it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

Headers = list[tuple[str, bytes]]


class Unavailable(Exception):
    """Kafka did not take the message within the bound: the client should retry later."""


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
    }
    config.update(overrides)
    return config


class EventProducer:
    def __init__(self, config: dict[str, Any], queue_full_wait_s: float = 2.0) -> None:
        self._producer = Producer(config)
        self._queue_full_wait_s = queue_full_wait_s
        # librdkafka reports every message by message.timeout.ms; this is only a backstop past it
        self._report_timeout_s = int(config.get("message.timeout.ms", 300000)) / 1000 + 5
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

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
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        results: list[KafkaError | None] = [None] * len(messages)
        pending = len(messages)

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        def report(index: int) -> Any:
            def on_delivery(err: KafkaError | None, _msg: Any) -> None:
                nonlocal pending
                results[index] = err
                pending -= 1
                if pending == 0:
                    loop.call_soon_threadsafe(finish)

            return on_delivery

        for index, (key, value, headers) in enumerate(messages):
            await self._produce(topic, key, value, headers, report(index))
        if messages:
            try:
                await asyncio.wait_for(done, self._report_timeout_s)
            except TimeoutError:
                raise Unavailable("no delivery report in time") from None
        return results

    async def _produce(self, topic: str, key: bytes, value: bytes, headers: Headers, on_delivery: Any) -> None:
        waited = 0.0
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:
                if waited >= self._queue_full_wait_s:
                    raise Unavailable("the producer queue is full") from None
                await asyncio.sleep(0.01)
                waited += 0.01
            except KafkaException as exc:
                raise Unavailable(str(exc)) from exc

    def flush(self, timeout_s: float = 10.0) -> int:
        """Deliver what is in flight; returns how many messages are still undelivered."""
        return self._producer.flush(timeout_s)

    def close(self, timeout_s: float = 10.0) -> int:
        self._stop.set()
        self._poller.join(timeout=1.0)
        return self.flush(timeout_s)
