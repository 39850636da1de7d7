"""Fill the marked sections of benchmarks/RESULTS.md from a run's results.json.

    python -m benchmarks.report out/results.json RESULTS.md "the command that produced them"
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any


def fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def fig(value: float | None, spread: list[float] | None, digits: int = 0) -> str:
    """The median, and the lowest and highest run's figure when they differ."""
    if value is None or not spread or fmt(spread[0], digits) == fmt(spread[1], digits):
        return fmt(value, digits)
    return f"{fmt(value, digits)} ({fmt(spread[0], digits)}–{fmt(spread[1], digits)})"


CPU_GROUPS = (("gateway", "gw"), ("server", "server"), ("processors", "proc"), ("postgresql", "pg"),
              ("kafka_broker", "kafka"), ("load_generator", "load gen"))


def cpu(figures: dict[str, Any], spread: dict[str, Any] | None) -> str:
    """CPU µs per event per process group, e.g. `gw 310 · pg 40 · kafka 55 · load gen 120`."""
    cpu_us, cpu_spread = figures.get("cpu_us_per_event") or {}, (spread or {}).get("cpu_us_per_event") or {}
    parts = [f"{short} {fig(cpu_us[name], cpu_spread.get(name))}" for name, short in CPU_GROUPS
             if cpu_us.get(name) is not None]
    return " · ".join(parts) or "–"


def ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.2f}"


def loaded(loads: dict[str, float], cpus: int) -> bool:
    """Other work weighed on a run when the load average passed half the cores before it. The figure after a run
    is mostly the run's own processes (a run keeps both cores busy), so it cannot tell other work apart."""
    return loads["before"] > cpus / 2


def machine_load(loads: dict[str, float], cpus: int) -> str:
    """The run's machine, quiet or loaded, and the load average before and after it."""
    return (("**measured on a loaded machine**" if loaded(loads, cpus) else "measured on a quiet machine")
            + f": load average {loads['before']:.1f} before the run and {loads['after']:.1f} after it (the run's own"
            " processes included)")


def aim(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "**not met**")


