"""How a long-running process runs: until SIGTERM or SIGINT, with its Prometheus /metrics beside it.

The processor, the jobs worker and the alert evaluator all run this way (the gateway runs under uvicorn, which
handles signals itself and serves /metrics as a route). The signal handlers are in place before anything else
starts, so a stop asked for during start-up is a clean exit once the process has started, never a kill.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from prometheus_client import start_http_server

log = logging.getLogger("tally")

Main = Callable[[asyncio.Event], Awaitable[None]]  # the process's work, until the event is set


def run_until_signal(main: Main, metrics_host: str, metrics_port: int) -> int:
    """Run `main` until it returns after SIGTERM or SIGINT set its event; 0, the exit status, once it has."""
    asyncio.run(_until_signal(main, metrics_host, metrics_port))
    return 0


async def _until_signal(main: Main, metrics_host: str, metrics_port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serve_metrics(metrics_host, metrics_port)
    await main(stop)


def serve_metrics(host: str, port: int) -> None:
    """Start the /metrics endpoint (port 0: none); a busy port is logged, not fatal: metrics never stop work."""
    if port <= 0:
        return
    try:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
    except OSError as exc:
        log.warning("metrics port %d unavailable: %s", port, exc)
