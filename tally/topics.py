"""Create the topics of DESIGN.md from settings; existing topics are left as they are."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from tally.settings import Settings


def create_topics(settings: Settings, timeout_s: float = 30.0) -> dict[str, str]:
    """Returns topic -> 'created' or 'exists'."""
    if settings.topic_min_insync_replicas > settings.topic_replication_factor:
        raise ValueError(f"TALLY_TOPIC_MIN_INSYNC_REPLICAS ({settings.topic_min_insync_replicas}) is above "
                         f"TALLY_TOPIC_REPLICATION_FACTOR ({settings.topic_replication_factor}): "
                         "no write could be acked")
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "socket.connection.setup.timeout.ms": 3000})
    specs = settings.topics.specs(
        events_partitions=settings.events_partitions,
        events_retention_ms=settings.events_retention_ms,
        counters_partitions=settings.counters_partitions,
        dlq_partitions=settings.dlq_partitions,
        dlq_retention_ms=settings.dlq_retention_ms,
    )
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=settings.topic_replication_factor,
                  config={**s.config, "min.insync.replicas": str(settings.topic_min_insync_replicas)})
         for s in specs],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    outcome = {}
    for name, future in futures.items():
        try:
            future.result()
            outcome[name] = "created"
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            outcome[name] = "exists"
    return outcome
