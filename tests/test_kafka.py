"""The real broker: what we produce comes back with its key and headers."""

from __future__ import annotations

import asyncio
import uuid

from tally.ingest.producer import EventProducer, producer_config
from tally.settings import Settings
from tally.topics import create_topics
from tests.support import read_topic


async def test_produced_message_is_consumed_back_with_key_and_headers(isolated: Settings) -> None:
    producer = EventProducer(producer_config(isolated.kafka_bootstrap))
    value = uuid.uuid4().hex.encode()
    try:
        errors = await producer.send_many(
            isolated.topics.events, [(b"tenant-a/customer-1", value, [("tenant", b"tenant-a"), ("x-n", b"1")])]
        )
    finally:
        producer.close()
    assert errors == [None]
    messages = await asyncio.to_thread(read_topic, isolated.kafka_bootstrap, isolated.topics.events)
    assert [(m.key(), m.value(), m.headers()) for m in messages] == [
        (b"tenant-a/customer-1", value, [("tenant", b"tenant-a"), ("x-n", b"1")])
    ]


def test_topics_create_is_idempotent_and_counters_are_compacted(isolated: Settings) -> None:
    from confluent_kafka.admin import AdminClient, ConfigResource

    assert set(create_topics(isolated).values()) == {"exists"}
    admin = AdminClient({"bootstrap.servers": isolated.kafka_bootstrap})
    topics = admin.list_topics(timeout=10).topics
    assert len(topics[isolated.topics.events].partitions) == isolated.events_partitions
    resource = ConfigResource(ConfigResource.Type.TOPIC, isolated.topics.counters)
    config = admin.describe_configs([resource])[resource].result()
    assert config["cleanup.policy"].value == "compact"
