"""Transitions the active evaluator cannot publish (the alerts topic is gone) show on its /metrics as
tally_alerts_outbox_backlog, and the gauge falls to zero once the topic takes them."""

from __future__ import annotations

import asyncpg
from confluent_kafka.admin import AdminClient

from tally.settings import Settings
from tally.topics import create_topics
from tests.processor.helpers import wait_for
from tests.support import free_port, running, wait_until
from tests.tally_stack import sample

GAUGE = "tally_alerts_outbox_backlog"
_TRANSITION = """
insert into alert_transitions (tenant, rule_id, rule_name, group_key, grp, kind, value, threshold, comparison, window_s,
                               fired_at)
select $1, 'r1', 'errors', 'g' || n, '{}', 'firing', 5, 1, '>', 60, now() from generate_series(1, 3) n
"""


async def test_transitions_left_unpublished_show_in_the_backlog_gauge(isolated: Settings,
                                                                      db: asyncpg.Connection) -> None:
    port = free_port()
    settings = isolated.model_copy(update={"alerts_metrics_port": port})
    url = f"http://127.0.0.1:{port}/metrics"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.delete_topics([settings.topics.alerts])[settings.topics.alerts].result(30)  # nothing can be published
    unpublished = "select count(*) from alert_transitions where published_at is null"
    with running("alerts", ["alerts"], settings):
        wait_until(lambda: sample(url, "tally_alerts_leader") == 1, 60, 0.2, "the active evaluator")
        await db.execute(_TRANSITION, f"t-{settings.consumer_group[-8:]}")

        async def shown() -> bool:
            value = sample(url, GAUGE)
            return value is not None and value >= 3 and value == await db.fetchval(unpublished)

        await wait_for(shown, 60, f"{GAUGE} to show the unpublished transitions")

        create_topics(settings)  # the topic is back: the next round publishes them

        wait_until(lambda: sample(url, GAUGE) == 0, 180, 0.5, f"{GAUGE} to fall to 0 once published")
    assert await db.fetchval(unpublished) == 0
