"""Made-up API keys (review 2026-11 M1): their database lookups are rate-limited per address, and they
cannot push valid keys out of the cache."""

from __future__ import annotations

from tally.edge.products import Principal
from tally.ingest.auth import _Lru
from tally.settings import Settings
from tests.gateway.helpers import event, start_gateway


async def test_lookups_of_unknown_tokens_are_rate_limited_per_address(
    gateway_settings: Settings, api_key: tuple[str, str]
) -> None:
    _, secret = api_key
    with start_gateway("gateway-auth-flood", gateway_settings, TALLY_GATEWAY_KEY_LOOKUP_RATE_LIMIT_BURST="5",
                       TALLY_GATEWAY_KEY_LOOKUP_RATE_LIMIT_PER_S="0.1") as gw:
        async with gw.client(secret) as valid, gw.client() as client:
            assert (await valid.post("/v1/events", json=event())).status_code == 202
            statuses = [(await client.post(route, json=event(), headers={"Authorization": f"Bearer tly_bogus{n}"}))
                        .status_code for n, route in enumerate(["/v1/events", "/v1/logs"] * 5)]
            still = await valid.post("/v1/events", json=event())  # cached: no lookup, no bucket
    assert statuses[:4] == [401] * 4 and set(statuses[4:]) == {429}  # the valid key's first lookup took one
    assert still.status_code == 202


def test_unknown_tokens_evict_only_each_other() -> None:
    known, unknown = _Lru(2, 60), _Lru(2, 60)
    principal = Principal("k", "t", frozenset())
    known.put(b"valid", principal, 0)
    for n in range(1000):
        unknown.put(str(n).encode(), None, 0)
    assert known.get(b"valid", 1) == (True, principal)
    assert unknown.get(b"999", 1) == (True, None) and unknown.get(b"0", 1) == (False, None)
