"""`tally jobs`: the billing jobs worker (tally/billing/jobs.py) until a signal, with its /metrics
(tally/running.py). tally/wiring.py builds ServiceConfig from settings; nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from functools import partial

from tally.billing.context import BillingConfig, JobContext
from tally.billing.jobs import work
from tally.billing.registry import SCHEDULED
from tally.running import run_until_signal


@dataclass(frozen=True)
class ServiceConfig:
    billing: BillingConfig
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no /metrics


def run(config: ServiceConfig) -> int:
    if refused(config.billing):
        return 2
    return run_until_signal(partial(serve, config.billing), config.metrics_host, config.metrics_port)


async def serve(config: BillingConfig, stop: asyncio.Event) -> None:
    """The scheduled jobs, hard limits and usage alerts until `stop`."""
    ctx = await JobContext.open(config)
    try:
        await work(ctx, SCHEDULED, stop)
    finally:
        await ctx.close()


def refused(config: BillingConfig) -> bool:
    """Whether jobs must not run on these settings (each reason printed): the worker and `tally jobs run` refuse
    alike."""
    for problem in config.problems():
        print(f"tally jobs: {problem}", file=sys.stderr)
    return bool(config.problems())
