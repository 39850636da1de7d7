"""Read `tally.counters.v1` as a downstream service does: the latest state of every counter window.

The topic is compacted and each value is a window's absolute state with a revision that grows with
every committed update, so a reader starts from the earliest offset, keeps the state with the
highest revision per key and may see any state again without harm (a re-publication after a crash).

    reader = CounterReader("127.0.0.1:9092", tenant="acme", meter="events", window="day",
                           on_change=lambda state: print(state.subject, state.value))
    reader.start()                      # a background thread; or call reader.poll() yourself
    reader.wait_caught_up(timeout_s=30) # everything on the topic when it started has been read
    reader.get(key), list(reader)       # the latest states

It depends on `schemas` only.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from tally.schemas.counters import CounterState
from tally.schemas.topics import Topics

OnChange = Callable[[CounterState], None]


class CounterReader:
    def __init__(self, bootstrap: str, *, topic: str | None = None, tenant: str | None = None,
                 meter: str | None = None, window: str | None = None, on_change: OnChange | None = None,
                 consumer_config: dict[str, object] | None = None) -> None:
        self.topic = topic or Topics().counters
        self._filter = (tenant, meter, window)
        self._on_change = on_change
        # Every instance reads the whole topic itself: no group offsets are committed or shared.
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"tally-counter-reader-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "enable.partition.eof": True,
                                   "auto.offset.reset": "earliest",
                                   **(consumer_config or {})})
        partitions = self._consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        self._ends = {p: self._end_offset(p) for p in partitions}
        self._positions: dict[int, int] = {}
        self._states: dict[str, CounterState] = {}
        self._lock = threading.Lock()
        self._caught_up = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._check_caught_up()

    def get(self, key: str) -> CounterState | None:
        with self._lock:
            return self._states.get(key)

    def __iter__(self) -> Iterator[CounterState]:
        with self._lock:
            return iter(list(self._states.values()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def poll(self, timeout_s: float = 0.5) -> int:
        """Read what has arrived; returns how many states changed."""
        changed = 0
        for msg in self._consumer.consume(1000, timeout_s):
            if msg.error() is not None:
                continue  # end-of-partition markers and transient errors; librdkafka recovers by itself
            self._positions[msg.partition()] = msg.offset() + 1
            if msg.value() is None:
                continue  # a tombstone: nothing Tally publishes, nothing to keep
            state = CounterState.from_bytes(msg.value())
            if not self._wanted(state):
                continue
            with self._lock:
                current = self._states.get(state.key)
                if current is not None and current.revision >= state.revision:
                    continue
                self._states[state.key] = state
            changed += 1
            if self._on_change is not None:
                self._on_change(state)
        self._check_caught_up()
        return changed

    def wait_caught_up(self, timeout_s: float | None = None) -> bool:
        """True once every state on the topic when the reader started was read (needs start() or poll())."""
        if self._thread is None:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while not self._caught_up.is_set() and (deadline is None or time.monotonic() < deadline):
                self.poll(0.2)
        return self._caught_up.wait(timeout_s)

    def start(self) -> CounterReader:
        self._thread = threading.Thread(target=self._run, name="tally-counter-reader", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        self._consumer.close()

    def __enter__(self) -> CounterReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.poll(0.5)

    def _wanted(self, state: CounterState) -> bool:
        tenant, meter, window = self._filter
        return ((tenant is None or state.tenant == tenant) and (meter is None or state.meter == meter)
                and (window is None or state.window == window))

    def _end_offset(self, partition: int, timeout_s: float = 30.0) -> int:
        """The partition's high watermark; a topic created a moment ago may not have a leader yet."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=10)[1]
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _check_caught_up(self) -> None:
        if all(self._positions.get(p, 0) >= end for p, end in self._ends.items() if end > 0):
            self._caught_up.set()
