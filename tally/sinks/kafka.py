"""A Kafka producer that can say "everything produced so far is acknowledged" or raise; and how far a consumer
group got and where each partition ends, which the demo, the tests and the meter backfill (tally/meters/backfill.py)
read.

`flush` waits until every queued message is either acked (acks=all) or has definitively failed
after message.timeout.ms, so nothing from a failed attempt can still land after a later attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from tally.sinks.errors import is_poison_kafka_error


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

    @property
    def max_message_bytes(self) -> int:
        """librdkafka refuses a message whose key, value and headers exceed this."""
        return int(self._config.get("message.max.bytes", 1_000_000))

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._failures.append(err)

    def _on_delivery_or_refused(self, on_refused: Callable[[], None], err: KafkaError | None, msg: Message) -> None:
        if err is not None and is_poison_kafka_error(err):
            on_refused()
        else:
            self._on_delivery(err, msg)

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None, on_refused: Callable[[], None] | None = None) -> None:
        """Queue a message. `on_refused` is called instead of failing when the message itself is refused
        (too large, invalid), by librdkafka now or by the broker later; it may produce a replacement."""
        on_delivery = self._on_delivery if on_refused is None else partial(self._on_delivery_or_refused, on_refused)
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:
                self._producer.poll(0.05)
            except KafkaException as exc:
                if on_refused is None or not (exc.args and is_poison_kafka_error(exc.args[0])):
                    raise
                on_refused()
                return

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


class TopicUnknown(LookupError):
    """Kafka answered without the topic's partitions. Read as "no partitions", every question over them would be
    vacuously true (all caught up, every start recorded) and a meter's backfill would count nothing."""


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    found = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        why = found.error if found is not None and found.error is not None else "no partitions"
        raise TopicUnknown(f"Kafka has no topic {topic} ({why}): create it with `tally topics create`, or check"
                           " TALLY_TOPIC_PREFIX")
    return sorted(found.partitions)


def committed(bootstrap: str, group_id: str, topic: str) -> dict[int, int | None]:
    """The group's committed offset on every partition of `topic` (None where it committed nothing). Blocking."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        partitions = _partitions(consumer, topic)
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset if tp.offset >= 0 else None for tp in found}
    finally:
        consumer.close()


def high_watermarks(bootstrap: str, topic: str) -> dict[int, int]:
    """The end offset of every partition of `topic`: the offset its next acknowledged message will have. Blocking."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "tally-watermarks", "enable.auto.commit": False})
    try:
        partitions = _partitions(consumer, topic)
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    finally:
        consumer.close()


def caught_up(bootstrap: str, group_id: str, topic: str) -> bool:
    """True once the group's committed offsets reached the end of every partition of `topic`. Blocking."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        partitions = _partitions(consumer, topic)
        for tp in consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10):
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            if high > 0 and tp.offset < high:
                return False
        return True
    finally:
        consumer.close()
