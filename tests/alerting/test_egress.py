"""Outbound calls to tenants' URLs (security review H1, H2): what the default refuses, what an operator allows,
and the address checked again when the client connects, after DNS (a name that resolves to loopback)."""

from __future__ import annotations

import pytest

import tally.egress.client
from tally.egress import EgressPolicy, Refused, check_target, check_url, endpoint
from tests.alerting.receivers import receiver

DEFAULT = EgressPolicy()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/v1/alert-rules", "http://10.1.2.3/", "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:9000/", "http://localhost:8080/", "http://192.168.0.1/", "http://100.100.100.200/",
    "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "http://224.0.0.1/", "http://[fd00:ec2::254]/",
    "http://[64:ff9b::a9fe:a9fe]/",
])
async def test_the_default_refuses_addresses_no_tenant_may_reach(url: str) -> None:
    with pytest.raises(Refused, match="may not reach"):
        await check_target(url, "webhook", DEFAULT)


@pytest.mark.parametrize("url", ["http://", "http://a b/", "ftp://x.example/", "x" * 10, "http://u:p@x.example/",
                                 "https://x.example/" + "a" * 2100, None, 7, "http://x.example:0/"])
async def test_urls_a_worker_cannot_use_are_refused(url: object) -> None:
    with pytest.raises(Refused):
        check_url(url, "webhook", DEFAULT)


async def test_slack_targets_are_on_slack_s_hook_host_unless_configured() -> None:
    assert check_url("https://hooks.slack.com/services/T/B/x", "slack", DEFAULT)
    with pytest.raises(Refused, match="hooks.slack.com"):
        check_url("https://evil.example/services/T/B/x", "slack", DEFAULT)
    mine = EgressPolicy.parse("", "chat.internal.example, hooks.slack.com")
    assert check_url("https://chat.internal.example/x", "slack", mine)


async def test_an_operator_allows_networks_and_hosts() -> None:
    policy = EgressPolicy.parse("127.0.0.0/8, 10.0.0.5, localhost")
    for url in ("http://127.0.0.1:9/", "http://10.0.0.5/", "http://localhost:1/"):
        assert await check_target(url, "webhook", policy) == url
    with pytest.raises(Refused):
        await check_target("http://10.0.0.6/", "webhook", policy)
    with pytest.raises(Refused):
        await check_target("http://169.254.169.254/", "webhook", policy)


async def test_the_client_checks_the_address_it_connects_to() -> None:
    """check_url passes a name it has not resolved; the client resolves it itself and refuses loopback, so a name
    that resolved elsewhere when it was saved cannot reach us when the request goes out."""
    with receiver() as rx:
        port = rx.url.rsplit(":", 1)[1]
        named = f"http://localhost:{port}/hook"
        assert check_url(named, "webhook", DEFAULT) == named  # a name: not resolved by check_url
        async with tally.egress.client.client(DEFAULT) as client:
            with pytest.raises(Refused, match="loopback"):
                await client.post(named, content=b"{}")
            with pytest.raises(Refused, match="loopback"):
                await client.post(f"{rx.url}/hook", content=b"{}")
        assert rx.received == []
        async with tally.egress.client.client(EgressPolicy.parse("127.0.0.1/32")) as client:
            assert (await client.post(named, content=b"{}")).status_code == 200
        assert len(rx.at("/hook")) == 1


def test_an_endpoint_shows_scheme_and_host_only() -> None:
    assert endpoint("https://hooks.slack.com/services/T/B/secret") == "https://hooks.slack.com"
    assert endpoint("https://u:p@ops.example.com:8443/hook?token=x") == "https://ops.example.com:8443"
    assert endpoint("http://[::1]:9/x") == "http://[::1]:9"
