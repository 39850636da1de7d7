"""Metric labels come from route templates only (security review H5, issue 19 item 3): a flood of requests
with made-up keys to made-up paths adds no series to /metrics."""

from __future__ import annotations

import secrets

from tally.settings import Settings
from tests.gateway.helpers import start_gateway


def _series(page: str) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in page.splitlines() if line and not line.startswith("#")]


def _paths() -> list[str]:
    token = secrets.token_hex(200)
    return [f"/v1/alert-rules/{token}", f"/v1/subscriptions/{token}", f"/usage/{token}/data", f"/{token}",
            f"/v1/webhooks/{token}", f"/v1/usage/alerts/{secrets.randbelow(10**9)}/read"]


async def test_a_flood_of_unknown_keys_on_random_paths_adds_no_series(gateway_settings: Settings) -> None:
    with start_gateway("gateway-labels", gateway_settings, TALLY_GATEWAY_KEY_LOOKUP_RATE_LIMIT_BURST="3",
                       TALLY_GATEWAY_KEY_LOOKUP_RATE_LIMIT_PER_S="0.01") as gw:
        async with gw.client() as client:
            async def flood(rounds: int) -> set[int]:
                statuses = set()
                for _ in range(rounds):
                    for path in _paths():
                        method = "POST" if path.endswith("/read") or "/webhooks/" in path else "GET"
                        token = "tly_" + secrets.token_urlsafe(32)
                        answer = await client.request(method, path, headers={"Authorization": f"Bearer {token}"})
                        statuses.add(answer.status_code)
                return statuses

            await flood(5)  # every kind of answer once: 401, then 429 once the address's lookups are used up
            await client.get("/metrics")  # the page's own route has its series from now on
            before = _series((await client.get("/metrics")).text)
            statuses = await flood(100)
            after = _series((await client.get("/metrics")).text)
    assert 429 in statuses
    assert sorted(set(after) - set(before)) == []
    assert len(after) == len(before)
