"""Outbound HTTP calls a tenant can aim (alert webhooks, Slack incoming webhooks): which URLs are taken, and an
HTTP client that checks the address it actually connects to.

A tenant's URL must never reach our own network: loopback, private, link-local (the cloud metadata service at
169.254.169.254), shared, multicast or reserved addresses are refused unless the operator lists them in
TALLY_ALERTS_ALLOW_PRIVATE_TARGETS. The URL is checked where it enters (a 4xx naming the field) and the address
again at connect time, after DNS, so a name that later resolves elsewhere (DNS rebinding) is refused too
(docs/adr/0075). Other products that call tenant URLs import this package.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_BYTES = 2048
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(ValueError):
    """A URL or address an outbound call must not use; the text says why, without the URL (it may be a secret)."""


@dataclass(frozen=True)
class EgressPolicy:
    """What a tenant's URL may reach. `allowed_networks`/`allowed_hosts`: what the operator allows beyond public
    addresses (a self-hosted receiver on the private network); `slack_hosts`: where a Slack target may point."""

    allowed_networks: tuple[Network, ...] = ()
    allowed_hosts: frozenset[str] = frozenset()
    slack_hosts: frozenset[str] = field(default_factory=lambda: frozenset({"hooks.slack.com"}))

    @classmethod
    def parse(cls, allow_private: str = "", slack_hosts: str = "hooks.slack.com") -> "EgressPolicy":
        """From the settings' text: comma-separated CIDRs, addresses or host names."""
        networks, hosts = [], set()
        for item in (part.strip() for part in allow_private.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts),
                   frozenset(h.strip().lower() for h in slack_hosts.split(",") if h.strip()))

    def check_address(self, address: str) -> None:
        """Refuse an address no tenant may reach, unless the operator allows it."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip in network for network in self.allowed_networks):
            return
        trouble = _trouble(ip)
        if trouble:
            raise Refused(f"the target resolves to a {trouble} address, which tenants may not reach")

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allowed_hosts


def _embedded(ip: Address) -> Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64), which is what the packet reaches."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return ip.ipv4_mapped
        if ip.sixtofour:
            return ip.sixtofour
        if ip.teredo:
            return ip.teredo[1]
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _trouble(ip: Address) -> str | None:
    inner = _embedded(ip)
    if inner is not None:
        return _trouble(inner)
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if not ip.is_global:
        return "non-public"
    return None


def check_url(url: object, kind: str, policy: EgressPolicy) -> str:
    """The URL as given, if an outbound call may use it: http(s), a host, no credentials or spaces, at most
    MAX_URL_BYTES, a Slack target on a Slack hook host, and no address literal a tenant may not reach.
    Names are resolved later (`resolve_checked`), at save time and again at connect time."""
    if not isinstance(url, str):
        raise Refused("a URL is a string")
    if len(url.encode()) > MAX_URL_BYTES:
        raise Refused(f"a URL is at most {MAX_URL_BYTES} bytes")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise Refused("a URL has no spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise Refused("an http or https URL")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise Refused("the URL names no host")
    try:
        host.encode("idna")
    except UnicodeError:
        raise Refused("the host name is not valid") from None
    if parts.username is not None or parts.password is not None:
        raise Refused("a URL carries no user name or password")
    if port == 0:
        raise Refused("port 0 cannot be reached")
    if kind == "slack" and host not in policy.slack_hosts:
        raise Refused(f"a Slack target is an incoming webhook on {', '.join(sorted(policy.slack_hosts))}")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None and not policy.host_allowed(host):
        policy.check_address(str(literal))
    return url


async def resolve_checked(host: str, port: int, policy: EgressPolicy) -> list[str]:
    """The host's addresses, each one a tenant may reach; Refused if any is not (an allowed host name passes).
    A resolver failure is OSError (socket.gaierror), an outage of the name, not a refusal."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:
        raise Refused("the host name is not valid") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not policy.host_allowed(host):
        for address in addresses:
            policy.check_address(address)
    return addresses


async def check_target(url: object, kind: str, policy: EgressPolicy) -> str:
    """`check_url`, then the name resolved and each address checked; a name that does not resolve now is taken
    (the connect-time check refuses it if it later resolves to an address no tenant may reach)."""
    checked = check_url(url, kind, policy)
    parts = urlsplit(checked)
    try:
        await resolve_checked(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), policy)
    except OSError:
        pass
    return checked


def endpoint(url: str) -> str:
    """What may be shown of a target URL: scheme and host (the path and query of a Slack or webhook URL can be
    its credential)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}" if parts.scheme and host else "(invalid URL)"
