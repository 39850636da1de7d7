"""`bash benchmarks/run.sh --scale-out [--seconds N] [--events N] [--rounds N]`: Tally past one broker
and one processor, in one run on an isolated slice of the running services (benchmarks/stack.py).

- Brokers, side by side: a gateway (acks=all) and one processor on the single broker (topics with
  replication factor 1) and on the three brokers of deploy/local/kafka-cluster.sh (replication factor
  3, min.insync.replicas 2), in alternating order over --rounds. This process posts batches of 100
  for --seconds, then the processor drains: events/s acked, request p50/p99, events/s from the
  first post to the last commit, and CPU µs per accepted event of every process.
- Members: 1, 2 and 4 processors join a new group on a new events topic of 12 partitions; once
  they share the partitions, --events events (10% duplicates) are loaded and drained: the drain
  rate, and per member the events it consumed and its CPU µs per event. A member beyond the
  partition count would get none.

CPU comes from /proc per process (benchmarks/cpu.py); it is the figure that carries to a machine
with more cores, and the projection is made from it. Starts the cluster when it is not running and
stops it again afterwards. Writes benchmarks/out/scale-out.json and the scale-out section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

import httpx
from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient

from benchmarks import kafka_bench, pg_bench
from benchmarks.cpu import CpuMeter, listener_pid, process_seconds
from benchmarks.harness import UNLIMITED
from benchmarks.report import fill, fmt, loaded, machine_load
from benchmarks.stack import OUT, TALLY, Bench, Service, free_port
from tally.settings import ROOT, Settings

CLUSTER = ROOT / "deploy" / "local" / "kafka-cluster.sh"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BATCH = 100
SENDERS = 8  # batches in flight at once
MEMBERS = (1, 2, 4)
PARTITIONS = 12


def cluster(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER), command], capture_output=True, text=True, timeout=600)


def brokers(bootstrap: str) -> list[int]:
    """The broker processes behind a bootstrap list, found by their listening ports."""
    return [pid for address in bootstrap.split(",") if (pid := listener_pid(int(address.rsplit(":", 1)[1])))]


def meter(bench: Bench, groups: dict[str, list[int]]) -> CpuMeter:
    """CPU of these processes, the run's PostgreSQL backends and this process (the load generator)."""
    return CpuMeter({name: (lambda pids=pids: pids) for name, pids in {**groups, "load_gen": [os.getpid()]}.items()},
                    bench.base.database_url, bench.db_name, load_generator=False)


