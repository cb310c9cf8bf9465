"""Leases on what a node places on its peers (Tahoe-LAFS's leases), both sides.

Owner: every ``lease_days * LEASE_RENEW_FRACTION`` (at most `defaults.LEASE_PASS_MAX`) the
node that placed models renews its leases with each holder, in one signed ``/peer/v1/renew``
per holder (at most `protocol.MAX_CIDS` CIDs each): the fragments placed there that still
count, and the manifests this node keeps (each holder got a copy at put or share; it renews
those it holds). A fragment its holder says it no longer holds is marked lost: repair
rebuilds it elsewhere. Copies that no longer count (surplus) are not renewed: they lapse.

A holder's renew reply says how long its leases last (``lease_seconds``): an owner renews a
holder whose lease is shorter than its own at the same fraction of that lease (no more often
than `defaults.LEASE_PEER_FLOOR`), so operators need not agree on ``lease_days``.

Holder: the same pass releases the holds for other nodes not renewed for ``lease_days``
(`fusenode.node.holder.Holder.expire`); their blocks go at the next garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

from fusenode import defaults
from fusenode.node.context import NodeContext
from fusenode.node.holder import Holder
from fusenode.node.peer_client import PeerClient
from fusenode.node.protocol import PeerError

__all__ = ["Leases", "lease_seconds"]

log = logging.getLogger(__name__)

DAY = 86400.0


def lease_seconds(lease_days: float) -> float:
    return lease_days * DAY


class Leases:
    def __init__(
        self, ctx: NodeContext, client: PeerClient, holder: Holder | None, *, lease_days: float
    ) -> None:
        self.peer_id, self.state = ctx.peer_id, ctx.state
        self.client = client
        self.holder = holder
        self.lease = lease_seconds(lease_days)
        if holder is not None:  # told to owners: they renew in time
            holder.lease_seconds = self.lease
        #: Holder -> the lease it said it keeps (its renew reply). A holder whose lease is
        #: shorter than ours is renewed at the same fraction of its own, no more often than
        #: `defaults.LEASE_PEER_FLOOR`.
        self.peer_leases: dict[str, float] = {}

    @property
    def interval(self) -> float:
        own = min(self.lease * defaults.LEASE_RENEW_FRACTION, defaults.LEASE_PASS_MAX)
        if not self.peer_leases:
            return own
        theirs = min(self.peer_leases.values()) * defaults.LEASE_RENEW_FRACTION
        return min(own, max(theirs, defaults.LEASE_PEER_FLOOR))

    def wanted(self) -> dict[str, list[str]]:
        """Peer -> the CIDs this node renews there (its fragments there that count, and the
        manifests it keeps)."""
        placements = self.state.placements()
        own_fragments = {p.cid for p in placements if p.peer == self.peer_id}
        manifests = sorted(self.state.held_by(self.peer_id) - own_fragments)
        by_peer: dict[str, set[str]] = defaultdict(set)
        for p in placements:
            if p.peer != self.peer_id and p.lost is None:
                by_peer[p.peer].add(p.cid)
        return {peer: sorted(cids) + manifests for peer, cids in sorted(by_peer.items())}

    async def renew(self) -> dict[str, Any]:
        """One renewal round with every holder; its summary."""
        summary: dict[str, Any] = {"renewed": 0, "holders": 0, "unanswered": [], "missing": 0}
        fragments = {(p.cid, p.peer) for p in self.state.placements() if p.lost is None}

        async def one(peer: str, cids: list[str]) -> None:
            try:
                renewed, lease = await self.client.renew(peer, cids)
            except PeerError as e:
                log.info("lease renewal on %s: %s", peer, e)
                summary["unanswered"].append(peer)
                return
            summary["holders"] += 1
            summary["renewed"] += len(renewed)
            if lease is not None:
                self.peer_leases[peer] = lease
            else:
                self.peer_leases.pop(peer, None)
            for cid in cids:
                if cid not in renewed and (cid, peer) in fragments:
                    why = "the holder no longer holds it (lease renewal)"
                    summary["missing"] += self.state.mark_lost(cid, peer, why)

        await asyncio.gather(*(one(peer, cids) for peer, cids in self.wanted().items()))
        return summary

    async def run(self) -> dict[str, Any]:
        """Expire what others did not renew here, then renew ours elsewhere."""
        expired = await self.holder.expire(self.lease)
        summary = await self.renew()
        summary["expired"] = expired
        return summary

    async def run_forever(self, stop: asyncio.Event) -> None:
        """A pass at start (once the node had time to meet its peers), then every
        `interval` seconds until ``stop``."""
        delay = min(self.interval, 10.0)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
                return
            delay = self.interval
            try:
                summary = await self.run()
                if summary["expired"] or summary["missing"] or summary["unanswered"]:
                    log.info("lease pass: %s", summary)
            except Exception:
                log.exception("lease pass failed")
