"""Which addresses push delivery may connect to (docs/architecture.md, Push target policy).

A push target is any URL a subscriber names, so without a policy the router is a proxy into its own
network: it POSTs (signed) to whatever a URL resolves to. `PushPolicy` allows only the networks in
`CATTUBE_PUSH_ALLOWED_NETWORKS` (default loopback), and checks the address each connection is
actually made to, in the socket factory the connector calls just before `connect()`: a name that
resolves to an allowed address when a subscription is made and to another later (DNS rebinding) is
refused all the same, and a name with several addresses is connected only to the allowed ones.
Link-local and cloud metadata addresses are refused even inside an allowed network (say
0.0.0.0/0), unless a listed network lies within them.

A refusal says only "refused by policy": no address, no port, no errno, so that dead letters cannot
tell an open port from a closed one (the router would otherwise be a port scanner).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver

from services.common.errors import InvalidInput

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_NETWORKS = "127.0.0.0/8,::1/128"
REFUSED = "refused by policy: the target's address is not in CATTUBE_PUSH_ALLOWED_NETWORKS"
LISTED_EXPLICITLY: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # IPv4 link-local, where 169.254.169.254 (AWS, GCP, Azure, OpenStack metadata) lives
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
    )
)


class TargetRefused(OSError):
    """The connector was about to connect to an address outside the policy."""

    def __init__(self) -> None:
        super().__init__(REFUSED)


def parse_networks(value: str) -> list[Network]:
    """`CATTUBE_PUSH_ALLOWED_NETWORKS`: comma-separated CIDRs (a bare address is a /32 or /128)."""
    networks = []
    for part in value.split(","):
        if part.strip():
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{part.strip()!r} is not a network (CIDR, e.g. 10.0.0.0/8)") from None
    return networks


class PushPolicy:
    def __init__(self, networks: Sequence[Network], *, resolver: AbstractResolver | None = None) -> None:
        self.networks = list(networks)
        self.resolver = resolver
        """The connector's resolver (tests give one that answers what they like; None is aiohttp's)."""

    @classmethod
    def default(cls) -> PushPolicy:
        return cls(parse_networks(DEFAULT_NETWORKS))

    def allows(self, address: Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        containing = [n for n in self.networks if n.version == address.version and address in n]
        if not containing:
            return False
        sensitive = [s for s in LISTED_EXPLICITLY if s.version == address.version and address in s]
        return not sensitive or any(n.subnet_of(s) for n in containing for s in sensitive)  # type: ignore[arg-type]

    def check_url(self, url: str) -> None:
        """At subscription time: a literal address outside the policy is refused at once (names are
        checked when each connection is made)."""
        host = urlsplit(url).hostname or ""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return
        if not self.allows(address):
            allowed = ", ".join(str(n) for n in self.networks) or "none"
            raise InvalidInput("target.url", f"an address in CATTUBE_PUSH_ALLOWED_NETWORKS ({allowed}), got {host}")

    def connector(self, limit: int) -> aiohttp.TCPConnector:
        """A connector that connects only to allowed addresses."""
        return aiohttp.TCPConnector(
            limit=limit, keepalive_timeout=30, resolver=self.resolver, socket_factory=self._socket
        )

    def _socket(self, addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        if not self.allows(ipaddress.ip_address(sockaddr[0])):
            raise TargetRefused()
        return socket.socket(family, type_, proto)
