"""How far a consumer group got: what the demo and the tests wait on before they read results."""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition


def caught_up(bootstrap: str, group_id: str, topic: str) -> bool:
    """True once the group's committed offsets reached the end of every partition of `topic`."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        for tp in consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10):
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            if high > 0 and tp.offset < high:
                return False
        return True
    finally:
        consumer.close()
