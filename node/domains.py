"""Failure domains: what placement spreads a segment's fragments over (``[placement] domain``).

- ``node``: every node is its own domain (the right unit on one machine, where every node
  shares 127.0.0.1).
- ``ip``: nodes that share an IP address are one machine, so one domain.
- ``subnet24``: nodes in one IPv4 /24 (IPv6 /48) are one domain, as Storj counts them: nodes
  on one network segment tend to fail together (a switch, a building, an operator).
- ``auto`` (the default): ``node`` on a loopback host, ``ip`` on any other.

A peer's address is the first one of those it reported that this node would dial (routable,
not loopback: `fusenode.node.monitor.AddressPolicy`); a peer without one is a domain of its
own, which never makes placement weaker than counting nodes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from fusenode.node.state import State

__all__ = ["domain_function"]


def _first_ip(addresses: Iterable[str]) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    for address in addresses:
        parts = address.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            try:
                ip = ipaddress.ip_address(parts[2])
            except ValueError:
                continue
            if not (ip.is_loopback or ip.is_unspecified or ip.is_link_local):
                return ip
    return None


def domain_function(
    mode: str, loopback: bool, self_id: str, own_addresses: Iterable[str], state: State
) -> Callable[[str], str]:
    """``peer_id -> domain`` for ``mode``; see the module docstring."""
    if mode == "auto":
        mode = "node" if loopback else "ip"
    if mode == "node":
        return lambda peer: peer
    own = tuple(own_addresses)

    def domain(peer: str) -> str:
        if peer == self_id:
            ip = _first_ip(own)
        else:
            record = state.peer(peer)
            ip = _first_ip(record.multiaddrs()) if record else None
        if ip is None:
            return f"node:{peer}"
        if mode == "ip":
            return str(ip)
        prefix = 24 if ip.version == 4 else 48
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))

    return domain
