"""Topic names and settings of DESIGN.md; a prefix keeps test runs apart on a shared broker."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


class _Name:
    """A topic's name under the `Topics` prefix: `Topics("test-").events` is "test-tally.events.v1"."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, topics: Topics, _owner: type) -> str:
        return f"{topics.prefix}{self.name}"


@dataclass(frozen=True)
class Topics:
    prefix: str = ""

    events = _Name("tally.events.v1")
    counters = _Name("tally.counters.v1")
    alerts = _Name("tally.alerts.v1")
    dlq = _Name("tally.dlq.v1")

    def specs(
        self,
        *,
        events_partitions: int,
        events_retention_ms: int,
        counters_partitions: int,
        dlq_partitions: int,
        dlq_retention_ms: int,
    ) -> list[TopicSpec]:
        """Counters are compacted (the latest absolute value per window wins); the rest expire by time."""
        return [
            TopicSpec(self.events, events_partitions, {"retention.ms": str(events_retention_ms)}),
            TopicSpec(
                self.counters,
                counters_partitions,
                {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": "3600000"},
            ),
            TopicSpec(self.alerts, 1, {"retention.ms": str(events_retention_ms)}),
            TopicSpec(self.dlq, dlq_partitions, {"retention.ms": str(dlq_retention_ms)}),
        ]
