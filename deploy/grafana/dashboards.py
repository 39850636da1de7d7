"""Tally's Grafana dashboard as code (grafana-foundation-sdk); writes deploy/grafana/dashboards/tally.json.

Run `python deploy/grafana/dashboards.py` after a change and commit the JSON: compose provisions it, and
tests/test_grafana_dashboards.py holds it equal to this script's output and checks every query names
only metrics a Tally /metrics page exposes. Jobs are named as in deploy/prometheus/prometheus.yml."""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT = Path(__file__).resolve().parent / "dashboards" / "tally.json"
SOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"


def _query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(SOURCE)


def _series(title: str, unit: str, description: str, *queries: tuple[str, str], width: int = 12) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit).datasource(SOURCE)
             .height(8).span(width))
    for ref, (expr, legend) in zip("ABCDEFGH", queries):
        panel = panel.with_target(_query(expr, legend, ref))
    return panel


def _quantiles(histogram: str, legend: str = "", quantiles: tuple[float, ...] = (0.5, 0.99)) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket[{RATE}])))", f"{legend}p{int(q * 100)}")
            for q in quantiles]


def build() -> dict:
    board = (
        dashboard.Dashboard("Tally")
        .uid("tally-overview")
        .tags(["tally"])
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("utc")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))

        .with_row(dashboard.Row("Intake"))
        .with_panel(_series(
            "Intake rate", "ops", "Events acked by Kafka per second, by route; events refused, by reason.",
            (f"sum by (route) (rate(tally_gateway_events_accepted_total[{RATE}]))", "accepted {{route}}"),
            (f"sum by (reason) (rate(tally_gateway_events_rejected_total[{RATE}]))", "refused {{reason}}")))
        .with_panel(_series(
            "Answers by status", "reqps", "Gateway answers per second by HTTP status (503: Kafka or Redis down).",
            (f"sum by (status) (rate(tally_gateway_requests_total[{RATE}]))", "{{status}}")))
        .with_panel(_series(
            "Hard-limit blocks", "ops", "Events refused with 429 because their subject used up a hard-limited "
            "allowance (docs/adr/0042).",
            (f'sum by (route) (rate(tally_gateway_events_rejected_total{{reason="usage_limit_exceeded"}}[{RATE}]))',
             "{{route}}")))
        .with_panel(_series(
            "Gateway latency", "s", "Request latency and the time to Kafka's ack (acks=all).",
            *_quantiles("tally_gateway_request_seconds", "request "),
            *_quantiles("tally_gateway_produce_seconds", "Kafka ack ", (0.99,))))

        .with_row(dashboard.Row("Processors"))
        .with_panel(_series(
            "Consumer lag (messages)", "short", "High watermark minus committed offset, per topic of the "
            "processors' group.",
            ("sum by (job, topic) (max by (job, topic, partition) (tally_processor_consumer_lag))",
             "{{job}} {{topic}}")))
        .with_panel(_series(
            "Consumer lag (seconds)", "s", "Lag divided by the group's consume rate: how long the backlog takes "
            "to drain at the present pace.",
            ("sum by (job) (tally_processor_consumer_lag) / "
             f"sum by (job) (rate(tally_processor_consumed_total[{RATE}]))", "{{job}}")))
        .with_panel(_series(
            "Batch time", "s", "Consume to offset commit, per batch.",
            *_quantiles("tally_processor_batch_duration_seconds")))
        .with_panel(_series(
            "CPU per event", "s", "Processor CPU seconds per event consumed (the figure that sizes a member).",
            (f'sum by (job) (rate(process_cpu_seconds_total{{job="tally-processor"}}[{RATE}])) / '
             f"sum by (job) (rate(tally_processor_consumed_total[{RATE}]))", "{{job}}")))
        .with_panel(_series(
            "Receipt to commit", "s", "Gateway receipt to the processor's offset commit of the event.",
            *_quantiles("tally_processor_end_to_end_seconds")))
        .with_panel(_series(
            "Dead letters by stage and reason", "ops", "Messages sent to the dead-letter topic "
            "(`tally dlq list` shows them).",
            (f"sum by (stage, error_class) (rate(tally_processor_dead_lettered_total[{RATE}]))",
             "{{stage}} {{error_class}}")))
        .with_panel(_series(
            "Retries and abandoned batches", "ops", "Retried steps (a dependency failing) and batches given up "
            "uncommitted (redelivered, absorbed by dedup).",
            (f"sum by (step) (rate(tally_processor_retries_total[{RATE}]))", "retry {{step}}"),
            (f"sum by (reason) (rate(tally_processor_batches_abandoned_total[{RATE}]))", "abandoned {{reason}}")))
        .with_panel(_series(
            "Persisted, duplicates, late", "ops", "New events stored; re-sent ones recognised; events past the "
            "late horizon (stored, not counted).",
            (f"sum(rate(tally_processor_persisted_total[{RATE}]))", "persisted"),
            (f"sum(rate(tally_processor_duplicates_total[{RATE}]))", "duplicates"),
            (f"sum(rate(tally_processor_late_events_total[{RATE}]))", "late")))

        .with_panel(_series(
            "Outbox backlog", "short", "Rows committed and not yet published: counter windows for the counter "
            "topic (the processors'), transitions for the alerts topic (the active evaluator's). Every member reads "
            "the same table, hence max.",
            ("max(tally_processor_outbox_backlog)", "counter windows"),
            ("max(tally_alerts_outbox_backlog)", "alert transitions")))

        .with_row(dashboard.Row("Billing and alerts"))
        .with_panel(_series(
            "Drift found", "short", "Counter windows or Stripe periods reconciliation found drifting, per hour.",
            ("sum by (place) (increase(tally_reconcile_drift_total[1h]))", "{{place}}")))
        .with_panel(_series(
            "Stripe report rows", "short", "Rows to send (pending, deferred, cancelling) and rows that need a person "
            "(failed: refused by Stripe, `tally billing retry`; held: `tally billing resolve`). `tally billing rows` "
            "lists them.",
            ("max by (status) (tally_billing_report_rows)", "{{status}}")))
        .with_panel(_series(
            "Stripe sends", "short", "How sending runs ended for rows, per hour: sent, deferred (Stripe failing or "
            "the breaker open), failed (refused), held, superseded, cancelled.",
            ("sum by (outcome) (increase(tally_billing_report_sends_total[1h]))", "{{outcome}}")))
        .with_panel(_series(
            "Stripe circuit breaker", "short", "1 for the breaker's state in the jobs worker. Open: rows are "
            "deferred until a later run finds Stripe answering.",
            ("max by (state) (tally_billing_stripe_breaker_state)", "{{state}}")))
        .with_panel(_series(
            "Subjects blocked by a hard limit", "short", "Subjects whose events the gateway refuses now, over every "
            "tenant (the events refused are in Hard-limit blocks).",
            ("max(tally_usage_blocked_subjects)", "blocked")))
        .with_panel(_series(
            "Alert evaluation", "s", "One round over every due rule, commit included.",
            *_quantiles("tally_alerts_evaluation_seconds")))
        .with_panel(_series(
            "Alert deliveries", "ops", "Delivery attempts by target kind and outcome (sent, retried, failed).",
            (f"sum by (kind, outcome) (rate(tally_alerts_deliveries_total[{RATE}]))", "{{kind}} {{outcome}}")))
        .with_panel(stat.Panel().title("Active alert evaluators").description(
            "Processes holding the evaluator's lock: 1 is right, 0 means no alert rule is evaluated.")
            .datasource(SOURCE).height(4).span(6)
            .with_target(_query("sum(tally_alerts_leader)", "active", "A")))
        .with_panel(stat.Panel().title("Processes up").description("Tally processes Prometheus scrapes, by job.")
            .datasource(SOURCE).height(4).span(6)
            .with_target(_query('sum by (job) (up{job=~"tally-.*"})', "{{job}}", "A")))
    )
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
