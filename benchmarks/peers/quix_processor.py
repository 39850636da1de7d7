"""The processor's job done with Quix Streams, as its documentation shows: an Application, a
StreamingDataFrame over the events topic, and a custom BatchingSink for PostgreSQL.

The sink dedups by (tenant, source, id), persists only new events and (with --count) adds them
to hourly and daily counters per subject and event type, as Tally's default `events` meter keeps
them, all in one transaction per batch; Quix commits offsets after the sink's flush, so redelivery
is absorbed by the dedup table as in Tally. It batches within Tally's own bounds: a checkpoint
every 0.2 s or 20,000 messages (Tally: batch_max_wait_ms=200, batch_max_messages=20000).

What it still does not do that Tally does: no counter outbox, no publication of counter states to
the compacted counter topic, no Redis counter cache, no envelope validation, accepted-types or
late-horizon check, and no dead-letter topic; it writes on one connection where Tally writes on two.

Runs in its own environment (benchmarks/.venv-quix): it pins its own confluent-kafka.
    python -m benchmarks.peers.quix_processor --bootstrap ... --topic ... --group ... --dsn ...
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from datetime import datetime, timezone

import psycopg
from quixstreams import Application
from quixstreams.sinks import BatchingSink, SinkBatch

SCHEMA = """
create table if not exists quix_event_keys (
    tenant text not null, source text not null, id text not null, primary key (tenant, source, id));
create table if not exists quix_events (like events including defaults);
create index if not exists quix_events_tenant_time on quix_events (tenant, time);
create index if not exists quix_events_tenant_type_time on quix_events (tenant, type, time);
create table if not exists quix_counters (
    tenant text not null, meter text not null, window_name text not null, window_start timestamptz not null,
    subject text not null, type text not null, value bigint not null,
    primary key (tenant, meter, window_name, window_start, subject, type));
"""

CLAIM = """
insert into quix_event_keys (tenant, source, id)
select * from unnest(%s::text[], %s::text[], %s::text[]) on conflict do nothing returning tenant, source, id
"""

COUNT = """
insert into quix_counters (tenant, meter, window_name, window_start, subject, type, value)
select t, 'events', w, s, j, y, v
from unnest(%s::text[], %s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::bigint[]) as u(t, w, s, j, y, v)
on conflict (tenant, meter, window_name, window_start, subject, type)
do update set value = quix_counters.value + excluded.value
"""

# Tally's batch bounds (tally/settings.py: batch_max_wait_ms, batch_max_messages)
COMMIT_INTERVAL_S = 0.2
COMMIT_EVERY = 20000

COPY = ("copy quix_events (tenant, source, id, type, subject, time, received_at, data, kafka_partition, kafka_offset)"
        " from stdin")


class PostgresEventsSink(BatchingSink):
    """Dedup, persist and count one partition's batch in a single PostgreSQL transaction."""

    def __init__(self, dsn: str, count: bool) -> None:
        super().__init__()
        self._dsn = dsn
        self._count = count
        self._conn: psycopg.Connection | None = None

    def setup(self) -> None:
        self._conn = psycopg.connect(self._dsn)
        with self._conn.transaction():
            self._conn.execute(SCHEMA)

    def write(self, batch: SinkBatch) -> None:
        assert self._conn is not None
        unique: dict[tuple[str, str, str], tuple[dict, int]] = {}
        for item in batch:
            event = item.value
            unique.setdefault((event["tenant"], event["source"], event["id"]), (event, item.offset))
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.execute(CLAIM, [list(column) for column in zip(*unique)])
            new = [unique[(r[0], r[1], r[2])] for r in cur.fetchall()]
            with cur.copy(COPY) as copy:
                for event, offset in new:
                    copy.write_row((event["tenant"], event["source"], event["id"], event["type"],
                                    event.get("subject"), event["time"], event["received_at"],
                                    json.dumps(event.get("data")), batch.partition, offset))
            if self._count and new:
                windows = Counter((e["tenant"], name, start, e.get("subject") or "", e["type"])
                                  for e, _ in new for name, start in windows_of(e["time"]))
                cur.execute(COUNT, [*(list(column) for column in zip(*windows)), list(windows.values())])


def windows_of(timestamp: str) -> tuple[tuple[str, datetime], tuple[str, datetime]]:
    hour = datetime.fromisoformat(timestamp).astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    return ("hour", hour), ("day", hour.replace(hour=0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--count", action="store_true", help="also keep hourly and daily counters of new events")
    args = parser.parse_args()

    app = Application(broker_address=args.bootstrap, consumer_group=args.group, auto_offset_reset="earliest",
                      commit_interval=COMMIT_INTERVAL_S, commit_every=COMMIT_EVERY)
    topic = app.topic(args.topic, value_deserializer="json")
    sdf = app.dataframe(topic)
    sdf.sink(PostgresEventsSink(args.dsn, args.count))
    app.run()


if __name__ == "__main__":
    main()
