"""Dead-letter topic sink: the original key and value, the reason in headers (schemas.deadletter)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from schemas.deadletter import DeadLetter
from sinks.kafka import KafkaPublisher


class DeadLetterSink:
    def __init__(self, publisher: KafkaPublisher, topic: str) -> None:
        self._publisher = publisher
        self._topic = topic

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        for letter in letters:
            self._publisher.produce(self._topic, letter.key, letter.value, letter.headers())

    async def flush(self) -> None:
        await asyncio.to_thread(self._publisher.flush)