def load_table(rows: list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]],
               spread: dict[str, Any]) -> list[str]:
    lines = ["| endpoint | tool | req/s | events/s | p50 ms | p99 ms | failed | vs raw ASGI | CPU µs per event |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, key, load, base in rows:
        if load:
            s = spread.get(key) or {}
            lines.append(f"| {label} | {load['tool']} | {fig(load['req_s'], s.get('req_s'))} | "
                         f"{fig(load['events_s'], s.get('events_s'))} | {fig(load['p50_ms'], s.get('p50_ms'), 1)} | "
                         f"{fig(load['p99_ms'], s.get('p99_ms'), 1)} | {load['failed']:.2%} | "
                         f"{ratio(load['req_s'], base and base['req_s'])} | {cpu(load, s)} |")
    return lines


def gateway(r: dict[str, Any]) -> list[str]:
    g = r["gateway"]
    raw_wrk, raw_k6 = g.get("wrk_raw_asgi"), g.get("k6_raw_asgi_max")
    rows = [(label, key, g.get(key), base) for label, key, base in (
        ("bare raw ASGI + orjson", "wrk_raw_asgi", raw_wrk), ("bare Starlette", "wrk_starlette", raw_wrk),
        ("gateway, single events", "wrk_gateway_single", raw_wrk),
        ("bare raw ASGI + orjson, highest rate", "k6_raw_asgi_max", raw_k6),
        ("gateway, single events, highest rate", "k6_gateway_single_max", raw_k6),
        ("gateway, single events, 70% of highest", "k6_gateway_single_rate", None),
        ("gateway, batches of 100, highest rate", "k6_gateway_batch_max", None),
        ("gateway, batches of 100, 70% of highest", "k6_gateway_batch_rate", None),
        ("gateway, log records (100 a request)", "k6_logs", None),
        ("gateway, signed Stripe webhooks", "k6_webhook", None),
    )]
    single = g.get("wrk_gateway_single")
    batch = g.get("k6_gateway_batch_max")
    reported = g.get("k6_gateway_single_rate")
    return [
        "Single events carry auth (cached API key), the per-key rate limiter (limits lifted, still run) and the "
        "Kafka ack (acks=all, idempotent) on every request. wrk: 1 thread, 64 connections; k6: 32 closed-loop "
        "users for the highest rate, then a constant arrival rate at 70% of it. k6 takes a core of its own here, "
        "so its figures sit below wrk's for every endpoint alike. "
        f"{runs_text(r)} CPU µs per event: /proc CPU time of each process over the load run divided by the "
        "events accepted (gw: the gateway or, for bare rows, the server; pg: PostgreSQL backends of the run's "
        "database; kafka: the broker, which other work on the machine shares; load gen: wrk or k6).",
        "",
        *load_table(rows, r["spread"].get("gateway") or {}),
        "",
        f"- Aim: single events ≥ 50% of raw ASGI req/s (wrk): {ratio(single and single['req_s'], raw_wrk and raw_wrk['req_s'])}"
        f" — {aim(bool(single and raw_wrk and single['req_s'] >= 0.5 * raw_wrk['req_s']) if single and raw_wrk else None)}",
        f"- Aim: batches of 100 ≥ 100,000 events/s acked: {fmt(batch and batch['events_s'])}"
        f" — {aim(batch['events_s'] >= 100_000 if batch else None)}",
        f"- Aim: p99 ≤ 50 ms at the reported load ({fmt(reported and reported['req_s'])} req/s): "
        f"{fmt(reported and reported['p99_ms'], 1)} ms — {aim(reported['p99_ms'] <= 50 if reported else None)}",
    ]


def usage(r: dict[str, Any]) -> list[str]:
    u = r.get("usage") or {}
    if not u:
        return ["Not measured in this run."]
    spread = r["spread"].get("usage") or {}
    rows = [(f"single events, {name} hard limits, round {n}", f"wrk_single_{name}_{n}", u.get(f"wrk_single_{name}_{n}"))
            for n in (1, 2) for name in ("without", "with")]
    rows.append(("GET /v1/usage, constant 1,000 req/s", "k6_usage_read", u.get("k6_usage_read")))

    def mean(name: str) -> float | None:
        found = [u[k]["req_s"] for k in (f"wrk_single_{name}_1", f"wrk_single_{name}_2") if k in u]
        return sum(found) / len(found) if found else None

    without, with_ = mean("without"), mean("with")
    read = u.get("k6_usage_read")
    return [
        "One gateway and one processor. Single events alternate between a tenant without hard limits and one "
        f"with hard limits configured ({u.get('blocked_subjects', 0):,} blocked subjects, none of them the ones "
        "posted for, so every event is checked and accepted); wrk, 1 thread, 64 connections. Once the processor "
        f"counted them (drained: {'yes' if u.get('drained_before_reads') else 'no'}), k6 reads `GET /v1/usage` "
        "for the 500 subscribed subjects (a period of 20 days so far; a subject's figures are computed on its "
        "first read, from settled windows folded in memory and the last day's hour windows from Redis, then "
        "kept while its change counters stand still, ADR 0046) at a constant arrival rate, after one untimed "
        f"read of each subject, so the timed reads are the ones after a subject's first. {runs_text(r)} CPU µs per event "
        "(per request for the reads): /proc CPU time of each process over the load run (gw: the gateway; proc: "
        "the processor; pg, kafka, load gen as in the gateway section).",
        "",
        "| load | tool | req/s | p50 ms | p95 ms | p99 ms | failed | CPU µs per event |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *[f"| {label} | {load['tool']} | {fig(load['req_s'], s.get('req_s'))} | {fig(load['p50_ms'], s.get('p50_ms'), 1)} | "
          f"{fig(load['p95_ms'], s.get('p95_ms'), 1)} | {fig(load['p99_ms'], s.get('p99_ms'), 1)} | {load['failed']:.2%} | "
          f"{cpu(load, s)} |" for label, key, load in rows if load for s in [spread.get(key) or {}]],
        "",
        f"- Aim: single events with hard limits within 10% of without: {ratio(with_, without)}"
        f" — {aim(with_ >= 0.9 * without if with_ and without else None)}",
        f"- Aim: GET /v1/usage p99 ≤ 10 ms at 1,000 req/s: {fmt(read and read['p99_ms'], 1)} ms at "
        f"{fmt(read and read['req_s'])} req/s — {aim(read['p99_ms'] <= 10 and read['req_s'] >= 950 if read else None)}",
    ]


