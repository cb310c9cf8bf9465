"""Where an IPFS node listens and whom it may dial: `SwarmSettings`, checked when made.

Kept apart from the embedded Kubo (`fusenode.storage.kubo.config.network_config` applies
them) so that reading a node's configuration does not load the Kubo machinery.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from fusenode.storage.errors import InvalidArgument

__all__ = ["LOOPBACK_RANGES", "SwarmSettings", "address", "check_port", "deny_filter"]

#: Loopback addresses, never announced by a node that listens on another host.
LOOPBACK_RANGES: Final = ("/ip4/127.0.0.0/ipcidr/8", "/ip6/::1/ipcidr/128")


@dataclass(frozen=True)
class SwarmSettings:
    """Where the embedded node listens and whom it may dial; see the module docstring.

    ``port`` None keeps the repo's port (or picks a free one when creating the repo).
    ``announce``: multiaddrs advertised to peers instead of the listen addresses. ``deny``:
    address ranges never dialed, in CIDR form (``10.0.0.0/8``, ``fd00::/8``).
    """

    host: str = "127.0.0.1"
    port: int | None = None
    announce: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    mdns: bool = False
    nat_port_map: bool = False

    def __post_init__(self) -> None:
        address(self.host)
        if self.port is not None:
            check_port(self.port)
        for cidr in self.deny:
            deny_filter(cidr)
        for multiaddr in self.announce:
            if not multiaddr.startswith(("/ip4/", "/ip6/", "/dns")) or "/tcp/" not in multiaddr:
                raise InvalidArgument(
                    f"announced address {multiaddr!r} is not a TCP multiaddr "
                    "(/ip4/ADDR/tcp/PORT, /ip6/..., /dns4/NAME/tcp/PORT)"
                )

    @property
    def loopback(self) -> bool:
        return address(self.host).is_loopback


def address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``host`` as an IP address (an interface's, or 0.0.0.0 / :: for all)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise InvalidArgument(
            f"swarm host must be an IP address (or 0.0.0.0 / :: for every interface), not {host!r}"
        ) from None


def deny_filter(cidr: str) -> str:
    """A CIDR range as a Swarm.AddrFilters multiaddr (``10.0.0.0/8`` -> ``/ip4/10.0.0.0/ipcidr/8``)."""
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise InvalidArgument(f"deny range {cidr!r} is not CIDR (such as 10.0.0.0/8)") from None
    kind = "ip4" if net.version == 4 else "ip6"
    return f"/{kind}/{net.network_address}/ipcidr/{net.prefixlen}"


def check_port(port: int) -> None:
    # Port 0 would let the kernel pick a new port at every start, so peers that remembered
    # our multiaddr could not redial us after a restart.
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidArgument(f"swarm port must be an integer in 1..65535, not {port!r}")
