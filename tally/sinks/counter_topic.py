"""Kafka counter topic sink: absolute counter states on the compacted tally.counters.v1.

Absolute values make a repeated publication harmless; the key names one counter window, so
compaction keeps its latest state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tally.schemas.counters import PublishedState
from tally.sinks.kafka import KafkaPublisher


class CounterTopicSink:
    def __init__(self, publisher: KafkaPublisher, topic: str) -> None:
        self._publisher = publisher
        self._topic = topic

    async def write(self, states: Sequence[PublishedState]) -> None:
        for state in states:
            self._publisher.produce(self._topic, state.key.encode(), state.to_bytes())

    async def flush(self) -> None:
        await asyncio.to_thread(self._publisher.flush)
