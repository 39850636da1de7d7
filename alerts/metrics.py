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
LEADER = Gauge("tally_alerts_leader", "1 while this process is the active evaluator, 0 while standing by")
DELIVERIES = Counter("tally_alerts_deliveries", "Alert delivery attempts, by target kind and outcome (sent, retried, "
                     "failed)", ["kind", "outcome"])
