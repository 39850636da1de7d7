"""Test hook: kill the process with SIGKILL at a named point of a batch (TALLY_CRASH_AT).

Tests use it to prove that a crash between the steps of a batch loses nothing and counts
nothing twice. Points: after_share_commit (one of a batch's PostgreSQL transactions committed, the
others possibly not), after_pg_commit (counters committed, nothing published), mid_relay (inside the
outbox relay's loop: states acked by Kafka, their outbox rows not yet deleted), after_publish
(counters and dead letters acked, offsets not committed). The billing jobs take the same hook
(`tally/wiring.py` wires it): report_before_send (a Stripe report row written, not sent) and
report_after_send (sent, not yet marked sent), the meter backfill's backfill_mid_chunk (a chunk's counters written,
not committed) and backfill_after_chunk (a chunk committed); and `tally alerts`: alerts_after_commit (transitions committed, not
published) and alerts_mid_publish (acked by Kafka, not yet marked published). Unset in production.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_share_commit", "after_pg_commit", "mid_relay", "after_publish")


def crash_point(name: str, armed: str) -> None:
    if armed and armed == name:
        os.kill(os.getpid(), signal.SIGKILL)
