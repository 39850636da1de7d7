"""A gateway, a processor, a jobs worker and an alert evaluator running at once, each with its /metrics
on a port of its own: what a Prometheus scrapes (tests of the dashboards and the alert rules)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tally.settings import Settings
from tally.topics import create_topics
from tests.gateway.helpers import start_gateway
from tests.support import TallyProcess, free_port, running, wait_until

# command -> (port setting, a metric its page shows once it serves); jobs as in deploy/prometheus/prometheus.yml
WORKERS = {"process": ("processor_metrics_port", "tally_processor_consumed_total", "tally-processor"),
           "jobs": ("jobs_metrics_port", "tally_reconcile_drift", "tally-jobs"),
           "alerts": ("alerts_metrics_port", "tally_alerts_leader", "tally-alerts")}


@dataclass
class Target:
    job: str
    url: str
    process: TallyProcess


def scrape(url: str) -> str:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return ""
    return response.text if response.status_code == 200 else ""


def sample(url: str, name: str, **labels: str) -> float | None:
    """The value of one series on a /metrics page (None while the page or the series is missing)."""
    for family in text_string_to_metric_families(scrape(url)):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@contextmanager
def tally_stack(settings: Settings, name: str) -> Iterator[dict[str, Target]]:
    """The four processes on topics and a consumer group of their own, each /metrics answering."""
    own = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}{name}.",
                                      "consumer_group": f"{settings.consumer_group}-{name}"})
    create_topics(own)
    targets: dict[str, Target] = {}
    with ExitStack() as stack:
        for command, (setting, _, job) in WORKERS.items():
            port = free_port()
            process = stack.enter_context(running(f"{command}-{name}", [command],
                                                  own.model_copy(update={setting: port})))
            targets[command] = Target(job, f"http://127.0.0.1:{port}/metrics", process)
        gateway = stack.enter_context(start_gateway(f"gateway-{name}", own))
        targets["gateway"] = Target("tally-gateway", f"{gateway.url}/metrics", gateway.process)
        for command, (_, expected, _) in WORKERS.items():
            url = targets[command].url
            wait_until(lambda url=url, expected=expected: expected in scrape(url), 60, 0.2, f"the {command} /metrics")
        yield targets
