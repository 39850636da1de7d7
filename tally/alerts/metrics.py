"""Prometheus metrics of `tally alerts`, served on TALLY_ALERTS_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TRANSITIONS = Counter("tally_alerts_transitions", "Transitions recorded, by kind (firing, resolved)", ["kind"])
EVALUATION_SECONDS = Histogram("tally_alerts_evaluation_seconds", "One round over every due rule, commit included",
                               buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
STATES_READ = Counter("tally_alerts_counter_states", "Counter-topic messages read, by outcome (kept, ignored, "
                      "skipped: not a counter state)", ["outcome"])
WINDOWS = Gauge("tally_alerts_windows", "Minute counter windows held for the rules")
RULES = Gauge("tally_alerts_rules", "Rules being evaluated")
OUTBOX_BACKLOG = Gauge("tally_alerts_outbox_backlog", "Transitions recorded and not yet published to the alerts "
                       "topic, counted up to 100000 by the active evaluator (0 while standing by)")
LEADER = Gauge("tally_alerts_leader", "1 while this process is the active evaluator, 0 while standing by")
DELIVERIES = Counter("tally_alerts_deliveries", "Alert delivery attempts, by target kind and outcome (sent, retried, "
                     "failed, refused: a target that may not be used)", ["kind", "outcome"])
SKIPPED = Counter("tally_alerts_skipped", "Stored rows a tenant wrote that cannot be used, skipped (and shown to the "
                  "tenant where it can see them), by what they are (rule, usage_alert)", ["what"])
LEADERSHIP_LOST = Counter("tally_alerts_leadership_lost", "Terms as the active evaluator that ended before the process "
                          "stopped (leader lock lost, fenced off, an outage or a fault); it stands by and tries again")
STALE = Counter("tally_alerts_stale_decisions", "Evaluation commits refused because a standing had moved since it was "
                "read (a lost commit answer, a second evaluator); the standings are read again")
