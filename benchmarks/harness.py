"""`bash benchmarks/run.sh`: the gateway, the processor and the pipeline end to end, each beside its
ceilings and peers, in one bounded run on an isolated slice of the running services.

Writes benchmarks/out/results.json (figures and time series); report.py turns it into RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import kafka_bench, loadgen, log_records, logs_bench, logs_seed, pg_bench, stack, usage_bench
from benchmarks.cpu import CpuMeter, listener_pid
from benchmarks.machine import describe
from benchmarks.spread import combine
from benchmarks.stack import OUT, Bench
from tally.settings import ROOT, Settings

QUIX_PYTHON = ROOT / "benchmarks" / ".venv-quix" / "bin" / "python"
PY_SPY = ROOT / "benchmarks" / ".venv" / "bin" / "py-spy"
# Settings that lift the gateway's rate limits for the run: the limiter still runs on every request.
UNLIMITED = {f"TALLY_GATEWAY_{name}": "1000000000" for name in
             ("RATE_LIMIT_PER_S", "RATE_LIMIT_BURST", "WEBHOOK_RATE_LIMIT_PER_S", "WEBHOOK_RATE_LIMIT_BURST")}
# Batches of 100 events to POST /v1/events/batch at the highest rate: k6's `batch` scenario, 8 closed-loop users.
BATCHES = {"SCENARIO": "batch", "BATCH": 100, "MODE": "max", "VUS": 8, "P99_MS": 200}
WEBHOOK_SECRET = "whsec_bench"
# Parts run without --only: logs needs a 10-million-record database seeded first, so it is asked for by name.
DEFAULT_PARTS = ("gateway", "usage", "processor", "e2e")
# Log reads: (name, k6 scenario, requests/s, p99 aim in ms, extra k6 variables). Stats by level is a dashboard's
# panel (6 series); by service and level, the default, answers 300 series of 60 minutes (~470 KiB).
READS = (("log_search", "log_search", 50, 50, {}), ("log_words", "log_words", 10, 500, {}),
         ("log_stats_level_warm", "log_stats", 100, 20, {"CACHE": "warm", "BY": "level"}),
         ("log_stats_level_cold", "log_stats", 50, 20, {"CACHE": "cold", "BY": "level"}),
         ("log_stats_warm", "log_stats", 20, 20, {"CACHE": "warm"}),
         ("log_stats_cold", "log_stats", 10, 20, {"CACHE": "cold"}))


class Progress:
    """One line per step with the elapsed time, and a budget: steps that would overrun are skipped."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        minutes, seconds = divmod(int(self.elapsed()), 60)
        print(f"[bench {minutes:02d}:{seconds:02d}] {text}", flush=True)

    def allows(self, step: str, cost_s: float) -> bool:
        if self.elapsed() + cost_s <= self.budget_s:
            self.say(step)
            return True
        self.say(f"skipped (time budget): {step}")
        self.skipped.append(step)
        return False


