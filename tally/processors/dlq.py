"""Dead letters: build them from poison messages, and list, show and replay the dead-letter topic.

Replay puts the original key, value and headers back on the original topic with the letter's
history (first seen, attempts) attached; dedup makes a repeated replay harmless.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from tally.schemas.deadletter import CONFLICT_STAGE, PREFIX, REPLAY_ATTEMPTS, REPLAY_FIRST_SEEN, DeadLetter
from tally.sinks.kafka import KafkaPublisher


def dead_letter(msg: Message, stage: str, error_class: str, message: str, now: datetime,
                kept: tuple[int, int] | None = None) -> DeadLetter:
    """A letter for `msg` with its key, value and headers (but any old `tally.dlq.*` reason)."""
    original = tuple((name, value or b"") for name, value in msg.headers() or [] if not name.startswith(PREFIX))
    attempts, first_seen = _history(dict(original), now)
    kept_partition, kept_offset = kept if kept is not None else (None, None)
    return DeadLetter(stage, error_class, message, msg.topic(), msg.partition(), msg.offset(), first_seen,
                      attempts, msg.key(), msg.value(), kept_partition, kept_offset, original)


def _history(headers: dict[str, bytes], now: datetime) -> tuple[int, datetime]:
    """Attempts and first sighting from a replayed message's headers; a garbled header starts the history
    afresh rather than stopping the processor (only a producer other than `tally dlq replay` writes one)."""
    try:
        attempts = int(headers.get(REPLAY_ATTEMPTS, b"0")) + 1
    except ValueError:
        attempts = 1
    try:
        first_seen = datetime.fromisoformat(headers[REPLAY_FIRST_SEEN].decode()) if REPLAY_FIRST_SEEN in headers else now
    except (ValueError, UnicodeDecodeError):
        first_seen = now
    return attempts, first_seen


def conflict_letter(msg: Message, kept_partition: int, kept_offset: int, now: datetime) -> DeadLetter:
    """A copy of an event whose id was kept with other content: reported, never stored or counted."""
    return dead_letter(msg, CONFLICT_STAGE, "IdReusedWithOtherContent",
                       f"event id already kept with other content: the copy at {msg.topic()}[{kept_partition}]"
                       f"@{kept_offset} is kept; this copy at [{msg.partition()}]@{msg.offset()} is not stored"
                       " or counted", now, (kept_partition, kept_offset))


@dataclass(frozen=True)
class Letter:
    """A dead letter and where it sits in the dead-letter topic."""

    partition: int
    offset: int
    letter: DeadLetter
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class Selection:
    stage: str | None = None
    error_class: str | None = None
    partition: int | None = None
    offset: int | None = None

    def __call__(self, letter: Letter) -> bool:
        return ((self.stage is None or letter.letter.stage == self.stage)
                and (self.error_class is None or letter.letter.error_class == self.error_class)
                and (self.partition is None or letter.partition == self.partition)
                and (self.offset is None or letter.offset == self.offset))


def read_letters(bootstrap: str, topic: str, timeout_s: float = 30.0) -> Iterator[Letter]:
    """Every letter up to the high watermarks seen at the start, so a replay never chases its own tail."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"tally-dlq-reader-{time.monotonic_ns()}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        if not ends:
            return
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        done: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(done) < len(ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took longer than {timeout_s}s")
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is not None or msg.partition() in done:
                    continue
                headers = list(msg.headers() or [])
                yield Letter(msg.partition(), msg.offset(), DeadLetter.from_message(headers, msg.key(), msg.value()),
                             headers)
                if msg.offset() + 1 >= ends[msg.partition()]:
                    done.add(msg.partition())
                    deadline = time.monotonic() + timeout_s
    finally:
        consumer.close()


def summary_line(letter: Letter) -> str:
    d = letter.letter
    return (f"{letter.partition}:{letter.offset}  {d.first_seen:%Y-%m-%d %H:%M:%S}  {d.stage:8} {d.error_class:18} "
            f"x{d.attempts}  {d.topic}[{d.partition}]@{d.offset}  {d.message[:80]}")


def detail(letter: Letter) -> str:
    d = letter.letter
    lines = [f"dead letter {letter.partition}:{letter.offset}",
             *(f"  {name}: {value.decode(errors='replace')}" for name, value in letter.headers),
             f"  key: {d.key.decode(errors='replace') if d.key is not None else '<none>'}"]
    if d.value is None:
        lines.append("  value: <none>")
    else:
        try:
            lines.append("  value:\n" + orjson.dumps(orjson.loads(d.value), option=orjson.OPT_INDENT_2).decode())
        except orjson.JSONDecodeError:
            lines.append(f"  value (not JSON): {d.value[:2000]!r}")
    return "\n".join(lines)


def replay(letters: list[Letter], publisher: KafkaPublisher, progress: Callable[[int, int], None],
           every: int = 1000) -> int:
    """Re-publish letters to their original topics; returns how many were acked."""
    total = len(letters)
    for n, item in enumerate(letters, 1):
        d = item.letter
        headers = [(k, v) for k, v in item.headers if not k.startswith(PREFIX) and not k.startswith("tally.replay.")]
        headers += [(REPLAY_FIRST_SEEN, d.first_seen.isoformat().encode()), (REPLAY_ATTEMPTS, str(d.attempts).encode())]
        publisher.produce(d.topic, d.key, d.value, headers)
        if n % every == 0:
            publisher.flush()
            progress(n, total)
    publisher.flush()
    progress(total, total)
    return total
