"""The counter topic as the evaluator reads it: from offsets noted before PostgreSQL is read, so that every
state committed after that read is still ahead on the topic, and nothing in between is missed."""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer, TopicPartition


class CounterFeed:
    def __init__(self, bootstrap: str, topic: str) -> None:
        # No group offsets: each start reads from the ends it notes here, after recovering from PostgreSQL.
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"tally-alerts-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                   "fetch.wait.max.ms": 100})
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._start = [TopicPartition(topic, p, self._consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                                                     timeout=10)[1])
                       for p in partitions]

    def assign(self) -> None:
        self._consumer.assign(self._start)

    def poll(self, timeout_s: float) -> list[bytes]:
        """New counter states' values (tombstones and transient errors skipped: librdkafka recovers by itself)."""
        return [m.value() for m in self._consumer.consume(2000, timeout_s) if m.error() is None and m.value()]

    def close(self) -> None:
        self._consumer.close()