def processor(r: dict[str, Any]) -> list[str]:
    p = r["processor"]
    if "loaded" not in p:
        return ["Not measured in this run."]
    ceilings = {"Kafka ProducerPerformance (acks=all, idempotent, lz4; unkeyed, linger 5 ms, own topic)":
                ("produce_ceiling", p.get("produce_ceiling")),
                "bare confluent-kafka produce loop (the loader)": ("loaded", p.get("loaded")),
                "bare confluent-kafka consume of the drain topic (+ JSON parse)":
                ("consume_ceiling", p.get("consume_ceiling")),
                "PostgreSQL COPY of as many synthetic rows, one transaction, no dedup":
                ("copy_ceiling", p.get("copy_ceiling"))}
    lower = min((p[k]["events_s"] for k in ("consume_ceiling", "copy_ceiling") if k in p), default=None)
    sp = r["spread"].get("processor") or {}
    lines = [f"{p['loaded']['messages']:,} events loaded into an isolated topic ({p['loaded']['distinct']:,} "
             "distinct, 10% duplicates), then drained into PostgreSQL by each contender with its own consumer "
             "group, each after the tables were emptied, in an order that rotates from run to run. Every contender is timed by its committed offsets "
             "the same way: *with start-up* is everything committed over the time from process start to "
             "drained; *once running* is what was committed after its first commit over the time after it "
             "(– when fewer than two commits were seen). The Quix Streams peer checkpoints within Tally's own "
             "bounds (every 0.2 s or 20,000 messages) and keeps the same per-subject hourly and daily counters; "
             "it keeps no counter outbox, publishes no counter states to Kafka, writes nothing to Redis, "
             "validates no envelopes and has no dead-letter topic. "
             f"{runs_text(r)} CPU µs per event: over the whole drain, per message consumed (proc: the "
             "contender's processes; pg, kafka as above).", "",
             "| ceiling | events/s |", "|---|---:|"]
    lines += [f"| {name} | {fig(c['events_s'], (sp.get(key) or {}).get('events_s'))} |"
              for name, (key, c) in ceilings.items() if c]
    lines += ["", "| contender | events/s once running | with start-up | start-up s | vs lower ceiling | "
                  "vs Quix, once running | CPU µs per event | exact counts |",
              "|---|---:|---:|---:|---:|---:|---|---|"]
    quix = p.get("quix")
    for key, label in (("tally_x1", "Tally processor ×1"), ("tally_x2", "Tally processor ×2 (same group)"),
                       ("quix", "Quix Streams peer")):
        d = p.get(key)
        if d:
            s = sp.get(key) or {}
            lines.append(f"| {label} | {fig(d['events_s'], s.get('events_s'))} | "
                         f"{fig(d['overall_events_s'], s.get('overall_events_s'))} | "
                         f"{fig(d['startup_s'], s.get('startup_s'), 1)} | {ratio(d['events_s'], lower)} | "
                         f"{ratio(d['events_s'], quix and quix['events_s'])} | {cpu(d, s)} | {check_text(d['check'])} |")
    x1 = p.get("tally_x1")
    lines += [
        "",
        f"- Aim: ≥ 50,000 events/s: {fmt(x1 and x1['events_s'])}"
        f" — {aim(x1['events_s'] >= 50_000 if x1 and x1['events_s'] else None)}",
        f"- Aim: ≥ half the lower ceiling ({fmt(lower)}): {ratio(x1 and x1['events_s'], lower)}"
        f" — {aim(x1['events_s'] >= lower / 2 if x1 and x1['events_s'] and lower else None)}",
        f"- Aim: ≥ 2× the Quix Streams peer (once running): {ratio(x1 and x1['events_s'], quix and quix['events_s'])}"
        f" — {aim(x1['events_s'] >= 2 * quix['events_s'] if x1 and quix and x1['events_s'] and quix['events_s'] else None)}",
    ]
    return lines


