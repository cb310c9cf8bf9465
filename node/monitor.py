"""Peer liveness: which peers run a fusenode daemon that answers, and which have been away long
enough that their fragments must be rebuilt elsewhere.

A peer is *live* when it is connected (libp2p) and its daemon answers a signed health check
within `defaults.HEALTH_TIMEOUT`. Every answer and every failure is recorded in the state
database (``peers``: last_seen, last_error, addresses), so a restart loses nothing. A peer is
*away* when it does not answer now and has not answered for ``[repair] unreachable_after``
seconds (or never did): repair acts only on away peers, so a restart or a short outage does
not trigger a rebuild.

libp2p does not reconnect by itself and its peer store lives in memory, so
`PeerMonitor.keep_connected` learns the addresses of connected peers and redials known peers
that dropped off: without it, two nodes that lost each other (a restart on either side) would
stay apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from fusenode import defaults
from fusenode.node.context import NodeContext
from fusenode.node.protocol import Health, PeerError
from fusenode.node.state import parse_iso

__all__ = ["HealthChecker", "PeerMonitor"]

log = logging.getLogger(__name__)


class HealthChecker(Protocol):
    """What liveness needs of the peer client."""

    async def health(self, peer_id: str, timeout: float = ...) -> Health: ...


def _now() -> datetime:
    return datetime.now(UTC)


class PeerMonitor:
    def __init__(
        self,
        ctx: NodeContext,
        client: HealthChecker,
        *,
        unreachable_after: float,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.peer_id, self.blocks, self.state = ctx.peer_id, ctx.blocks, ctx.state
        self.client = client
        self.unreachable_after = unreachable_after
        self.clock = clock

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
        self.state.peer_answered(peer_id, list(reply.addresses))
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
        """Until ``stop``: learn the addresses of newly connected peers, redial known ones."""
        while not stop.is_set():
            try:
                await self._reconnect_once()
            except Exception:
                log.exception("keep-connected pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)

    async def _reconnect_once(self) -> None:
        connected = set(await self.connected())
        records = {r.peer_id: r for r in self.state.peers()}
        fresh = [p for p in connected if not (records.get(p) and records[p].addresses)]
        await self.check(fresh)
        for record in records.values():
            if record.peer_id in connected or record.peer_id == self.peer_id:
                continue
            for addr in record.multiaddrs():
                try:
                    await self.connect(addr, timeout=5.0)
                    break
                except Exception as e:
                    log.debug("redial %s at %s: %s", record.peer_id, addr, e)
