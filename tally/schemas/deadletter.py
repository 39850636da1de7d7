"""Dead letters: the original message, unchanged, with headers that say why it could not be processed.

The key, value and headers of a dead letter are the original message's, so `tally dlq replay` can
put it back on its source topic as it was; the reason travels only in `tally.dlq.*` headers. A
letter too large for the dead-letter topic keeps only the start of the value and says so in
`tally.dlq.truncated_from`; its topic, partition and offset point at the whole original.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
# Only on a letter whose value was cut to fit the topic: the original value's length in bytes.
TRUNCATED_FROM = PREFIX + "truncated_from"

CONFLICT_STAGE = "conflict"
STORE_STAGE = "store"  # PostgreSQL refused the event alone (docs/adr/0015)

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
    original_headers: tuple[tuple[str, bytes], ...] = ()
    truncated_from: int | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        kept = [] if self.kept_partition is None else [
            (KEPT_PARTITION, str(self.kept_partition).encode()), (KEPT_OFFSET, str(self.kept_offset).encode())]
        if self.truncated_from is not None:
            kept.append((TRUNCATED_FROM, str(self.truncated_from).encode()))
        return [*self.original_headers] + kept + [
            (STAGE, self.stage.encode()),
            (ERROR_CLASS, self.error_class.encode()),
            (MESSAGE, self.message[:MAX_MESSAGE].encode()),
            (TOPIC, self.topic.encode()),
            (PARTITION, str(self.partition).encode()),
            (OFFSET, str(self.offset).encode()),
            (FIRST_SEEN, self.first_seen.isoformat().encode()),
            (ATTEMPTS, str(self.attempts).encode()),
        ]

    def wire_size(self) -> int:
        """Key, value and headers in bytes, with each header's own overhead (what a producer limits)."""
        return (len(self.key or b"") + len(self.value or b"")
                + sum(len(name) + len(value) + _HEADER_OVERHEAD for name, value in self.headers()))

    def fitted(self, limit: int) -> "DeadLetter":
        """This letter, or one whose value is cut so that its wire size stays within `limit`."""
        excess = self.wire_size() - limit
        if excess <= 0:
            return self
        cut = replace(self, original_headers=self.original_headers if excess < len(self.value or b"") else (),
                      truncated_from=len(self.value or b""))
        room = max(0, limit - (cut.wire_size() - len(cut.value or b"")) - _HEADER_OVERHEAD)
        return replace(cut, value=(self.value or b"")[:room])

    def pointer(self) -> "DeadLetter":
        """The letter with no key, value or original headers: only the reason and where the original is."""
        whole = self.truncated_from if self.truncated_from is not None else len(self.value or b"")
        return replace(self, key=None, value=None, original_headers=(), truncated_from=whole)

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
            original_headers=tuple((name, raw) for name, raw in headers or [] if not name.startswith(PREFIX)),
            truncated_from=int(h[TRUNCATED_FROM]) if TRUNCATED_FROM in h else None,
        )


_HEADER_OVERHEAD = 10  # varint lengths of a header's name and value, generously
