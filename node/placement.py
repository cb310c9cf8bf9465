"""Putting a fragment on the node the allocator chose, and getting its receipt.

This node: add it to the embedded Kubo and record the hold. A peer: stream the bytes
(``/peer/v1/store``; the holder checks them against the CID computed here before adding them).
A fragment counts as placed only once its holder answered with a receipt signed by its
libp2p key over (CID, size, time) for this very request (`fusenode.node.peer_client`): the
placing node keeps it with the placement. A holder that refuses for lack of room raises
`PeerOverCapacity`, and the put places that fragment elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fusenode.node.context import NodeContext
from fusenode.node.peer_client import PeerClient
from fusenode.storage.unixfs import file_cid

__all__ = ["Placed", "Placer"]


@dataclass(frozen=True)
class Placed:
    cid: str
    #: The holder's signed receipt (`SignedReceipt.record`); None when this node holds it.
    receipt: str | None = None


class Placer:
    def __init__(self, ctx: NodeContext, client: PeerClient, timeout: float) -> None:
        self.peer_id, self.blocks, self.state = ctx.peer_id, ctx.blocks, ctx.state
        self.client = client
        self.timeout = timeout

    async def place(self, holder: str, path: Path, cid: str | None = None) -> Placed:
        """Store the fragment in ``path`` on ``holder``; its CID once the holder confirmed
        it. ``cid``: what the bytes must hash to (a repair knows it)."""
        if holder == self.peer_id:
            added = await self.blocks.add(path)
            self.state.hold([added], self.peer_id)
            return Placed(added)
        data = await self.blocks.bridge.run(path.read_bytes)
        if cid is None:  # the CID is ours to compute: never taken from the holder's word
            cid = await self.blocks.bridge.run(file_cid, data)
        signed = await self.client.store(holder, cid, data, self.timeout, attempts=3)
        return Placed(cid, signed.record())

    async def distribute(self, peers: Iterable[str], cid: str, data: bytes) -> None:
        """Give each of ``peers`` a copy of the manifest ``cid`` (its bytes ``data``), best
        effort: any node can then find it, whoever placed it."""
        others = [p for p in peers if p != self.peer_id]
        await asyncio.gather(
            *(self.client.store(p, cid, data, self.timeout) for p in others),
            return_exceptions=True,
        )
