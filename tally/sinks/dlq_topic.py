"""Dead-letter topic sink: the original key, value and headers, the reason in headers (schemas.deadletter).

A dead letter is the one message that must get through whatever it holds: one larger than the producer
accepts is cut to fit (its headers point at the whole original), and one the producer or broker still
refuses for what it is goes out as the reason and the pointer alone. Only outages are left to retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial

from tally.schemas.deadletter import DeadLetter
from tally.sinks.kafka import KafkaPublisher

# Room left under message.max.bytes for the record's own framing (lengths, timestamps, attributes).
_FRAMING = 1024


class DeadLetterSink:
    def __init__(self, publisher: KafkaPublisher, topic: str) -> None:
        self._publisher = publisher
        self._topic = topic

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        limit = self._publisher.max_message_bytes - _FRAMING
        for letter in letters:
            fitted = letter.fitted(limit)
            self._publisher.produce(self._topic, fitted.key, fitted.value, fitted.headers(),
                                    on_refused=partial(self._send_pointer, fitted))

    def _send_pointer(self, letter: DeadLetter) -> None:
        self._publisher.produce(self._topic, None, None, letter.pointer().headers())

    async def flush(self) -> None:
        await asyncio.to_thread(self._publisher.flush)
