"""The backfill decides from Kafka which stored events a new meter version must count: the processors' committed
offsets and the end offsets of the events topic. A topic Kafka does not know (a wrong TALLY_TOPIC_PREFIX, a topic
deleted) has no partitions in its metadata; read as "no partitions", a waiting version without starts looked ready
and was marked done having counted nothing, so its meter would miss the whole past for good."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from tally.settings import Settings
from tally.sinks.kafka import TopicUnknown, caught_up, committed, high_watermarks
from tests.metering.helpers import run_tally
from tests.metering.meters_helpers import DEFINITIONS, new_version


def test_offsets_of_a_topic_kafka_does_not_know_are_an_error(isolated: Settings) -> None:
    missing = f"{isolated.topic_prefix}nowhere.v1"
    bootstrap, group = isolated.kafka_bootstrap, isolated.consumer_group
    for read in (lambda: committed(bootstrap, group, missing), lambda: high_watermarks(bootstrap, missing),
                 lambda: caught_up(bootstrap, group, missing)):
        with pytest.raises(TopicUnknown, match=missing):
            read()


async def test_a_backfill_whose_events_topic_is_missing_fails_and_its_version_keeps_waiting(
        isolated: Settings, db: asyncpg.Connection) -> None:
    gone = isolated.model_copy(update={"topic_prefix": f"{isolated.topic_prefix}gone.", "jobs_metrics_port": 0})
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    vid = await new_version(db, tenant, "calls", 1, DEFINITIONS["calls"])

    code, out = run_tally(["jobs", "run", "meters_backfill"], gone)

    assert code != 0, out
    assert gone.topics.events in out, out
    row = await db.fetchrow("select state, counted from meter_backfills where tenant = $1 and version_id = $2",
                            tenant, vid)
    assert (row["state"], row["counted"]) == ("waiting", 0)
    assert not await db.fetchval("select count(*) from meter_starts where tenant = $1", tenant)
