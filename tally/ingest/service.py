"""`tally gateway`: the gateway app (tally/ingest/app.py) with the products it serves, under uvicorn.

uvicorn handles SIGTERM and SIGINT itself (requests in flight get `graceful_shutdown_s`) and /metrics is one of
the app's routes, so the gateway needs no more. tally/wiring.py builds ServiceConfig from settings (products
included: the gateway imports none); nothing here reads the environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import uvicorn

from tally.ingest.app import create_app
from tally.ingest.config import GatewayConfig
from tally.edge.products import Product


@dataclass(frozen=True)
class ServiceConfig:
    gateway: GatewayConfig
    products: Sequence[Product] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    limit_concurrency: int = 1000  # connections and tasks served at once; more get 503
    trusted_proxies: str = "127.0.0.1"  # addresses whose X-Forwarded-For is believed (comma-separated, * for any)
    graceful_shutdown_s: int = 10


def run(config: ServiceConfig) -> int:
    uvicorn.run(create_app(config.gateway, config.products), host=config.host, port=config.port,
                log_level="warning", access_log=False, timeout_graceful_shutdown=config.graceful_shutdown_s,
                limit_concurrency=config.limit_concurrency, forwarded_allow_ips=config.trusted_proxies)
    return 0
