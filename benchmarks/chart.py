"""The run's chart: end-to-end throughput, latency over time, and the processor drains side by side.

Runs in benchmarks/.venv (matplotlib): python -m benchmarks.chart out/results.json results.png
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend is chosen first


def rates(series: list[list[float]], column: int) -> tuple[list[float], list[float]]:
    """Per-interval rate of a cumulative column, at each interval's end."""
    times, values = [], []
    for before, after in zip(series, series[1:]):
        span = after[0] - before[0]
        if span > 0:
            times.append(after[0])
            values.append((after[column] - before[column]) / span)
    return times, values


def k6_p99(path: Path) -> tuple[list[float], list[float]]:
    """p99 of http_req_duration per second from k6's CSV output."""
    per_second: dict[int, list[float]] = defaultdict(list)
    if path.exists():
        with path.open() as f:
            for row in csv.DictReader(f):
                if row["metric_name"] == "http_req_duration":
                    per_second[int(float(row["timestamp"]))].append(float(row["metric_value"]))
    seconds = sorted(per_second)
    return [float(s) for s in seconds], [sorted(v)[min(len(v) - 1, int(len(v) * 0.99))] for v in
                                         (per_second[s] for s in seconds)]


def draw(results: dict[str, Any], out: Path, k6_dir: Path) -> None:
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(11, 11))
    e2e = results.get("e2e", {})
    series = e2e.get("series") or []
    t0 = series[0][0] if series else 0.0

    def shift(times: list[float]) -> list[float]:
        return [t - t0 for t in times]

    if series:
        t, accepted = rates(series, 1)
        top.plot(shift(t), accepted, label="accepted by the gateway (Kafka acks)")
        t, processed = rates(series, 2)
        top.plot(shift(t), processed, label="processed (offsets committed after PostgreSQL)")
        lag = top.twinx()
        lag.plot(shift([s[0] for s in series]), [s[1] - s[2] for s in series], color="grey", linestyle=":",
                 label="consumer lag")
        lag.set_ylabel("lag (events)")
        lag.legend(loc="upper right")
    top.set_title(f"End to end ({e2e.get('processors', 1)} processor(s), batches of {e2e.get('batch_size', '?')})")
    top.set_ylabel("events/s")
    top.set_xlabel("seconds")
    top.legend(loc="upper left")

    for name, label in (("e2e_max", "HTTP p99, highest rate"), ("e2e_fixed", "HTTP p99, 5,000 events/s")):
        t, p99 = k6_p99(k6_dir / f"k6-{name}.csv")
        middle.plot(shift(t), p99, label=label)
    for key, label in (("max_latency", "receipt to commit p99, highest rate"),
                       ("fixed_latency", "receipt to commit p99, 5,000 events/s")):
        rows = (e2e.get(key) or {}).get("series") or []
        middle.plot(shift([r[0] for r in rows]), [r[3] for r in rows], linestyle="--", label=label)
    middle.set_yscale("log")
    middle.set_ylabel("ms (log)")
    middle.set_xlabel("seconds")
    middle.set_title("Latency over time")
    middle.legend(loc="upper left", fontsize="small")

    processor = results.get("processor", {})
    for name, label in (("tally_x1", "Tally, 1 processor"), ("tally_x2", "Tally, 2 processors"),
                        ("quix", "Quix Streams peer")):
        drain = processor.get(name)
        if drain:
            bottom.plot([s[0] for s in drain["series"]], [s[1] for s in drain["series"]],
                        label=f"{label}: {drain['overall_events_s']:,.0f} events/s with start-up")
    bottom.set_title(f"Processor drain of {processor.get('loaded', {}).get('messages', 0):,} events "
                     "(10% duplicates): offsets committed")
    bottom.set_ylabel("events")
    bottom.set_xlabel("seconds since start")
    bottom.legend(loc="lower right")

    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> None:
    results_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    # The last run's figures: its k6 files are the ones left in out/ (each run overwrites them).
    results = json.loads(results_path.read_text())["runs"][-1]
    only = results.get("args", {}).get("only")
    if only and not {"processor", "e2e"} & set(only):
        print("chart: this run has no drains or end-to-end series; the picture is left as it was")
        return
    draw(results, out, results_path.parent)


if __name__ == "__main__":
    main()