async def post(url: str, key: str, run: str, seconds: float) -> dict[str, Any]:
    """Batches of BATCH single-subject events from SENDERS senders for `seconds`; 202s counted by item."""
    latencies: list[float] = []
    accepted = failed = 0
    stop = time.monotonic() + seconds

    async def sender(n: int) -> None:
        nonlocal accepted, failed
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            i = 0
            while time.monotonic() < stop:
                batch = [{"specversion": "1.0", "id": f"{run}-{n}-{i}-{j}", "source": "bench/scale-out",
                          "type": "api.request", "subject": f"customer-{(i * BATCH + j) % 500}",
                          "data": {"tokens": 1 + j % 50}} for j in range(BATCH)]
                i += 1
                began = time.perf_counter()
                response = await client.post("/v1/events/batch", json=batch)
                latencies.append(time.perf_counter() - began)
                if response.status_code == 202:
                    body = response.json()
                    accepted += body["accepted"]
                    failed += body["failed"]
                else:
                    failed += BATCH

    began = time.monotonic()
    await asyncio.gather(*(sender(n) for n in range(SENDERS)))
    elapsed = time.monotonic() - began
    latencies.sort()
    return {"accepted": accepted, "failed": failed, "seconds": elapsed, "events_s": accepted / elapsed,
            "requests": len(latencies), "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)]}


async def drained(lag: kafka_bench.Lag, timeout_s: float) -> float | None:
    """The time the group had committed everything on its topic, or None past the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        end, committed = await asyncio.to_thread(lag.sample)
        if committed >= end:
            return time.monotonic()
        await asyncio.sleep(0.2)
    return None


async def through_gateway(bench: Bench, name: str, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """A gateway and one processor on these settings' brokers: post for --seconds, then drain."""
    bench.topics(settings)
    await pg_bench.clear(settings.database_url)
    gateway = bench.gateway(settings, f"gateway-{name}", **UNLIMITED)
    processor = bench.processor(settings, f"processor-{name}")
    lag = kafka_bench.Lag(settings.kafka_bootstrap, settings.consumer_group, settings.topics.events)
    cpu = meter(bench, {"gateway": [gateway.process.pid], "processor": [processor.process.pid],
                        "kafka": brokers(settings.kafka_bootstrap)})
    try:
        before = await cpu.snapshot()
        began = time.monotonic()
        load = await post(f"http://127.0.0.1:{gateway.port}", bench.key, f"{bench.run}-{name}", args.seconds)
        done = await drained(lag, args.drain_timeout)
        figures = CpuMeter.per_event(before, await cpu.snapshot(), load["accepted"])
    finally:
        lag.close()
        bench.stop(gateway)
        bench.stop(processor)
    check = await pg_bench.verify(settings.database_url, load["accepted"]) if done else {"exact": False}
    return {**load, "drained": done is not None, "end_to_end_events_s": load["accepted"] / (done - began) if done
            else None, "cpu_us_per_event": figures, "check": check}


def consumed(port: int) -> int:
    """Messages a processor took from the events topic, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        for line in page.read().decode().splitlines():
            if line.startswith("tally_processor_consumed_total "):
                return int(float(line.split()[1]))
    return 0


def joined(settings: Settings, count: int, timeout_s: float) -> None:
    """Until the group is stable with `count` members sharing the partitions evenly: the cooperative
    rebalances of members joining one by one are over before the events come."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        group = admin.describe_consumer_groups([settings.consumer_group])[settings.consumer_group].result(10)
        shares = [len(m.assignment.topic_partitions) for m in group.members]
        if (group.state == ConsumerGroupState.STABLE and len(shares) == count and sum(shares) == PARTITIONS
                and max(shares) - min(shares) <= 1):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{count} processors did not share the {PARTITIONS} partitions within {timeout_s:.0f}s")


async def members(bench: Bench, count: int, args: argparse.Namespace) -> dict[str, Any]:
    """`count` processors join a group on an empty topic of PARTITIONS partitions; then --events events are
    loaded and drained: the rate from the first produce to the last commit, and per member its events and
    CPU over that time (start-up excluded)."""
    settings = bench.scoped(f"m{count}", events_partitions=PARTITIONS)
    bench.topics(settings)
    await pg_bench.clear(settings.database_url)
    ports = [free_port() for _ in range(count)]
    started: list[Service] = [bench.start(f"member-{count}-{i}", [*TALLY, "process"], settings,
                                          TALLY_PROCESSOR_METRICS_PORT=str(port)) for i, port in enumerate(ports)]
    lag = kafka_bench.Lag(settings.kafka_bootstrap, settings.consumer_group, settings.topics.events)
    try:
        await asyncio.to_thread(joined, settings, count, 180)
        before = {s.name: process_seconds(s.process.pid) or 0.0 for s in started}
        began = time.monotonic()
        loaded = await asyncio.to_thread(kafka_bench.load, settings.kafka_bootstrap, settings.topics.events,
                                         f"{bench.run}-m{count}", args.events, 0.1)
        done = await drained(lag, args.drain_timeout)
        seconds = {s.name: (process_seconds(s.process.pid) or 0.0) - before[s.name] for s in started}
        taken = {s.name: consumed(port) for s, port in zip(started, ports, strict=True)}
    finally:
        lag.close()
        for service in started:
            bench.stop(service)
    check = await pg_bench.verify(settings.database_url, loaded.distinct) if done else {"exact": False}
    elapsed = (done or time.monotonic()) - began
    per_member = [{"name": name, "consumed": taken[name], "cpu_s": seconds[name],
                   "cpu_us_per_event": seconds[name] * 1e6 / taken[name] if taken[name] else None}
                  for name in seconds]
    return {"members": count, "loaded": loaded.messages, "drained": done is not None, "seconds": elapsed,
            "events_s": loaded.messages / elapsed, "cpu_us_per_event": sum(seconds.values()) * 1e6 / loaded.messages,
            "per_member": per_member, "check": check}


def projection(us_per_event: float, processor_us: float) -> list[str]:
    """Events/s on N cores if CPU per event stays as measured and the work spreads evenly."""
    lines = ["| cores | events/s end to end (all processes) | of which processors need (members, at most "
             f"{PARTITIONS} on {PARTITIONS} partitions) |", "|---:|---:|---|"]
    for cores in (2, 4, 8, 16, 32):
        rate = cores * 1e6 / us_per_event
        needed = rate * processor_us / 1e6
        cap = ("" if round(needed, 1) <= PARTITIONS
               else f" — more than {PARTITIONS}: create the topic with more partitions")
        lines.append(f"| {cores} | {rate:,.0f} | {needed:.1f} cores{cap} |")
    return lines


def cpu_text(figures: dict[str, float | None]) -> str:
    return " · ".join(f"{name} {value:,.0f}" for name, value in figures.items() if value is not None)


def report(results: dict[str, Any], command: str) -> list[str]:
    loads = results["load_average"]
    lines = [f"`{command}` at {results['revision']}, {results['cpus']} cores, " + machine_load(loads, results["cpus"])
             + ("; the throughput figures say more about the sharing than about Tally, CPU per event less so."
                if loaded(loads, results["cpus"]) else "."),
             "", "**1 broker against 3** (a gateway and one processor; batches of 100 from "
             f"{SENDERS} senders for {results['args']['seconds']} s, then the drain; CPU µs per accepted event):", "",
             "| brokers | round | events/s acked | p50 / p99 ms per batch | failed | events/s end to end | exact | "
             "CPU µs per event |", "|---|---:|---:|---|---:|---:|---|---|"]
    for row in results["brokers"]:
        lines.append(f"| {row['name']} | {row['round']} | {fmt(row['events_s'])} | {row['p50_ms']:.0f} / "
                     f"{row['p99_ms']:.0f} | {row['failed']:,} | {fmt(row['end_to_end_events_s'])} | "
                     f"{row['check'].get('exact')} | {cpu_text(row['cpu_us_per_event'])} |")
    lines += ["", f"**Processors 1 → 2 → 4 on one topic of {PARTITIONS} partitions** (on the single broker; each "
              f"count a new topic and group: the members join, then {results['args']['events']:,} events, 10% "
              "duplicates, are loaded and drained; events/s from the first produce to the last commit; CPU over "
              "that time, start-up excluded):", "",
              "| members | drained in s | events/s | exact | events consumed per member | CPU µs per event per member "
              "| processors' CPU µs per event |", "|---:|---:|---:|---|---|---|---:|"]
    for row in results["members"]:
        per = row["per_member"]
        lines.append(f"| {row['members']} | {row['seconds']:.1f} | {row['events_s']:,.0f} | "
                     f"{row['check'].get('exact')} | "
                     + " · ".join(f"{m['consumed']:,}" for m in per) + " | "
                     + " · ".join(fmt(m["cpu_us_per_event"]) for m in per) + f" | {row['cpu_us_per_event']:,.0f} |")
    base = [r for r in results["brokers"] if r["name"] == "1 broker"]
    if base:
        cpu = {k: statistics.median(r["cpu_us_per_event"].get(k) or 0 for r in base)
               for k in ("gateway", "processor", "kafka", "postgresql")}
        total = sum(cpu.values())
        lines += ["", f"Projection from CPU per event (1 broker, medians): gateway {cpu['gateway']:,.0f} + processor "
                  f"{cpu['processor']:,.0f} + Kafka {cpu['kafka']:,.0f} + PostgreSQL {cpu['postgresql']:,.0f} = "
                  f"{total:,.0f} µs per event, so one core carries about {1e6 / total:,.0f} events/s end to end "
                  "(load generator excluded). On N cores, if CPU per event holds and the work spreads:", "",
                  *projection(total, cpu["processor"])]
    return lines


def drop_topics(bootstrap: str, prefix: str) -> None:
    """The run's topics on the cluster (Bench.teardown removes those on the single broker)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    for future in (admin.delete_topics(names, operation_timeout=30) if names else {}).values():
        future.result()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loads = {"before": os.getloadavg()[0]}
    started = cluster("status").returncode != 0
    if started:
        print("[scale-out] starting the three-broker cluster", flush=True)
        if cluster("start").returncode != 0:
            raise RuntimeError("kafka-cluster.sh start failed; see .local/log/kafka-cluster-*.log")
    three = cluster("bootstrap").stdout.strip()
    bench = Bench.create(Settings())
    await bench.setup()
    results: dict[str, Any] = {"args": vars(args), "cpus": os.cpu_count(), "brokers": [], "members": [],
                               "revision": subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                                          capture_output=True, text=True).stdout.strip()}
    try:
        # no /metrics port: several processors run at once
        variants = {"1 broker": {"processor_metrics_port": 0},
                    "3 brokers": {"processor_metrics_port": 0, "kafka_bootstrap": three, "topic_replication_factor": 3,
                                  "topic_min_insync_replicas": 2}}
        for round_ in range(1, args.rounds + 1):
            order = list(variants) if round_ % 2 else list(reversed(variants))
            for name in order:
                slug = f"{name.split()[0]}b{round_}"
                print(f"[scale-out] {name}, round {round_}: posting for {args.seconds}s, then draining", flush=True)
                row = await through_gateway(bench, slug, bench.scoped(slug, **variants[name]), args)
                results["brokers"].append({"name": name, "round": round_, **row})
                print(f"  {row['events_s']:,.0f} events/s acked, end to end {fmt(row['end_to_end_events_s'])}, "
                      f"exact {row['check'].get('exact')}; CPU µs/event {cpu_text(row['cpu_us_per_event'])}",
                      flush=True)
        for count in MEMBERS:
            print(f"[scale-out] {count} member(s) on {PARTITIONS} partitions drain {args.events:,} events", flush=True)
            row = await members(bench, count, args)
            results["members"].append(row)
            print(f"  {row['events_s']:,.0f} events/s, exact {row['check'].get('exact')}; per member consumed/"
                  "µs per event: " + ", ".join(f"{m['consumed']:,}/{fmt(m['cpu_us_per_event'])}"
                                               for m in row["per_member"]), flush=True)
    finally:
        await bench.teardown()
        drop_topics(three, bench.settings.topic_prefix)
        if started:
            cluster("stop")
    loads["after"] = os.getloadavg()[0]
    results["load_average"] = loads
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="bash benchmarks/run.sh --scale-out", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20, help="posting time per broker variant and round")
    parser.add_argument("--events", type=int, default=200_000, help="events drained by each count of processors")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of 1 and 3 brokers, in alternating order")
    parser.add_argument("--drain-timeout", type=int, default=300)
    args = parser.parse_args()
    if "<!-- section: scale-out -->" not in RESULTS.read_text():
        parser.error("benchmarks/RESULTS.md lacks the scale-out section's markers")
    OUT.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args))
    (OUT / "scale-out.json").write_text(json.dumps(results, indent=1, default=str))
    command = " ".join(["bash benchmarks/run.sh --scale-out", *sys.argv[1:]])
    RESULTS.write_text(fill(RESULTS.read_text(), "scale-out", report(results, command)))
    print("[scale-out] wrote benchmarks/out/scale-out.json and the scale-out section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
