"""The client's address behind reverse proxies: `X-Forwarded-For`, believed only from trusted proxies.

Per-client limits (chat sessions, reachability probes) key on the client's address (`client_key`:
an IPv6 client by its /64). Behind a proxy
every request comes from the proxy, so its `X-Forwarded-For` must name the client; but anyone can
send that header, so it is read only when the connection comes from an address in
`settings.TRUSTED_PROXIES` (addresses or networks), and then from the right: the first address
that is not itself a trusted proxy is the client. (daphne's own `--proxy-headers` believes the
left-most entry from anyone, which a client sets at will.) Works for HTTP and websockets alike:
Django's REMOTE_ADDR and Channels' scope["client"] both come from the rewritten scope.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """'10.0.0.1', '172.16.0.0/12', '::1' → networks; raises ValueError naming a bad entry."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"TRUSTED_PROXIES: {value!r} is not an IP address or network") from None
    return tuple(networks)


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(peer: str, forwarded_for: str | None, networks: tuple[Network, ...]) -> str:
    """The client's address for a connection from `peer` carrying this X-Forwarded-For value."""
    if not forwarded_for or not _trusted(peer, networks):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, networks):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage from beyond our proxies: keep the address we know
    return hops[0] if hops else peer  # every hop is one of ours


def client_key(address: str) -> str:
    """What per-client limits count under: an IPv4 address, or the /64 network of an IPv6 one (a
    single subscriber commonly holds a whole /64 and could take a fresh address for every request)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a zone index names no other host
    except ValueError:
        return address  # "unknown", a unix socket...
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class TrustedProxyHeaders:
    """ASGI middleware: set scope["client"] from X-Forwarded-For when the peer is a trusted proxy."""

    def __init__(self, app: Any, trusted: Iterable[str] | None = None):
        self.app = app
        if trusted is None:
            from django.conf import settings

            trusted = settings.TRUSTED_PROXIES
        self.networks = parse_networks(trusted)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        if self.networks and scope["type"] in ("http", "websocket") and scope.get("client"):
            forwarded = [value for name, value in scope.get("headers", []) if name == b"x-forwarded-for"]
            if forwarded:
                value = b",".join(forwarded).decode("latin-1")
                host, port = scope["client"][0], scope["client"][1]
                address = client_address(host, value, self.networks)
                if address != host:
                    scope = {**scope, "client": (address, port)}
        return await self.app(scope, receive, send)
