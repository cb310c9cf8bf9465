"""Peer liveness: which peers run a fusenode daemon that answers, and which have been away long
enough that their fragments must be rebuilt elsewhere.

A peer is *live* when it is connected (libp2p) and its daemon answers a signed health check
within `defaults.HEALTH_TIMEOUT`. Every answer and every failure is recorded in the state
database (``peers``: last_seen, last_error, addresses), so a restart loses nothing. A peer is
*away* when it does not answer now and has not answered for ``[repair] unreachable_after``
seconds (or never did): repair acts only on away peers, so a restart or a short outage does
not trigger a rebuild.

Finding each other (`PeerMonitor.discover`, and every few seconds `keep_connected`): every
connected peer is health-checked, which records the addresses it reports; live peers are asked
which fusenode peers they have seen answer lately (peer exchange, ``/peer/v1/peers``), and the
new ones are remembered; known peers that are not connected are dialled. libp2p neither
reconnects by itself nor keeps its peer store across restarts, so this is what makes a node
that joined through one bootstrap peer meet the whole network, and a restarted node (or one
whose address changed) rejoin without being told anything.

Addresses are kept only if this node could use them (`AddressPolicy`): well-formed, naming
the peer they claim to, not in ``[network] deny``, and loopback ones only on a loopback
network (on another host, a peer's 127.0.0.1 is this machine's).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from fusenode import defaults
from fusenode.node.context import NodeContext
from fusenode.node.protocol import MAX_ADDRESSES, Health, PeerError, PeerList
from fusenode.node.state import parse_iso

__all__ = ["AddressPolicy", "PeerDirectory", "PeerMonitor"]

log = logging.getLogger(__name__)

#: Peer lists are asked for at the first pass and then every this many passes.
EXCHANGE_EVERY = 6
#: Dials at once when redialling known peers, and how long each may take.
DIALS_AT_ONCE = 8
DIAL_TIMEOUT = 5.0


class PeerDirectory(Protocol):
    """What liveness and discovery need of the peer client."""

    async def health(self, peer_id: str, timeout: float = ...) -> Health: ...

    async def peers(self, peer_id: str) -> PeerList: ...


class AddressPolicy:
    """Which of a peer's addresses this node keeps and dials."""

    def __init__(self, loopback: bool = True, deny: Sequence[str] = ()) -> None:
        self.loopback = loopback
        self.deny = [ipaddress.ip_network(cidr, strict=False) for cidr in deny]

    def usable(self, peer_id: str, addresses: Iterable[str]) -> list[str]:
        """``addresses`` of ``peer_id`` that this node could dial, at most a few."""
        out: list[str] = []
        for address in addresses:
            if len(out) >= MAX_ADDRESSES:
                break
            parts = address.split("/")
            if len(parts) != 7 or parts[0] or parts[3] != "tcp" or parts[5:] != ["p2p", peer_id]:
                continue
            if parts[1] in ("dns4", "dns6"):
                usable = not self.loopback
            elif parts[1] in ("ip4", "ip6"):
                usable = self._ip_usable(parts[2])
            else:
                usable = False
            if usable and parts[4].isdigit() and address not in out:
                out.append(address)
        return out

    def _ip_usable(self, text: str) -> bool:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return False
        if ip.is_unspecified or ip.is_multicast or any(ip in net for net in self.deny):
            return False
        # A loopback node can dial nothing else (its Kubo filters it); on another host, a
        # peer's loopback address is this machine's.
        return ip.is_loopback if self.loopback else not (ip.is_loopback or ip.is_link_local)


def _now() -> datetime:
    return datetime.now(UTC)


