"""How a long-running process runs: until SIGTERM or SIGINT, with its Prometheus /metrics beside it.

The processor, the jobs worker and the alert evaluator all run this way (the gateway runs under uvicorn, which
handles signals itself and serves /metrics as a route). The signal handlers are in place before anything else
starts, so a stop asked for during start-up is a clean exit once the process has started, never a kill.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import signal
from collections.abc import Awaitable, Callable

from prometheus_client import start_http_server

log = logging.getLogger("tally")

STOP_REPORT_S = 15.0  # a clean stop takes a second or two; a supervisor commonly kills after 30 s

Main = Callable[[asyncio.Event], Awaitable[None]]  # the process's work, until the event is set


def run_until_signal(main: Main, metrics_host: str, metrics_port: int) -> int:
    """Run `main` until it returns after SIGTERM or SIGINT set its event; 0, the exit status, once it has."""
    asyncio.run(_until_signal(main, metrics_host, metrics_port))
    return 0


async def _until_signal(main: Main, metrics_host: str, metrics_port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stopping, stop)
    serve_metrics(metrics_host, metrics_port)
    await main(stop)


def _stopping(stop: asyncio.Event) -> None:
    """Ask `main` to return; if the process is still here `STOP_REPORT_S` later, the stacks of its pending tasks
    are logged and every thread's goes to stderr, so a stop that hangs says where (the process goes on; a
    supervisor's kill ends it)."""
    if not stop.is_set():
        log.info("stopping")
        faulthandler.dump_traceback_later(STOP_REPORT_S)
        asyncio.get_running_loop().call_later(STOP_REPORT_S - 1, _report_tasks)
    stop.set()


def _report_tasks() -> None:
    for task in asyncio.all_tasks():
        log.warning("still pending after the stop: %s", " <- ".join(_awaiting(task.get_coro())) or repr(task))


def _awaiting(coro: object) -> list[str]:
    """Where a suspended coroutine waits: each coroutine it awaits through, innermost last, then what that awaits."""
    out = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            out.append(repr(coro)[:200])
            break
        out.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return out


def serve_metrics(host: str, port: int) -> None:
    """Start the /metrics endpoint (port 0: none); a busy port is logged, not fatal: metrics never stop work."""
    if port <= 0:
        return
    try:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
    except OSError as exc:
        log.warning("metrics port %d unavailable: %s", port, exc)
