"""Which failures of a write are the data's fault (poison) and which are the environment's (outages).

An outage passes: the write is retried until it succeeds. Poison never passes: the same records fail
the same way however often they are written, so retrying them stops a member for good. The sinks
isolate the records that cause it and hand them back for the dead-letter topic (docs/adr/0015).
"""

from __future__ import annotations

import asyncpg
import orjson
from confluent_kafka import KafkaError

# SQLSTATE classes caused by the values written: data exception (22), integrity constraint violation (23),
# syntax error or access rule violation (42), program limit exceeded (54: an index row too large).
_POISON_SQLSTATE_CLASSES = ("22", "23", "42", "54")
# Class 42 codes that mean the deployment is wrong, not the data (a table, column or function missing, no
# privilege, an ON CONFLICT target no key matches: code older than the schema, docs/adr/0157): every record would
# fail, so they are outages that an operator fixes.
_DEPLOYMENT_SQLSTATES = frozenset({"42501", "42P01", "42703", "42704", "42883", "42P10"})
# Python errors that only a value can cause while a record is turned into rows.
_POISON_ERRORS = (orjson.JSONEncodeError, OverflowError, UnicodeError)


def is_poison(exc: BaseException) -> bool:
    """True when writing the same records again can never succeed."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] in _POISON_SQLSTATE_CLASSES and state not in _DEPLOYMENT_SQLSTATES
    return isinstance(exc, _POISON_ERRORS)


def is_poison_kafka_error(error: KafkaError) -> bool:
    """A produce error about the message itself (too large, invalid), as opposed to the broker being away."""
    return error.code() in _POISON_KAFKA_CODES


# Refused for what the message is, by librdkafka before sending or by the broker; resending cannot help.
_POISON_KAFKA_CODES = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_MSG, KafkaError.INVALID_RECORD,
    KafkaError.RECORD_LIST_TOO_LARGE,
})