class PeerMonitor:
    def __init__(
        self,
        ctx: NodeContext,
        client: PeerDirectory,
        *,
        unreachable_after: float,
        addresses: AddressPolicy | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.peer_id, self.blocks, self.state = ctx.peer_id, ctx.blocks, ctx.state
        self.client = client
        self.unreachable_after = unreachable_after
        self.addresses = addresses or AddressPolicy()
        self.clock = clock
        self._passes = 0

    async def connected(self) -> list[str]:
        return sorted(await self.blocks.peers())

    async def connect(self, multiaddr: str, timeout: float = defaults.CONNECT_TIMEOUT) -> None:
        await self.blocks.connect(multiaddr, timeout)

    async def health(self, peer_id: str) -> bool:
        """Ask ``peer_id``'s daemon whether it is up; record the answer either way."""
        try:
            reply = await self.client.health(peer_id, timeout=defaults.HEALTH_TIMEOUT)
        except PeerError as e:
            self.state.peer_failed(peer_id, str(e))
            return False
        self.state.peer_answered(peer_id, self.addresses.usable(peer_id, reply.addresses))
        return True

    async def check(self, peers: Iterable[str]) -> dict[str, bool]:
        """Health-check ``peers`` at once: peer -> answered."""
        peers = list(peers)
        answers = await asyncio.gather(*(self.health(p) for p in peers))
        return dict(zip(peers, answers, strict=True))

    async def live_peers(self) -> list[str]:
        """Connected peers whose fusenode daemon answers (sorted by peer ID)."""
        answers = await self.check(await self.connected())
        return [p for p, ok in answers.items() if ok]

    def away(self, answers: dict[str, bool]) -> list[str]:
        """The peers of ``answers`` that did not answer and have not answered for
        ``unreachable_after`` seconds (or never did)."""
        now = self.clock()
        out = []
        for peer, answered in sorted(answers.items()):
            if answered:
                continue
            record = self.state.peer(peer)
            seen = parse_iso(record.last_seen) if record and record.last_seen else None
            if seen is None or (now - seen).total_seconds() >= self.unreachable_after:
                out.append(peer)
        return out

    async def report(self) -> list[dict[str, Any]]:
        """Every peer known or connected: whether connected, whether its daemon answers, and
        when it was last seen (the ``peers`` operation)."""
        connected = set(await self.connected())
        live = set(await self.live_peers())
        known = {r.peer_id: r for r in self.state.peers()}
        return [
            {
                "peer_id": peer,
                "connected": peer in connected,
                "fusenode": peer in live,
                "last_seen": known[peer].last_seen if peer in known else None,
            }
            for peer in sorted(connected | set(known))
        ]

    async def keep_connected(
        self, stop: asyncio.Event, every: float = defaults.KEEP_CONNECTED_EVERY
    ) -> None:
        """Until ``stop``: a discovery pass every ``every`` seconds (peer lists every few)."""
        while not stop.is_set():
            try:
                await self.discover(exchange=self._passes % EXCHANGE_EVERY == 0)
            except Exception:
                log.exception("keep-connected pass failed")
            self._passes += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)

    async def discover(self, *, exchange: bool = True) -> list[str]:
        """Check the connected peers, learn the peers they know, dial the known peers that
        are not connected; the live peers after that."""
        answers = await self.check(await self.connected())
        if exchange:
            await self._exchange([p for p, ok in answers.items() if ok])
        if await self._dial_known():
            answers = await self.check(await self.connected())
        return sorted(p for p, ok in answers.items() if ok)

    async def _exchange(self, live: list[str]) -> int:
        """Ask ``live`` peers for the peers they know; remember the new ones. How many."""
        lists = await asyncio.gather(*(self.client.peers(p) for p in live), return_exceptions=True)
        new = 0
        for listed in lists:
            if not isinstance(listed, PeerList):
                continue
            for entry in listed.peers:
                if entry.peer_id == self.peer_id:
                    continue
                addresses = self.addresses.usable(entry.peer_id, entry.addresses)
                if addresses and self.state.peer_learned(entry.peer_id, addresses):
                    log.info("learned peer %s at %s", entry.peer_id, addresses[0])
                    new += 1
        return new

    async def _dial_known(self) -> int:
        """Dial known peers that are not connected, a few at once; how many now are."""
        connected = set(await self.connected())
        missing = [
            r
            for r in self.state.peers()
            if r.peer_id not in connected and r.peer_id != self.peer_id
        ]
        gate = asyncio.Semaphore(DIALS_AT_ONCE)

        async def dial(peer_id: str, addresses: list[str]) -> bool:
            async with gate:
                for addr in addresses:
                    try:
                        await self.connect(addr, timeout=DIAL_TIMEOUT)
                        return True
                    except Exception as e:
                        log.debug("dial %s at %s: %s", peer_id, addr, e)
            return False

        dials = [dial(r.peer_id, self.addresses.usable(r.peer_id, r.multiaddrs())) for r in missing]
        return sum(await asyncio.gather(*dials))
