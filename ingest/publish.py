"""Publishing events to the events topic: Kafka's delivery report decides, a timeout becomes 503.

Events arrive as attribute dicts (from the fast check, or `fields` of a validated model) and are
encoded straight into envelope bytes by `schemas.envelope.encode`; no envelope model is built.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from ingest.metrics import Metrics
from ingest.problems import Problem
from ingest.producer import EventProducer, Unavailable
from schemas.envelope import CONTENT_TYPE, EVENT_FIELDS, SCHEMA_VERSION, CloudEvent, encode, message_key

Event = dict[str, Any]


def unavailable(reason: str, retry_after_s: int) -> Problem:
    return Problem(503, "Event store unavailable", f"Kafka did not acknowledge the event: {reason}",
                   headers={"Retry-After": str(retry_after_s)})


def fields(event: CloudEvent) -> Event:
    """A validated model's attributes, as the publisher takes them."""
    return {name: getattr(event, name) for name in EVENT_FIELDS}


def headers(tenant: str, received_at: datetime) -> list[tuple[str, bytes]]:
    """Kafka headers of every message of one request (they share tenant and receipt time)."""
    return [
        ("tenant", tenant.encode()),
        ("content-type", CONTENT_TYPE.encode()),
        ("schema-version", SCHEMA_VERSION.encode()),
        ("received-at", received_at.isoformat().encode()),
    ]


class Publisher:
    def __init__(self, producer: EventProducer, topic: str, metrics: Metrics, retry_after_s: int) -> None:
        self.producer = producer
        self._topic = topic
        self._metrics = metrics
        self._retry_after_s = retry_after_s

    async def publish(self, events: list[Event], tenant: str, received_at: datetime) -> list[str | None]:
        """One error text (or None when acked) per event; 503 when Kafka takes none of them."""
        shared = headers(tenant, received_at)
        messages = [(message_key(tenant, e["subject"]), encode(e, tenant, received_at), shared) for e in events]
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

    async def publish_one(self, event: Event, tenant: str, received_at: datetime) -> None:
        await self.publish([event], tenant, received_at)
