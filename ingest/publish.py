"""Publishing envelopes to the events topic: Kafka's delivery report decides, a timeout becomes 503."""

from __future__ import annotations

import time

from ingest.metrics import Metrics
from ingest.problems import Problem
from ingest.producer import EventProducer, Unavailable
from schemas.envelope import CONTENT_TYPE, SCHEMA_VERSION, Envelope


def unavailable(reason: str, retry_after_s: int) -> Problem:
    return Problem(503, "Event store unavailable", f"Kafka did not acknowledge the event: {reason}",
                   headers={"Retry-After": str(retry_after_s)})


def headers(envelope: Envelope) -> list[tuple[str, bytes]]:
    return [
        ("tenant", envelope.tenant.encode()),
        ("content-type", CONTENT_TYPE.encode()),
        ("schema-version", SCHEMA_VERSION.encode()),
        ("received-at", envelope.received_at.isoformat().encode()),
    ]


class Publisher:
    def __init__(self, producer: EventProducer, topic: str, metrics: Metrics, retry_after_s: int) -> None:
        self.producer = producer
        self._topic = topic
        self._metrics = metrics
        self._retry_after_s = retry_after_s

    async def publish(self, envelopes: list[Envelope]) -> list[str | None]:
        """One error text (or None when acked) per envelope; 503 when Kafka takes none of them."""
        messages = [(e.key(), e.to_bytes(), headers(e)) for e in envelopes]
        start = time.perf_counter()
        try:
            errors = await self.producer.send_many(self._topic, messages)
        except Unavailable as exc:
            raise unavailable(str(exc), self._retry_after_s) from exc
        self._metrics.produce_latency.observe(time.perf_counter() - start)
        texts = [None if err is None else str(err) for err in errors]
        if texts and all(texts):
            raise unavailable(texts[0] or "", self._retry_after_s)
        return texts

    async def publish_one(self, envelope: Envelope) -> None:
        await self.publish([envelope])
