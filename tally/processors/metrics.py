"""Prometheus metrics of the processor, served on the processor's metrics port (tally/running.py)."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable
from datetime import datetime

from prometheus_client import Counter, Gauge, Histogram

CONSUMED = Counter("tally_processor_consumed_total", "Messages consumed from the events topic")
PERSISTED = Counter("tally_processor_persisted_total", "New events persisted to PostgreSQL")
DUPLICATES = Counter("tally_processor_duplicates_total", "Events recognised as duplicates and skipped")
DEAD_LETTERED = Counter("tally_processor_dead_lettered_total", "Messages sent to the dead-letter topic",
                        ["stage", "error_class"])
LATE = Counter("tally_processor_late_events_total", "Events older than the late horizon: stored, not counted")
COUNTERS_PUBLISHED = Counter("tally_processor_states_published_total", "Counter states acked by the topic")
RETRIES = Counter("tally_processor_retries_total", "Retries of a failed step", ["step"])
ABANDONED = Counter("tally_processor_batches_abandoned_total", "Batches given up uncommitted", ["reason"])
COMMIT_FAILURES = Counter("tally_processor_commit_failures_total", "Offset commits that failed for good")
BATCH_SIZE = Histogram("tally_processor_batch_size", "Messages per batch",
                       buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000))
BATCH_SECONDS = Histogram("tally_processor_batch_duration_seconds", "Time from consume to offset commit")
COMMIT_SECONDS = Histogram("tally_processor_commit_latency_seconds", "Time to commit offsets",
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
END_TO_END_SECONDS = Histogram("tally_processor_end_to_end_seconds", "Gateway receipt to offset commit",
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
OUTBOX_BACKLOG = Gauge("tally_processor_outbox_backlog", "Counter windows queued in the outbox and not yet published "
                       "to the counter topic (counted up to 100000; every member reads the same table)")
LAG = Gauge("tally_processor_consumer_lag", "High watermark minus committed offset", ["topic", "partition"])


def observe_end_to_end(committed_at: datetime, received: Iterable[datetime]) -> None:
    """END_TO_END_SECONDS for every new event of a batch, one update per distinct receipt time (a batch's
    events share a few: the gateway stamps a whole request with one)."""
    for received_at, events in Tally(received).items():
        observe_many(END_TO_END_SECONDS, (committed_at - received_at).total_seconds(), events)


def observe_many(histogram: Histogram, amount: float, times: int) -> None:
    """`histogram.observe(amount)` `times` times, in two updates: the bucket `observe` picks (the first
    upper bound not below the amount) and the sum. prometheus_client has no call for it."""
    histogram._sum.inc(amount * times)
    histogram._buckets[bisect_left(histogram._upper_bounds, amount)].inc(times)

