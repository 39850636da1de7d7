"""The processor loop: consume a batch, hand it to the sink, flush, then commit its offsets.

Auto-commit is off; an offset is committed only after the sink flushed every message below it,
so a crash anywhere re-delivers work that dedup then recognises.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from schemas.envelope import Envelope
from sinks.base import Record
from sinks.postgres import PostgresSink

log = logging.getLogger("tally.processor")


@dataclass(frozen=True)
class ProcessorConfig:
    kafka_bootstrap: str
    group_id: str
    topic: str
    batch_max_messages: int = 5000
    batch_max_wait_s: float = 0.2


def consumer_config(config: ProcessorConfig, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "bootstrap.servers": config.kafka_bootstrap,
        "group.id": config.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 300000,
    }
    settings.update(overrides)
    return settings


def next_offsets(messages: list[Message]) -> list[TopicPartition]:
    """The offset to commit per partition: one past the highest message handled."""
    highest: dict[tuple[str, int], int] = {}
    for msg in messages:
        key = (msg.topic(), msg.partition())
        highest[key] = max(highest.get(key, -1), msg.offset())
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in highest.items()]


class Processor:
    def __init__(self, config: ProcessorConfig, sink: PostgresSink) -> None:
        self.config = config
        self.sink = sink
        self._consumer = Consumer(consumer_config(config))
        self._stopping = asyncio.Event()
        self.persisted = 0

    def stop(self) -> None:
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._consumer.subscribe([self.config.topic])
        try:
            while not self._stopping.is_set():
                messages = await loop.run_in_executor(
                    None, self._consumer.consume, self.config.batch_max_messages, self.config.batch_max_wait_s
                )
                await self.handle(messages)
        finally:
            await loop.run_in_executor(None, self._consumer.close)

    async def handle(self, messages: list[Message]) -> None:
        records = []
        for msg in messages:
            if msg.error():
                log.warning("consumer error: %s", msg.error())
                continue
            records.append(Record(Envelope.from_bytes(msg.value()), msg.partition(), msg.offset()))
        if not records:
            return
        await self.sink.write(records)
        await self.sink.flush()
        self.persisted += self.sink.last_new
        self._consumer.commit(offsets=next_offsets([m for m in messages if not m.error()]), asynchronous=False)
        log.info("batch: %d consumed, %d new", len(records), self.sink.last_new)
