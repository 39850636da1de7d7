"""Publishing events to the events topic: Kafka's delivery report decides, a timeout becomes 503.

Events arrive as attribute dicts (from the fast check, or `fields` of a validated model) and are
encoded straight into envelope bytes by `tally.schemas.envelope.encode`; no envelope model is built.
Each event is encoded and measured before anything is produced: an event that cannot be encoded
(400) or is larger than the producer takes (413) is refused on its own; retrying would never help.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import orjson

from tally.ingest.metrics import Metrics
from tally.edge.problems import Problem
from tally.ingest.producer import PERMANENT, EventProducer, Refused, Unavailable
from tally.schemas.envelope import CONTENT_TYPE, EVENT_FIELDS, SCHEMA_VERSION, CloudEvent, encode, message_key

Event = dict[str, Any]
Message = tuple[bytes, bytes, list[tuple[str, bytes]]]
OVERHEAD = 512  # librdkafka's per-message framing, well above what it adds to key, value and headers


def unavailable(reason: str, retry_after_s: int) -> Problem:
    return Problem(503, "Event store unavailable", f"Kafka did not acknowledge the event: {reason}",
                   headers={"Retry-After": str(retry_after_s)})


def fields(event: CloudEvent) -> Event:
    """A validated model's attributes, as the publisher takes them."""
    return {name: getattr(event, name) for name in EVENT_FIELDS}


_CONTENT_TYPE = ("content-type", CONTENT_TYPE.encode())
_SCHEMA_VERSION = ("schema-version", SCHEMA_VERSION.encode())


def headers(tenant: str, received_at: datetime) -> list[tuple[str, bytes]]:
    """Kafka headers of every message of one request (they share tenant and receipt time)."""
    return [("tenant", tenant.encode()), _CONTENT_TYPE, _SCHEMA_VERSION,
            ("received-at", received_at.isoformat().encode())]


def too_large(size: int, limit: int) -> Problem:
    return Problem(413, "Event too large", f"the encoded event takes {size} bytes; Kafka takes at most {limit}",
                   max_bytes=limit, errors=[{"field": "(event)", "message": f"encoded size over {limit} bytes"}])


def refused(reason: str) -> Problem:
    return Problem(413, "Event refused by Kafka", f"Kafka refuses this event for good: {reason}",
                   errors=[{"field": "(event)", "message": reason}])


class Publisher:
    def __init__(self, producer: EventProducer, topic: str, metrics: Metrics, retry_after_s: int,
                 max_message_bytes: int) -> None:
        self.producer = producer
        self._topic = topic
        self._metrics = metrics
        self._retry_after_s = retry_after_s
        self._max_message_bytes = max_message_bytes

    def message(self, event: Event, tenant: str, shared: list[tuple[str, bytes]], received_at: datetime) -> Message:
        """The Kafka message of one event, or the 4xx Problem that keeps it out of Kafka for good."""
        try:
            value = encode(event, tenant, received_at)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise Problem(400, "Invalid event", f"the event cannot be encoded as JSON: {exc}",
                          errors=[{"field": "(event)", "message": str(exc)}]) from None
        key = message_key(tenant, event["subject"])
        size = len(key) + len(value) + OVERHEAD
        for name, header in shared:
            size += len(name) + len(header)
        if size > self._max_message_bytes:
            raise too_large(size, self._max_message_bytes)
        return key, value, shared

    async def send(self, messages: list[Message]) -> list[Problem | None]:
        """One problem (or None when acked) per message: 413 when Kafka refuses it for good, else 503."""
        start = time.perf_counter()
        try:
            errors = await self.producer.send_many(self._topic, messages)
        except Refused as exc:
            raise refused(str(exc)) from exc
        except Unavailable as exc:
            raise unavailable(str(exc), self._retry_after_s) from exc
        self._metrics.produce_latency.observe(time.perf_counter() - start)
        return [None if err is None else refused(str(err)) if err.code() in PERMANENT
                else unavailable(str(err), self._retry_after_s) for err in errors]

    async def publish_one(self, event: Event, tenant: str, received_at: datetime) -> None:
        [problem] = await self.send([self.message(event, tenant, headers(tenant, received_at), received_at)])
        if problem is not None:
            raise problem
