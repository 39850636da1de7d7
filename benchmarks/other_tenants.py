"""The processor's meter work per batch with 0, 1, 10 and 100 meters defined for other tenants, side by side
(issue 21): validation checks and the counter fold of a 20,000-event batch of one tenant, through LiveMeters.
CPU only, no services: what other tenants' meters add to a drain is this work and nothing else.

    python -m benchmarks.other_tenants [--seconds 3]
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone

from tally.meters.catalog import MeterVersion, meter_of
from tally.meters.definitions import DEFAULT_METERS
from tally.meters.live import LiveMeters
from tally.processors.decode import decode
from tally.schemas.envelope import Envelope
from tally.sinks.base import Record


def _records(n: int) -> list[Record]:
    now = datetime.now(timezone.utc)
    return [Record(decode(Envelope(id=f"e{i}", source="bench", type="api.call", subject=f"c{i % 50}", time=now,
                                   received_at=now, data={"ms": i % 97}, tenant="drained").to_bytes()), i % 4, i, True)
            for i in range(n)]


def _live(others: int) -> LiveMeters:
    live = LiveMeters(DEFAULT_METERS)
    versions: dict[str, list[MeterVersion]] = {}
    for i in range(others):
        tenant = f"other-{i}"
        meter = meter_of(f"m{i}", 1, {"event_type": "api.*", "aggregation": "SUM", "value_path": "data.ms"})
        versions[tenant] = [MeterVersion(tenant, i + 1, meter.slug, 1, meter, "", "", datetime.now(timezone.utc))]
    live.catalog._versions = versions  # as a refresh leaves it; no database in this figure
    live.catalog.revision = 1
    live._own = frozenset(versions)
    live.check = live._check if versions else live.base.check
    return live


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    records = _records(20_000)
    print("meters of other tenants | events/s (check + fold)")
    for others in (0, 1, 10, 100):
        live = _live(others)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.seconds:
            check = live.check
            for r in records:
                check(r.envelope)
            live.aggregate(records)
            done += len(records)
        print(f"{others:>23} | {done / (time.perf_counter() - started):,.0f}")


if __name__ == "__main__":
    main()
