"""Product reads kept apart from the intake (security review H4, ADR 0081).

Key lookups have a database pool of their own; product routes read on another, whose statements the
server cancels after a timeout, and each tenant may have only a few product requests in flight in one
gateway. A tenant's costly searches then wait on its own slots and never on another tenant's key check. A
request waits a moment for one of its tenant's slots before it is refused, so a burst of quick reads (a
dashboard, a usage page) is served in turn while a tenant holding its slots with slow reads gets 429s.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tally.edge.problems import Problem

_HELD = "tally.read_slot"


class ReadSlots:
    def __init__(self, per_tenant: int, wait_s: float) -> None:
        self._per_tenant = per_tenant
        self._wait_s = wait_s
        self._busy: Counter[str] = Counter()
        self._freed: dict[str, asyncio.Event] = {}  # set when one of the tenant's slots is given back

    async def take(self, scope: Scope, tenant: str) -> None:
        """One slot of `tenant` for this request, given back when its route answered; 429 when none is free
        within the wait."""
        if _HELD in scope:
            return
        deadline = asyncio.get_running_loop().time() + self._wait_s
        while self._busy[tenant] >= self._per_tenant:
            freed = self._freed.setdefault(tenant, asyncio.Event())
            try:
                await asyncio.wait_for(freed.wait(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                raise Problem(429, "Too many requests", f"at most {self._per_tenant} product requests of a tenant"
                              " run at once; retry when one has answered", headers={"Retry-After": "1"}) from None
        self._busy[tenant] += 1
        scope[_HELD] = tenant

    def guard(self, route: BaseRoute) -> BaseRoute:
        """The route, giving back whatever slot its request took (a route that never takes one costs a call)."""
        if isinstance(route, Route):
            route.app = self._releasing(route.app)
        return route

    def _releasing(self, app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await app(scope, receive, send)
            finally:
                tenant = scope.pop(_HELD, None)
                if tenant is not None:
                    self._busy[tenant] -= 1
                    if not self._busy[tenant]:
                        del self._busy[tenant]
                    freed = self._freed.pop(tenant, None)
                    if freed is not None:
                        freed.set()  # every waiter looks again; those that find no slot wait on a new event

        return guarded
