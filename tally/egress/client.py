"""An httpx client for tenant-aimed calls: the address it connects to is the one it checked.

httpx resolves names inside its connection pool, after any check a caller could make, so a name that resolves to
a public address when checked and to 127.0.0.1 a moment later (DNS rebinding) would slip through. Here the
network backend resolves the name itself, refuses addresses no tenant may reach and connects to the checked
address; TLS still verifies the certificate against the name. No proxy from the environment (it would connect
on our behalf, unchecked) and no redirects (a redirect would be a second, unchecked URL).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from tally.egress import EgressPolicy, resolve_checked


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        addresses = await resolve_checked(host, port, self._policy)  # Refused propagates as is: not retried
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure or httpcore.ConnectError(f"{host} has no address")

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no unix sockets for tenant-aimed calls")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def client(policy: EgressPolicy, *, max_connections: int = 100) -> httpx.AsyncClient:
    """The client for calls to tenants' URLs. Callers bound each call's total time themselves (httpx's timeout
    bounds each read, not the request)."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    # httpx builds its pool without a way to pass the network backend; the same pool, with ours.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False), max_connections=max_connections,
        max_keepalive_connections=20, keepalive_expiry=5.0, network_backend=_CheckedBackend(policy))
    return httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False)