class Harness:
    def __init__(self, bench: Bench, args: argparse.Namespace, index: int = 1) -> None:
        self.bench = bench
        self.args = args
        self.index = index  # which of the --repeat runs this is, from 1
        self.progress = Progress(args.budget)
        self.results: dict[str, Any] = {"run": bench.run, "gateway": {}, "usage": {}, "processor": {}, "e2e": {},
                                        "logs": {}, "notes": []}
        broker = listener_pid(int(bench.settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1]))
        self.broker = [broker] if broker else []
        if not broker:
            self.note("the Kafka broker's process was not found: its CPU is not reported")

    def meter(self, services: dict[str, list[stack.Service]], load_generator: bool) -> CpuMeter:
        """CPU of these services, the run's PostgreSQL backends, the broker and (if any) the load generator."""
        groups = {name: (lambda group=group: [s.process.pid for s in group]) for name, group in services.items()}
        groups["kafka_broker"] = lambda: self.broker
        return CpuMeter(groups, self.bench.base.database_url, self.bench.db_name, load_generator)

    async def measured_load(self, section: str, name: str, services: dict[str, list[stack.Service]],
                            call: Callable[[], loadgen.Load], per_request: bool = False) -> loadgen.Load:
        """Run a load generator, with the CPU every process spent meanwhile per accepted event (or request,
        for reads)."""
        meter = self.meter(services, load_generator=True)
        before = await meter.snapshot()
        load = await asyncio.to_thread(call)
        load.cpu_us_per_event = CpuMeter.per_event(before, await meter.snapshot(),
                                                   load.requests if per_request else load.events_accepted)
        self.record(section, name, load)
        return load

    def note(self, text: str) -> None:
        self.progress.say(f"note: {text}")
        self.results["notes"].append(text)

    def record(self, section: str, name: str, load: loadgen.Load) -> None:
        self.results[section][name] = load.as_dict()
        cpu = ", ".join(f"{k} {v:,.0f}" for k, v in load.cpu_us_per_event.items() if v is not None)
        self.progress.say(f"  {load.tool} {name}: {load.req_s:,.0f} req/s, {load.events_s:,.0f} events/s, "
                          f"p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms, failed {load.failed:.2%}; "
                          f"CPU µs/event: {cpu}")

    def profiled(self, name: str, service: stack.Service | None) -> contextlib.AbstractContextManager[None]:
        """With --profile: sample the service with py-spy meanwhile; out/profile-NAME.txt holds the top frames."""
        if not self.args.profile or service is None:
            return contextlib.nullcontext()
        return profiling(service, OUT / f"profile-{name}")

    def k6(self, name: str, url: str, csv: bool = False, key: str | None = None,
           **env: str | int | float) -> loadgen.Load:
        summary = OUT / f"k6-{name}.json"
        return loadgen.k6(name, summary, OUT / f"k6-{name}.csv" if csv else None, URL=url, KEY=key or self.bench.key,
                          RUN=f"{self.bench.run}-{name}", DURATION=f"{self.args.seconds}s", **env)

    # -- gateway -----------------------------------------------------------------------------------

    async def gateway(self) -> None:
        seconds = self.args.seconds
        settings = self.bench.scoped("gw")
        self.bench.topics(settings)
        raw, bare = self.bench.bare("raw"), self.bench.bare("starlette")
        webhooks = OUT / "webhooks.yaml"
        webhooks.write_text(f"sources:\n  stripe: {{scheme: stripe, tenant: bench, secrets: [{WEBHOOK_SECRET}]}}\n")
        gateway = self.bench.gateway(settings, TALLY_GATEWAY_WEBHOOKS_FILE=str(webhooks), **UNLIMITED)
        servers = {"raw_asgi": raw, "starlette": bare, "gateway_single": gateway}
        urls = {name: f"http://127.0.0.1:{s.port}" for name, s in servers.items()}
        self.gateway_service = gateway
        routes = probe_routes(urls["gateway_single"], self.bench.key)
        self.results["gateway"]["routes"] = routes
        for name, url in urls.items():
            if self.progress.allows(f"wrk {name} ({seconds}s, 64 connections)", seconds + 5):
                await self.measured_load("gateway", f"wrk_{name}", self.served_by(servers[name]), partial(
                    loadgen.wrk, name, f"{url}/v1/events", self.bench.key, f"{self.bench.run}-wrk", seconds))
        for name in ("raw_asgi", "gateway_single"):
            if self.progress.allows(f"k6 {name}, highest rate (closed loop, 32 users)", seconds + 5):
                with self.profiled("gateway", gateway if name == "gateway_single" else None):
                    await self.measured_load("gateway", f"k6_{name}_max", self.served_by(servers[name]), partial(
                        self.k6, f"{name}_max", urls[name], SCENARIO="bare" if name == "raw_asgi" else "single",
                        MODE="max", VUS=32))
        await self.fixed_rate("gateway_single", urls["gateway_single"], "single", batch=1)
        if routes["batch"]:
            if self.progress.allows("k6 batches of 100, highest rate (closed loop, 8 users)", seconds + 5):
                await self.measured_load("gateway", "k6_gateway_batch_max", self.served_by(gateway), partial(
                    self.k6, "gateway_batch_max", urls["gateway_single"], **BATCHES))
            await self.fixed_rate("gateway_batch", urls["gateway_single"], "batch", batch=100)
        else:
            self.note("POST /v1/events/batch is not in the gateway yet: the batch scenarios were skipped")
        for scenario, rate, route in (("logs", 20, "logs"), ("webhook", 200, "webhook")):
            if not routes[route]:
                self.note(f"the {route} route is not in the gateway yet: k6 scenario '{scenario}' was skipped")
            elif self.progress.allows(f"k6 {scenario} at {rate} req/s", seconds + 5):
                await self.measured_load("gateway", f"k6_{scenario}", self.served_by(gateway), partial(
                    self.k6, scenario, urls["gateway_single"], SCENARIO=scenario, RATE=rate, BATCH=100, P99_MS=200,
                    WEBHOOK_SECRET=WEBHOOK_SECRET))
        for service in (raw, bare, gateway):
            self.bench.stop(service)

    def served_by(self, service: stack.Service) -> dict[str, list[stack.Service]]:
        return {"gateway" if service is self.gateway_service else "server": [service]}

    async def fixed_rate(self, name: str, url: str, scenario: str, batch: int) -> None:
        """k6 at a constant arrival rate of 70% of the highest rate measured just before."""
        best = self.results["gateway"].get(f"k6_{name}_max")
        if best is None:
            return
        rate = max(1, int(best["req_s"] * 0.7))
        if self.progress.allows(f"k6 {name} at a constant {rate} req/s (70% of its highest)", self.args.seconds + 5):
            await self.measured_load("gateway", f"k6_{name}_rate", self.served_by(self.gateway_service), partial(
                self.k6, f"{name}_rate", url, SCENARIO=scenario, MODE="rate", RATE=rate, BATCH=batch,
                P99_MS=50, VUS=64, MAX_VUS=256))

    # -- usage -------------------------------------------------------------------------------------

    async def usage(self) -> None:
        """Single events with and without hard limits configured, alternating, then GET /v1/usage at a
        constant 1,000 requests/s over the subjects those events were counted for."""
        seconds = self.args.seconds
        settings = self.bench.scoped("usage", meters=usage_bench.METERS)
        self.bench.topics(settings)
        keys = await usage_bench.prepare(settings)
        gateway = self.bench.gateway(settings, **UNLIMITED)
        served = {"gateway": [gateway], "processors": [self.bench.processor(settings, "usage-processor")]}
        url = f"http://127.0.0.1:{gateway.port}"
        for round_ in (1, 2):
            for name, key in (("without", keys.free), ("with", keys.limited)):
                if self.progress.allows(f"wrk single events, {name} hard limits, round {round_}", seconds + 5):
                    await self.measured_load("usage", f"wrk_single_{name}_{round_}", served, partial(
                        loadgen.wrk, f"single_{name}", f"{url}/v1/events", key, f"{self.bench.run}-{name}{round_}",
                        seconds))
        # Reads are measured with the pipeline idle: the processor first counts what the writes posted.
        if self.progress.allows("waiting for the processor to count the posted events", 120):
            drained = await usage_bench.drained(settings, 120)
            self.results["usage"]["drained_before_reads"] = drained
            if not drained:
                self.note("the processor had not counted every posted event when the reads started")
        if self.progress.allows("one read of each subject, then k6 GET /v1/usage at a constant 1,000 req/s",
                                seconds + 10):
            await asyncio.to_thread(usage_bench.warm, url, keys.reader)
            with self.profiled("usage", gateway):
                await self.measured_load("usage", "k6_usage_read", served, partial(
                    self.k6, "usage_read", url, key=keys.reader, **usage_bench.READS), per_request=True)
        self.results["usage"]["blocked_subjects"] = usage_bench.BLOCKED

    # -- processor ---------------------------------------------------------------------------------

    async def processor(self) -> None:
        count = self.args.events
        settings = self.bench.scoped("drain")
        self.bench.topics(settings)
        topic = settings.topics.events
        section = self.results["processor"]
        if not self.progress.allows(f"loading {count:,} events (10% duplicates) with a bare confluent-kafka loop", 60):
            return
        loaded = kafka_bench.load(settings.kafka_bootstrap, topic, self.bench.run, count, 0.1)
        section["loaded"] = {"messages": loaded.messages, "distinct": loaded.distinct,
                             "events_s": loaded.messages / loaded.seconds}
        self.progress.say(f"  loaded {loaded.messages:,} ({loaded.distinct:,} distinct) "
                          f"at {loaded.messages / loaded.seconds:,.0f} events/s")

        if self.progress.allows("ceiling: Kafka's ProducerPerformance, acks=all, idempotent, lz4", 40):
            produce = self.bench.scoped("produce")
            self.bench.topics(produce)
            payloads = kafka_bench.sample_payloads(OUT / "payloads.txt", self.bench.run)
            section["produce_ceiling"] = kafka_bench.produce_ceiling(
                settings.kafka_bootstrap, produce.topics.events, payloads, max(count, 500_000))
            self.progress.say(f"  produce: {section['produce_ceiling']['events_s']:,.0f} events/s")
        if self.progress.allows("ceiling: bare confluent-kafka consume of the drain topic", 40):
            section["consume_ceiling"] = kafka_bench.consume_ceiling(
                settings.kafka_bootstrap, topic, f"{settings.consumer_group}-bare", loaded.messages)
            self.progress.say(f"  consume: {section['consume_ceiling']['events_s']:,.0f} events/s")
        if self.progress.allows(f"ceiling: PostgreSQL COPY of the {loaded.distinct:,} distinct rows", 40):
            section["copy_ceiling"] = await pg_bench.copy_ceiling(settings.database_url, self.bench.run, loaded.distinct)
            self.progress.say(f"  COPY: {section['copy_ceiling']['events_s']:,.0f} rows/s")

        contenders = [("tally_x1", partial(self.tally_drain, settings, loaded, 1)),
                      ("tally_x2", partial(self.tally_drain, settings, loaded, 2)),
                      ("quix", partial(self.quix_drain, settings, loaded))]
        # Each run starts with another contender, so none always runs first or straight after another's writes.
        turn = (self.index - 1) % len(contenders)
        contenders = contenders[turn:] + contenders[:turn]
        section["order"] = [name for name, _ in contenders]
        for _, contender in contenders:
            await contender()

    async def tally_drain(self, settings: Settings, loaded: kafka_bench.Loaded, instances: int) -> None:
        group = settings.model_copy(update={"consumer_group": f"{settings.consumer_group}-p{instances}"})
        if self.progress.allows(f"Tally processor x{instances}: drain {loaded.messages:,} events", 90):
            await pg_bench.clear(settings.database_url)
            self.results["processor"][f"tally_x{instances}"] = await self.drain(
                f"tally_x{instances}", group, loaded,
                lambda: [self.bench.processor(group, f"processor-{i}") for i in range(instances)], pg_bench.verify)

    async def quix_drain(self, settings: Settings, loaded: kafka_bench.Loaded) -> None:
        if self.progress.allows(f"peer: Quix Streams doing the processor's job on {loaded.messages:,} events", 120):
            await pg_bench.clear(settings.database_url)
            group = f"{settings.consumer_group}-quix"
            counting = await pg_bench.counting(settings.database_url)
            argv = [str(QUIX_PYTHON), "-m", "benchmarks.peers.quix_processor", "--bootstrap", settings.kafka_bootstrap,
                    "--topic", loaded.topic, "--group", group, "--dsn", settings.database_url]
            argv += ["--count"] if counting else []
            peer_settings = settings.model_copy(update={"consumer_group": group})
            self.results["processor"]["quix"] = await self.drain(
                "quix", peer_settings, loaded, lambda: [self.bench.start("quix", argv, peer_settings)],
                pg_bench.verify_quix)
            if not counting:
                self.note("the Tally processor keeps no counters yet, so the Quix peer ran without them too")

    async def drain(self, name: str, settings: Settings, loaded: kafka_bench.Loaded,
                    start: Callable[[], list[stack.Service]], verify: Callable[..., Any]) -> dict[str, Any]:
        """Start consumers, follow their committed offsets until the topic is drained, verify, stop."""
        lag = kafka_bench.Lag(settings.kafka_bootstrap, settings.consumer_group, loaded.topic)
        services: list[stack.Service] = []
        meter = self.meter({"processors": services}, load_generator=False)
        before = await meter.snapshot()
        began = time.monotonic()
        services.extend(start())
        series: list[tuple[float, int]] = []
        first = drained_at = 0.0
        cpu: dict[str, float | None] = {}
        try:
            with self.profiled(name, services[0] if name == "tally_x1" else None):
                deadline = began + self.args.drain_timeout
                while time.monotonic() < deadline:
                    end, committed = lag.sample()
                    now = time.monotonic()
                    series.append((round(now - began, 2), committed))
                    first = first or (now if committed else 0.0)
                    if committed >= end:
                        drained_at = now
                        cpu = CpuMeter.per_event(before, await meter.snapshot(), loaded.messages)
                        break
                    if any(s.process.poll() is not None for s in services):
                        self.note(f"{name} exited while draining; see benchmarks/out/logs/")
                        break
                    await asyncio.sleep(0.2)
        finally:
            for service in services:
                self.bench.stop(service)
            lag.close()
        if not drained_at:
            self.note(f"{name} did not drain {loaded.messages:,} events (limit {self.args.drain_timeout}s)")
        stopped = drained_at or time.monotonic()
        committed = series[-1][1] if series else 0
        first_committed = next((c for _, c in series if c), 0)
        overall = committed / (stopped - began)
        # The same rule for every contender. With start-up: everything committed over process start to
        # drained. Once running: what was committed after the first commit, over the time after it; with
        # fewer than two distinct commits there is no such interval and no figure.
        commits = len({c for _, c in series if c})
        steady = (committed - first_committed) / (stopped - first) if commits >= 2 and stopped > first else None
        check = await verify(settings.database_url, loaded.distinct) if drained_at else {"exact": False}
        result = {"events_s": steady, "overall_events_s": overall, "commits_seen": commits,
                  "startup_s": (first - began) if first else None, "seconds": stopped - began,
                  "drained": bool(drained_at), "check": check, "series": series, "cpu_us_per_event": cpu}
        once = "–" if steady is None else f"{steady:,.0f}"
        self.progress.say(f"  {name}: {once} events/s once running ({overall:,.0f} with start-up), "
                          f"{commits} commits seen, exact: {check['exact']}; CPU µs/event: "
                          + ", ".join(f"{k} {v:,.0f}" for k, v in cpu.items() if v is not None))
        return result

    # -- logs --------------------------------------------------------------------------------------

    async def logs(self) -> None:
        """Reads of the seeded 10 million log records at constant arrival rates (the intake part follows)."""
        section = self.results["logs"]
        seeded = await logs_seed.found(self.bench.base)
        if seeded is None:
            self.note(f"no finished seed in {logs_seed.DATABASE}: run python -m benchmarks.logs_seed first")
            return
        section["seed"] = {"rows": seeded.rows, "since": seeded.since, "until": seeded.until, "seconds": seeded.seconds}
        self.note(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores as the log reads began "
                  "(other work on the machine included)")
        settings = self.bench.scoped("logs", database_url=seeded.url)
        self.bench.topics(settings)
        gateway = self.bench.gateway(settings, **UNLIMITED)
        url = f"http://127.0.0.1:{gateway.port}"
        key = await logs_bench.reader_key(seeded.url)
        window = {"SINCE": int(seeded.since.timestamp() * 1000), "UNTIL": int(seeded.until.timestamp() * 1000),
                  "SERVICES": ",".join(log_records.SERVICES), "SEARCHES": "|".join(log_records.SEARCHES)}
        for name, scenario, rate, p99_ms, extra in READS:
            if self.progress.allows(f"k6 {name} at a constant {rate} req/s", self.args.seconds + 5):
                with self.profiled(name, gateway):
                    load = self.k6(name, url, key=key, SCENARIO=scenario, MODE="rate", RATE=rate, P95_MS=p99_ms,
                                   P99_MS=p99_ms, VUS=32, MAX_VUS=128, **window, **extra)
                self.record("logs", name, load)
                section[name].update(rate=rate, p99_aim_ms=p99_ms,
                                     cache=loadgen.counts(OUT / f"k6-{name}.json", "cache_hits", "cache_misses"))
        self.bench.stop(gateway)

    async def intake(self) -> None:
        """The intake drain with the read indexes and without them, alternating (with, without, without, with):
        of log records, which the indexes cover, and of ordinary events, which only their predicates see."""
        count = self.args.events
        section = self.results["logs"]
        section["read_indexes"] = self.args.drop_index or logs_bench.read_indexes()
        definitions: list[str] = []
        for kind in ("logs", "events"):
            settings = self.bench.scoped(f"{kind}intake")
            self.bench.topics(settings)
            if not self.progress.allows(f"loading {count:,} {kind} (10% duplicates) as the gateway publishes them", 60):
                return
            if kind == "logs":
                rows = await logs_bench.records(settings.database_url, count)
                loaded = logs_bench.load_records(settings.kafka_bootstrap, settings.topics.events, self.bench.run,
                                                 rows, 0.1)
            else:
                loaded = kafka_bench.load(settings.kafka_bootstrap, settings.topics.events, self.bench.run, count, 0.1)
            prefix = "intake" if kind == "logs" else "events_intake"
            section[f"{prefix}_loaded"] = {"messages": loaded.messages, "distinct": loaded.distinct}
            for round_, indexes in enumerate(("with", "without", "without", "with"), 1):
                if not self.progress.allows(f"processor: drain {loaded.messages:,} {kind}, {indexes} the read indexes",
                                            90):
                    return
                await pg_bench.clear(settings.database_url)
                if indexes == "without" and not definitions:
                    definitions = await logs_bench.drop_read_indexes(settings.database_url, self.args.drop_index)
                if indexes == "with" and definitions:
                    await logs_bench.create_indexes(settings.database_url, definitions)
                    definitions = []
                group = settings.model_copy(update={"consumer_group": f"{settings.consumer_group}-{round_}"})
                section[f"{prefix}_{indexes}_{round_}"] = await self.drain(
                    f"{kind}_{indexes}_{round_}", group, loaded,
                    lambda group=group, kind=kind: [self.bench.processor(group, f"{kind}-processor")], pg_bench.verify)

    # -- end to end --------------------------------------------------------------------------------

    async def end_to_end(self) -> None:
        settings = self.bench.scoped("e2e")
        self.bench.topics(settings)
        await pg_bench.clear(settings.database_url)
        gateway = self.bench.gateway(settings, **UNLIMITED)
        url = f"http://127.0.0.1:{gateway.port}"
        processors = [self.bench.processor(settings, f"e2e-processor-{i}") for i in range(self.args.e2e_processors)]
        # Requests of 100 events where the gateway has the batch route, also when its own part did not run
        batch = (self.results["gateway"].get("routes") or probe_routes(url, self.bench.key))["batch"]
        size = 100 if batch else 1
        scenario = "batch" if batch else "single"
        section = self.results["e2e"]
        section.update({"batch_size": size, "processors": len(processors)})
        sampler = kafka_bench.LagSampler(settings.kafka_bootstrap, settings.consumer_group, settings.topics.events)
        sampler.start()
        seconds = self.args.seconds * 2
        services = {"gateway": [gateway], "processors": processors}

        async def measured(name: str, drain: str, call: Callable[[], loadgen.Load]) -> None:
            """A load run and the drain after it, with the CPU of every process over both per accepted event."""
            meter = self.meter(services, load_generator=True)
            before = await meter.snapshot()
            since = sampler.latest()
            load = await asyncio.to_thread(call)
            section[drain] = await sampler.until_drained(since, 60)
            load.cpu_us_per_event = CpuMeter.per_event(before, await meter.snapshot(), load.events_accepted)
            self.record("e2e", name, load)

        try:
            if self.progress.allows(f"end to end, highest rate: {scenario} (size {size}) for {seconds}s", seconds + 60):
                await measured("max", "max_drain", partial(
                    loadgen.k6, "e2e_max", OUT / "k6-e2e_max.json", OUT / "k6-e2e_max.csv", URL=url, KEY=self.bench.key,
                    RUN=f"{self.bench.run}-e2emax", DURATION=f"{seconds}s", SCENARIO=scenario, MODE="max",
                    VUS=8 if batch else 32, BATCH=size, P99_MS=1000))
                section["max_latency"] = await pg_bench.e2e_latency(settings.database_url, f"{self.bench.run}-e2emax-")
            rate = max(1, 5000 // size)
            if self.progress.allows(f"end to end at 5,000 events/s ({rate} req/s of {size}) for {seconds}s", seconds + 30):
                run = f"{self.bench.run}-e2efix"
                await measured("fixed_5000", "fixed_drain", partial(
                    loadgen.k6, "e2e_fixed", OUT / "k6-e2e_fixed.json", OUT / "k6-e2e_fixed.csv", URL=url, KEY=self.bench.key,
                    RUN=run, DURATION=f"{seconds}s", SCENARIO=scenario, MODE="rate", RATE=rate, BATCH=size,
                    VUS=64, P99_MS=1000))
                section["fixed_latency"] = await pg_bench.e2e_latency(settings.database_url, f"{run}-")
            if self.progress.allows(f"retry-heavy mix: 30% of requests sent 2-3 times, for {self.args.seconds}s",
                                    self.args.seconds + 30):
                await measured("retry_mix", "retry_drain", partial(
                    loadgen.k6, "e2e_retry", OUT / "k6-e2e_retry.json", URL=url, KEY=self.bench.key, RUN=f"{self.bench.run}-retry",
                    DURATION=f"{self.args.seconds}s", SCENARIO="retry", MODE="rate", RATE=max(1, 2000 // size),
                    BATCH=size, VUS=64, P99_MS=1000))
            self.progress.say("checking: every event the load generator got a 202 for is persisted and counted once")
            runs = [section[k] for k in ("max", "fixed_5000", "retry_mix") if k in section]
            section["accepted"] = sum(r["events_accepted"] for r in runs)
            section["accepted_distinct"] = sum(r["events_accepted_distinct"] for r in runs)
            section["topic"] = kafka_bench.distinct_in_topic(settings.kafka_bootstrap, settings.topics.events,
                                                              f"{settings.consumer_group}-verify")
            # PostgreSQL against the 202s: every count must equal the events accepted at least once
            check = await pg_bench.verify(settings.database_url, section["accepted_distinct"])
            check["on_topic_distinct"] = section["topic"]["distinct"]
            check["exact"] = check["exact"] and section["topic"]["distinct"] == section["accepted_distinct"]
            section["check"] = check
            section["series"] = sampler.series
            self.progress.say(f"  {section['accepted_distinct']:,} accepted ({section['accepted']:,} 202s), "
                              f"{section['topic']['distinct']:,} distinct on the topic, {check['events']:,} persisted, "
                              f"exact: {check['exact']}")
        finally:
            await sampler.close()
            for service in [gateway, *processors]:
                self.bench.stop(service)


@contextlib.contextmanager
def profiling(service: stack.Service, path: Path) -> Iterator[None]:
    """py-spy attached to a running service (idle frames left out), stopped with SIGINT so it writes."""
    raw = path.with_suffix(".collapsed")
    spy = subprocess.Popen([str(PY_SPY), "record", "--pid", str(service.process.pid), "--rate", "200", "--nonblocking",
                            "--format", "raw", "--output", str(raw)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
        if raw.exists():
            path.with_suffix(".txt").write_text(top_frames(raw.read_text()))


def top_frames(collapsed: str, limit: int = 25) -> str:
    """Self and inclusive shares of the busiest frames of a py-spy raw (collapsed-stack) profile."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        count, frames = int(count_text), stack_text.split(";")
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    lines = [f"{total} samples", "", "self %   frame"]
    lines += [f"{100 * n / total:5.1f}   {f}" for f, n in sorted(own.items(), key=lambda i: -i[1])[:limit]]
    lines += ["", "total %  frame"]
    lines += [f"{100 * n / total:5.1f}   {f}" for f, n in sorted(inclusive.items(), key=lambda i: -i[1])[:limit]]
    return "\n".join(lines) + "\n"


def probe_routes(url: str, key: str) -> dict[str, bool]:
    """Which of the gateway's routes exist yet: an empty POST gets a problem, not a 404 or 405."""
    import urllib.error
    import urllib.request

    found = {}
    for name, path in (("batch", "/v1/events/batch"), ("logs", "/v1/logs"), ("webhook", "/v1/webhooks/stripe")):
        request = urllib.request.Request(f"{url}{path}", data=b"", method="POST",
                                         headers={"Authorization": f"Bearer {key}"})
        try:
            urllib.request.urlopen(request, timeout=5).close()
            found[name] = True
        except urllib.error.HTTPError as exc:
            found[name] = exc.code not in (404, 405)
    return found


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bash benchmarks/run.sh", description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="length of each load run")
    parser.add_argument("--events", type=int, default=200_000, help="events loaded for each processor drain")
    parser.add_argument("--e2e-processors", type=int, default=2)
    parser.add_argument("--drain-timeout", type=int, default=90)
    parser.add_argument("--budget", type=int, default=540, help="seconds per run; steps that would overrun are skipped")
    parser.add_argument("--keep", action="store_true", help="keep the run's database and topics")
    parser.add_argument("--profile", action="store_true",
                        help="sample the gateway (single events) and the processor (drain) with py-spy")
    parser.add_argument("--only", action="append", choices=["gateway", "usage", "processor", "e2e", "logs", "intake"],
                        help="run only these parts (repeatable); default all but logs, which needs its seeded "
                             "database (run.sh makes it first), and intake, which logs implies")
    parser.add_argument("--drop-index", action="append", choices=logs_bench.read_indexes(),
                        help="the intake drains without read indexes drop only these (repeatable); default all")
    parser.add_argument("--repeat", type=int, default=1,
                        help="whole runs, one after another, each on a fresh slice; figures are their median and range")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    runs: list[dict[str, Any]] = []
    for n in range(1, args.repeat + 1):
        runs.append(await one_run(args, n))
        summary = {**combine(runs), "runs": len(runs), "seconds": time.monotonic() - began}
        (OUT / "results.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1, default=str))
    print(f"[bench] {len(runs)} run(s) done in {time.monotonic() - began:.0f}s; figures in benchmarks/out/results.json",
          flush=True)
    return 0


async def one_run(args: argparse.Namespace, n: int) -> dict[str, Any]:
    bench = Bench.create(Settings())
    harness = Harness(bench, args, n)
    harness.results["machine"] = await describe(bench.base)
    harness.results["args"] = vars(args)
    harness.progress.say(f"run {n} of {args.repeat} ({bench.run}): database {bench.db_name}, "
                         f"topic prefix {bench.settings.topic_prefix}")
    try:
        await bench.setup()
        parts = {"gateway": harness.gateway, "usage": harness.usage, "processor": harness.processor,
                 "e2e": harness.end_to_end, "logs": harness.logs, "intake": harness.intake}
        chosen = set(args.only or DEFAULT_PARTS) | ({"intake"} if "logs" in (args.only or ()) else set())
        for name, part in parts.items():
            if name in chosen:
                await part()
    finally:
        harness.results["skipped"] = harness.progress.skipped
        harness.results["seconds"] = harness.progress.elapsed()
        await bench.teardown(keep=args.keep)
    return harness.results


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
