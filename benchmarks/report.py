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


def ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.2f}"


def aim(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "**not met**")


def load_table(rows: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]]) -> list[str]:
    lines = ["| endpoint | tool | req/s | events/s | p50 ms | p95 ms | p99 ms | failed | vs raw ASGI |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, load, base in rows:
        if load:
            lines.append(f"| {label} | {load['tool']} | {fmt(load['req_s'])} | {fmt(load['events_s'])} | "
                         f"{fmt(load['p50_ms'], 1)} | {fmt(load['p95_ms'], 1)} | {fmt(load['p99_ms'], 1)} | "
                         f"{load['failed']:.2%} | {ratio(load['req_s'], base and base['req_s'])} |")
    return lines


def gateway(r: dict[str, Any]) -> list[str]:
    g = r["gateway"]
    raw_wrk, raw_k6 = g.get("wrk_raw_asgi"), g.get("k6_raw_asgi_max")
    rows = [
        ("bare raw ASGI + orjson", raw_wrk, raw_wrk), ("bare Starlette", g.get("wrk_starlette"), raw_wrk),
        ("gateway, single events", g.get("wrk_gateway_single"), raw_wrk),
        ("bare raw ASGI + orjson, highest rate", raw_k6, raw_k6),
        ("gateway, single events, highest rate", g.get("k6_gateway_single_max"), raw_k6),
        ("gateway, single events, 70% of highest", g.get("k6_gateway_single_rate"), None),
        ("gateway, batches of 100, highest rate", g.get("k6_gateway_batch_max"), None),
        ("gateway, batches of 100, 70% of highest", g.get("k6_gateway_batch_rate"), None),
        ("gateway, log records (100 a request)", g.get("k6_logs"), None),
        ("gateway, signed Stripe webhooks", g.get("k6_webhook"), None),
    ]
    single = g.get("wrk_gateway_single")
    batch = g.get("k6_gateway_batch_max")
    reported = g.get("k6_gateway_single_rate")
    return [
        "Single events carry auth (cached API key), the per-key rate limiter (limits lifted, still run) and the "
        "Kafka ack (acks=all, idempotent) on every request. wrk: 1 thread, 64 connections; k6: 32 closed-loop "
        "users for the highest rate, then a constant arrival rate at 70% of it. k6 takes a core of its own here, "
        "so its figures sit below wrk's for every endpoint alike.",
        "",
        *load_table(rows),
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
    rows = [(f"single events, {name} hard limits, round {n}", u.get(f"wrk_single_{name}_{n}"))
            for n in (1, 2) for name in ("without", "with")]
    rows.append(("GET /v1/usage, constant 1,000 req/s", u.get("k6_usage_read")))

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
        "for the 500 subscribed subjects (a period of 20 days so far: settled windows folded in memory, the last "
        "day's hour windows from Redis) at a constant arrival rate.",
        "",
        "| load | tool | req/s | p50 ms | p95 ms | p99 ms | failed |",
        "|---|---|---:|---:|---:|---:|---:|",
        *[f"| {label} | {load['tool']} | {fmt(load['req_s'])} | {fmt(load['p50_ms'], 1)} | {fmt(load['p95_ms'], 1)} | "
          f"{fmt(load['p99_ms'], 1)} | {load['failed']:.2%} |" for label, load in rows if load],
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
    ceilings = {"Kafka ProducerPerformance (acks=all, idempotent, lz4)": p.get("produce_ceiling"),
                "bare confluent-kafka produce loop (the loader)": p.get("loaded"),
                "bare confluent-kafka consume (+ JSON parse)": p.get("consume_ceiling"),
                "PostgreSQL COPY of the distinct rows": p.get("copy_ceiling")}
    lower = min((p[k]["events_s"] for k in ("consume_ceiling", "copy_ceiling") if k in p), default=None)
    lines = [f"{p['loaded']['messages']:,} events loaded into an isolated topic ({p['loaded']['distinct']:,} "
             "distinct, 10% duplicates), then drained into PostgreSQL by each contender with its own consumer "
             "group. Rates are measured from the first committed batch to the last (start-up and group join "
             "are shown apart) where at least three commits were seen, else over the whole drain.", "",
             "| ceiling | events/s |", "|---|---:|"]
    lines += [f"| {name} | {fmt(c['events_s'])} |" for name, c in ceilings.items() if c]
    lines += ["", "| contender | events/s | with start-up | start-up s | vs lower ceiling | vs Quix, both with start-up | exact counts |",
              "|---|---:|---:|---:|---:|---:|---|"]
    quix = p.get("quix")
    for key, label in (("tally_x1", "Tally processor ×1"), ("tally_x2", "Tally processor ×2 (same group)"),
                       ("quix", "Quix Streams peer")):
        d = p.get(key)
        if d:
            lines.append(f"| {label} | {fmt(d['events_s'])} | {fmt(d['overall_events_s'])} | "
                         f"{fmt(d['startup_s'] if d['commits_seen'] >= 3 else None, 1)} | {ratio(d['events_s'], lower)} | "
                         f"{ratio(d['overall_events_s'], quix and quix['overall_events_s'])} | {check_text(d['check'])} |")
    x1 = p.get("tally_x1")
    lines += [
        "",
        f"- Aim: ≥ 50,000 events/s: {fmt(x1 and x1['events_s'])} — {aim(x1['events_s'] >= 50_000 if x1 else None)}",
        f"- Aim: ≥ half the lower ceiling ({fmt(lower)}): {ratio(x1 and x1['events_s'], lower)}"
        f" — {aim(x1['events_s'] >= lower / 2 if x1 and lower else None)}",
        f"- Aim: ≥ 2× the Quix Streams peer (rates with start-up, since Quix commits every 5 s): "
        f"{ratio(x1 and x1['overall_events_s'], quix and quix['overall_events_s'])}"
        f" — {aim(x1['overall_events_s'] >= 2 * quix['overall_events_s'] if x1 and quix else None)}",
    ]
    return lines


def check_text(check: dict[str, Any]) -> str:
    if "expected" not in check:
        return "not drained"
    found = ", ".join(f"{k} {v:,}" for k, v in check.items() if k not in ("expected", "exact", "accepted_in_topic"))
    return f"{'yes' if check['exact'] else '**no**'} ({check['expected']:,} expected: {found})"


def end_to_end(r: dict[str, Any], command: str) -> list[str]:
    e = r["e2e"]
    lines: list[str] = []
    if e:
        maxed, fixed, fixed_latency = e.get("max"), e.get("fixed_5000"), e.get("fixed_latency") or {}
        drain = e.get("max_drain") or {}
        lines += [
            f"Gateway and {e['processors']} processor(s) in one group on one topic, requests of {e['batch_size']} event(s). "
            "Receipt-to-commit latency is `persisted_at − received_at` of each event in PostgreSQL "
            "(persisted_at is the processor transaction's start, so the commit itself adds a few ms).", "",
            "| run | accepted events/s | processed events/s (to drained) | HTTP p99 ms | receipt→commit p50 / p95 / p99 ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, load, drained, latency in (("highest rate", maxed, drain, e.get("max_latency") or {}),
                                              ("5,000 events/s", fixed, e.get("fixed_drain") or {}, fixed_latency),
                                              ("retry-heavy mix (30% re-sent 2–3×)", e.get("retry_mix"),
                                               e.get("retry_drain") or {}, {})):
            if load:
                lines.append(f"| {label} | {fmt(load['events_s'])} | {fmt(drained.get('events_s'))} | "
                             f"{fmt(load['p99_ms'], 1)} | {fmt(latency.get('p50_ms'))} / {fmt(latency.get('p95_ms'))}"
                             f" / {fmt(latency.get('p99_ms'))} |")
        if "check" in e:
            lines += ["", f"Exact counts over the whole run: {e['accepted']:,} events accepted (202), "
                          f"{e['topic']['messages']:,} messages on the topic, {e['topic']['distinct']:,} distinct; "
                          f"persisted and counted: {check_text(e['check'])}."]
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
        f"Command: `{command}` (from a checkout, after `bash deploy/local/up.sh`; {r['seconds']:.0f} s).  ",
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
            " sampled during that measured run, which therefore carries py-spy's overhead):",
            "", "```", *frames, "```"]


def fill(text: str, section: str, lines: list[str]) -> str:
    pattern = re.compile(rf"(<!-- section: {section} -->\n).*?(<!-- end: {section} -->)", re.S)
    return pattern.sub(lambda m: m[1] + "\n".join(lines) + "\n" + m[2], text)


def main() -> None:
    results_path, target, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].strip()
    results = json.loads(results_path.read_text())
    text = target.read_text()
    out = results_path.parent
    only = results.get("args", {}).get("only") or ["gateway", "usage", "processor", "e2e"]
    sections = {
        "gateway": lambda: gateway(results) + profile(out / "profile-gateway.txt", "gateway, single events"),
        "usage": lambda: usage(results),
        "processor": lambda: processor(results) + profile(out / "profile-tally_x1.txt", "processor ×1 drain"),
        "e2e": lambda: end_to_end(results, command),
    }
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
