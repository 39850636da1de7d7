"""A Kafka producer that can say "everything produced so far is acknowledged" or raise.

`flush` waits until every queued message is either acked (acks=all) or has definitively failed
after message.timeout.ms, so nothing from a failed attempt can still land after a later attempt.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, Message, Producer


class PublishError(Exception):
    """Some messages were not acknowledged; the caller retries (it is a transient failure)."""


class KafkaPublisher:
    def __init__(self, bootstrap: str, message_timeout_ms: int = 30000, **overrides: Any) -> None:
        self._config = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.timeout.ms": message_timeout_ms,
            "queue.buffering.max.messages": 1_000_000,
            **overrides,
        }
        self._producer = Producer(self._config)
        self._failures: list[KafkaError] = []

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._failures.append(err)

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=self._on_delivery)
                return
            except BufferError:
                self._producer.poll(0.05)

    def flush(self) -> None:
        """Block until nothing is in flight; raise PublishError if anything failed. Runs in a worker thread."""
        while len(self._producer) > 0:
            self._producer.flush(1.0)
        failures, self._failures = self._failures, []
        if failures:
            if any(f.fatal() for f in failures):
                self._producer = Producer(self._config)
            raise PublishError(f"{len(failures)} messages not acknowledged: {failures[0]}")

    def close(self) -> None:
        self._producer.flush(10)
