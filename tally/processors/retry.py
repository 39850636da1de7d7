"""Backoff for failures that pass: exponential with jitter (tenacity), for as long as it takes.

Every failure that reaches here is retried: poison was set aside in step 1, and what step 1 did
not foresee is isolated by the sinks themselves (a PostgreSQL share is bisected down to the record
it refuses, a dead letter too large is cut to fit; sinks.errors tells the two apart). What fails
now is the environment, and giving up would drop data. The caller's sleep keeps the consumer alive in the group while it
waits, and raises Abandoned when the batch must be given up (shutdown, partitions revoked).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from tally.sinks.kafka import PublishError
from tally.sinks.postgres import StaleCatalog

log = logging.getLogger("tally.processor.retry")

# SQLSTATE classes that pass: connection exception, transaction rollback (deadlock, serialization),
# insufficient resources, object in use (lock_timeout), operator intervention (shutdown, statement
# timeout), system error.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "55", "57", "58")


class Abandoned(Exception):
    """The in-flight batch is given up without committing; Kafka will deliver it again."""


def is_transient(exc: BaseException) -> bool:
    """Expected outages; anything else is retried too, but logged with its traceback."""
    if isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError, PublishError, StaleCatalog)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False


def retrying(
    what: str,
    sleep: Callable[[float], Awaitable[None]],
    on_retry: Callable[[str], None],
    initial_s: float,
    max_s: float,
) -> AsyncRetrying:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        on_retry(what)
        if exc is not None and not is_transient(exc):
            log.error("%s failed (attempt %d), retrying", what, state.attempt_number, exc_info=exc)
        else:
            log.warning("%s failed (attempt %d), retrying: %r", what, state.attempt_number, exc)

    return AsyncRetrying(
        wait=wait_exponential_jitter(initial=initial_s, max=max_s),
        retry=retry_if_exception(lambda exc: not isinstance(exc, Abandoned)),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
