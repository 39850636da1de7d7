"""Dead letters: the original message, unchanged, with headers that say why it could not be processed.

The value and key of a dead letter are the original message's, so `tally dlq replay` can put it
back on its source topic as it was; the reason travels only in headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

PREFIX = "tally.dlq."
STAGE = PREFIX + "stage"
ERROR_CLASS = PREFIX + "error_class"
MESSAGE = PREFIX + "message"
TOPIC = PREFIX + "topic"
PARTITION = PREFIX + "partition"
OFFSET = PREFIX + "offset"
FIRST_SEEN = PREFIX + "first_seen"
ATTEMPTS = PREFIX + "attempts"
# Stage `conflict` only: where the kept copy of the re-used event id was read (same topic).
KEPT_PARTITION = PREFIX + "kept_partition"
KEPT_OFFSET = PREFIX + "kept_offset"

CONFLICT_STAGE = "conflict"

# Carried by a replayed message so that a second failure keeps its history.
REPLAY_FIRST_SEEN = "tally.replay.first_seen"
REPLAY_ATTEMPTS = "tally.replay.attempts"

MAX_MESSAGE = 1000


@dataclass(frozen=True)
class DeadLetter:
    stage: str
    error_class: str
    message: str
    topic: str
    partition: int
    offset: int
    first_seen: datetime
    attempts: int
    key: bytes | None
    value: bytes | None
    kept_partition: int | None = None
    kept_offset: int | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        kept = [] if self.kept_partition is None else [
            (KEPT_PARTITION, str(self.kept_partition).encode()), (KEPT_OFFSET, str(self.kept_offset).encode())]
        return kept + [
            (STAGE, self.stage.encode()),
            (ERROR_CLASS, self.error_class.encode()),
            (MESSAGE, self.message[:MAX_MESSAGE].encode()),
            (TOPIC, self.topic.encode()),
            (PARTITION, str(self.partition).encode()),
            (OFFSET, str(self.offset).encode()),
            (FIRST_SEEN, self.first_seen.isoformat().encode()),
            (ATTEMPTS, str(self.attempts).encode()),
        ]

    @classmethod
    def from_message(cls, headers: list[tuple[str, bytes]] | None, key: bytes | None, value: bytes | None) -> "DeadLetter":
        h = {name: raw.decode(errors="replace") for name, raw in headers or [] if name.startswith(PREFIX)}
        return cls(
            stage=h.get(STAGE, ""),
            error_class=h.get(ERROR_CLASS, ""),
            message=h.get(MESSAGE, ""),
            topic=h.get(TOPIC, ""),
            partition=int(h.get(PARTITION, "-1")),
            offset=int(h.get(OFFSET, "-1")),
            first_seen=datetime.fromisoformat(h[FIRST_SEEN]) if FIRST_SEEN in h else datetime.min,
            attempts=int(h.get(ATTEMPTS, "1")),
            key=key,
            value=value,
            kept_partition=int(h[KEPT_PARTITION]) if KEPT_PARTITION in h else None,
            kept_offset=int(h[KEPT_OFFSET]) if KEPT_OFFSET in h else None,
        )