READS = (("log_search", "`GET /v1/logs`: a service, a level and above, one hour"),
         ("log_words", "`GET /v1/logs?q=`: words of the message, 24 hours"),
         ("log_stats_level_warm", "`GET /v1/logs/stats?by=level`, cache warm: the same hour every time"),
         ("log_stats_level_cold", "`GET /v1/logs/stats?by=level`, cache missed: a distinct hour every time"),
         ("log_stats_warm", "`GET /v1/logs/stats` (by service and level), cache warm"),
         ("log_stats_cold", "`GET /v1/logs/stats` (by service and level), cache missed"))


def logs(r: dict[str, Any]) -> list[str]:
    section = r.get("logs") or {}
    if "seed" not in section:
        return intake(r) or ["Not measured in this run."]
    seed, sp = section["seed"], r["spread"].get("logs") or {}
    lines = [f"{seed['rows']:,} log records of 50 services over the 7 days to {str(seed['until'])[:16]} UTC, in a "
             f"database made once by `benchmarks/logs_seed.py` (in {seed['seconds'] / 60:.0f} minutes) and reused: "
             "the processor's rows and dedup claims, and the `logs` meter's minute and hour windows derived from "
             "them. One gateway (4 database connections); k6 at a constant arrival rate, each request a random "
             "range of the seeded week (a random service and level, or a random search: common words, rarer pairs, "
             f"id-like words). {runs_text(r)}", "",
             "| query | asked req/s | achieved req/s | p50 ms | p95 ms | p99 ms | failed | answers from cache | aim p99 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, label in READS:
        load = section.get(key)
        if load:
            s = sp.get(key) or {}
            cache = load.get("cache") or {}
            answered = cache.get("cache_hits", 0) + cache.get("cache_misses", 0)
            share = f"{cache.get('cache_hits', 0) / answered:.0%}" if answered else "–"
            lines.append(f"| {label} | {fmt(load['rate'])} | {fig(load['req_s'], s.get('req_s'))} | "
                         f"{fig(load['p50_ms'], s.get('p50_ms'), 1)} | {fig(load['p95_ms'], s.get('p95_ms'), 1)} | "
                         f"{fig(load['p99_ms'], s.get('p99_ms'), 1)} | {load['failed']:.2%} | {share} | "
                         f"≤ {load['p99_aim_ms']} ms — {aim(load['p99_ms'] <= load['p99_aim_ms'])} |")
    return lines + intake(r)


INTAKES = (("intake", "Log intake", "log records", "published as the gateway publishes them"),
           ("events_intake", "Ordinary events' intake", "`api.request` events", "as the processor part loads them"))


def intake(r: dict[str, Any]) -> list[str]:
    """The drains with the read indexes and without them, of log records and of ordinary events."""
    section, sp = r.get("logs") or {}, r["spread"].get("logs") or {}
    lines: list[str] = []
    for prefix, title, what, how in INTAKES:
        drains = {k: v for k, v in section.items() if k.startswith(f"{prefix}_with")}
        if not drains:
            continue
        loaded = section[f"{prefix}_loaded"]
        lines += ["", f"{title}: {loaded['messages']:,} {what} ({loaded['distinct']:,} distinct, 10% duplicates) "
                      f"{how}, drained by one processor into the run's own (empty) database, with the read indexes ("
                      + ", ".join(f"`{name}`" for name in section.get("read_indexes", [])) + ") and with them "
                      "dropped, alternating; rates from committed offsets as in the processor table.", "",
                  "| drain | read indexes | events/s once running | with start-up | CPU µs per event | exact counts |",
                  "|---|---|---:|---:|---|---|"]
        for key, d in sorted(drains.items(), key=lambda item: int(item[0].rsplit("_", 1)[1])):
            s = sp.get(key) or {}
            lines.append(f"| {key.rsplit('_', 1)[1]} | {key.split('_')[-2]} | {fig(d['events_s'], s.get('events_s'))} | "
                         f"{fig(d['overall_events_s'], s.get('overall_events_s'))} | {cpu(d, s)} | "
                         f"{check_text(d['check'])} |")
        rates = {name: [d["events_s"] for k, d in drains.items() if k.split("_")[-2] == name and d["events_s"]]
                 for name in ("with", "without")}
        with_, without = (sum(v) / len(v) if v else None for v in rates.values())
        lines += ["", f"- With the read indexes, the intake drains at {ratio(with_, without)}× the rate without them "
                      f"({fmt(with_)} against {fmt(without)} events/s, means of the drains)."]
    return lines


def runs_text(r: dict[str, Any]) -> str:
    n = r.get("runs", 1)
    return ("One run." if n == 1 else
            f"Median of {n} runs, lowest–highest run in brackets where they differ.")


def check_text(check: dict[str, Any]) -> str:
    if "expected" not in check:
        return "not drained"
    found = ", ".join(f"{k} {v:,}" for k, v in check.items() if k not in ("expected", "exact"))
    return f"{'yes' if check['exact'] else '**no**'} ({check['expected']:,} expected: {found})"


def end_to_end(r: dict[str, Any], command: str) -> list[str]:
    e = r["e2e"]
    lines: list[str] = []
    if e:
        maxed, fixed_latency = e.get("max"), e.get("fixed_latency") or {}
        drain = e.get("max_drain") or {}
        lines += [
            f"Gateway and {e['processors']} processor(s) in one group on one topic, requests of {e['batch_size']} event(s). "
            "Receipt-to-commit latency is `persisted_at − received_at` of each event in PostgreSQL "
            "(persisted_at is the processor transaction's start, so the commit itself adds a few ms).", "",
            f"{runs_text(r)} CPU µs per event: over the load run and the drain after it, per event accepted.", "",
            "| run | accepted events/s | processed events/s (to drained) | HTTP p99 ms | receipt→commit p50 / p95 / p99 ms |"
            " CPU µs per event |",
            "|---|---:|---:|---:|---:|---|",
        ]
        se = r["spread"].get("e2e") or {}
        for label, key, drain_key, latency_key in (("highest rate", "max", "max_drain", "max_latency"),
                                                   ("5,000 events/s", "fixed_5000", "fixed_drain", "fixed_latency"),
                                                   ("retry-heavy mix (30% re-sent 2–3×)", "retry_mix", "retry_drain",
                                                    None)):
            load, drained = e.get(key), e.get(drain_key) or {}
            latency = (e.get(latency_key) or {}) if latency_key else {}
            if load:
                s, sd, sl = se.get(key) or {}, se.get(drain_key) or {}, (se.get(latency_key) or {}) if latency_key else {}
                lines.append(f"| {label} | {fig(load['events_s'], s.get('events_s'))} | "
                             f"{fig(drained.get('events_s'), sd.get('events_s'))} | {fig(load['p99_ms'], s.get('p99_ms'), 1)} | "
                             f"{fig(latency.get('p50_ms'), sl.get('p50_ms'))} / {fig(latency.get('p95_ms'), sl.get('p95_ms'))}"
                             f" / {fig(latency.get('p99_ms'), sl.get('p99_ms'))} | {cpu(load, s)} |")
        if "check" in e:
            c = e["check"]
            lines += ["", "Exact counts, PostgreSQL against the 202s the load generator received "
                          f"({'every run' if r.get('runs', 1) > 1 else 'the run'}; medians shown): "
                          f"{e['accepted']:,} events answered 202, {e['accepted_distinct']:,} of them distinct "
                          f"(the retry mix re-sends); on the topic {e['topic']['messages']:,} messages, "
                          f"{e['topic']['distinct']:,} distinct; persisted {c['events']:,}; counted "
                          + ", ".join(f"{k.removeprefix('counted_')} {v:,}" for k, v in c.items() if k.startswith("counted_"))
                          + f". Every figure equal to the distinct accepted: {'yes' if c['exact'] else '**no**'}. "
                          "Accepted events are counted by k6 from each answer; the ids themselves are not compared."]
        sustained = min(maxed["events_s"], drain.get("events_s") or 0) if maxed else None
        lines += [
            "",
            f"- Aim: ≥ 50,000 events/s accepted and persisted with counters (batches of 100): {fmt(sustained)}"
            f" — {aim(sustained >= 50_000 if sustained is not None and e['batch_size'] == 100 else None)}",
            f"- Aim: receipt→commit p99 < 1 s at 5,000 events/s: {fmt(fixed_latency.get('p99_ms'))} ms"
            f" — {aim(fixed_latency['p99_ms'] < 1000 if fixed_latency.get('p99_ms') is not None else None)}",
            "", "![throughput and latency over time](results.png)",
        ]
    m = r["machine"]
    lines += [
        "", "### How these figures were made", "",
        f"Command: `{command}` (from a checkout, after `bash deploy/local/up.sh`; {r['seconds']:.0f} s"
        f" for {r.get('runs', 1)} run(s)).  ",
        f"Machine: {m['cpus']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}; Kafka, "
        "PostgreSQL, Redis, the load generators and every contender share it.  ",
        f"Code: revision {m['revision']}. Versions: Python {m['python']}, Kafka {m['kafka']}, PostgreSQL "
        f"{m['postgresql']}, librdkafka {m['librdkafka']}, confluent-kafka {m['confluent_kafka']}, uvicorn "
        f"{m['uvicorn']}, Starlette {m['starlette']}, {m['k6']}, {m['wrk']}, Quix Streams {m['quixstreams']}.",
    ]
    if r.get("notes") or r.get("skipped"):
        lines += ["", "Notes from the run:"] + [f"- {n}" for n in r["notes"]]
        lines += [f"- skipped to stay within the time budget: {s}" for s in r.get("skipped", [])]
    return lines


def profile(path: Path, what: str, limit: int = 10) -> list[str]:
    """The busiest frames of a py-spy profile that `--profile` left beside results.json."""
    if not path.exists():
        return []
    head, _, rest = path.read_text().partition("self %   frame\n")
    frames = rest.split("\n\n")[0].splitlines()[:limit]
    return ["", f"Where the time goes ({what}; py-spy, {head.strip()}, share of samples spent in the frame itself;"
            " sampled during the last run's k6 highest-rate run for the gateway, or its ×1 drain for the processor,"
            " which therefore carry py-spy's overhead; the other rows were not sampled):",
            "", "```", *frames, "```"]


def fill(text: str, section: str, lines: list[str]) -> str:
    pattern = re.compile(rf"(<!-- section: {section} -->\n).*?(<!-- end: {section} -->)", re.S)
    return pattern.sub(lambda m: m[1] + "\n".join(lines) + "\n" + m[2], text)


def main() -> None:
    results_path, target, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].strip()
    results = json.loads(results_path.read_text())["summary"]
    text = target.read_text()
    out = results_path.parent
    only = results.get("args", {}).get("only") or ["gateway", "usage", "processor", "e2e"]
    sections = {
        "gateway": lambda: gateway(results) + profile(out / "profile-gateway.txt", "gateway, single events"),
        "usage": lambda: usage(results),
        "processor": lambda: processor(results) + profile(out / "profile-tally_x1.txt", "processor ×1 drain"),
        "e2e": lambda: end_to_end(results, command),
        "logs": lambda: logs(results),
    }
    if not results.get("args", {}).get("only"):  # a full run replaces every section: say which run that was
        text = fill(text, "about", [f"Every figure below comes from `{command}` at revision "
                                    f"{results['machine']['revision']}: {runs_text(results).lower().rstrip('.')}."])
    for part, lines in sections.items():
        if part not in only:
            continue  # a partial run (--only) leaves the other sections' figures as they were
        body = lines()
        if "e2e" not in only:  # the run's own command, machine and revision, beside its figures
            body += [""] + end_to_end({**results, "e2e": {}}, command)[3:]
        text = fill(text, "end-to-end" if part == "e2e" else part, body)
    target.write_text(text)


if __name__ == "__main__":
    main()
