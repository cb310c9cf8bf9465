"""Putting a fragment on the node the allocator chose, and getting its receipt.

This node: add it to the embedded Kubo and record the hold. A peer: stream the bytes
(``/peer/v1/store``; the holder checks them against the CID computed here before adding them)
or, for a fragment over the stream limit, add it here and ask the peer to pin it over
bitswap. A fragment counts as placed only once its holder answered: the receipt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

from fusenode.node import protocol
from fusenode.node.context import NodeContext
from fusenode.node.peer_client import PeerClient
from fusenode.storage.unixfs import file_cid

__all__ = ["Placer"]


class Placer:
    def __init__(self, ctx: NodeContext, client: PeerClient, timeout: float) -> None:
        self.peer_id, self.blocks, self.state = ctx.peer_id, ctx.blocks, ctx.state
        self.client = client
        self.timeout = timeout

    async def place(self, holder: str, path: Path, cid: str | None = None) -> str:
        """Store the fragment in ``path`` on ``holder`` and return its CID once the holder
        confirmed it. ``cid``: what the bytes must hash to (a repair knows it)."""
        if holder == self.peer_id:
            cid = await self.blocks.add(path)
            self.state.hold([cid], self.peer_id)
            return cid
        if path.stat().st_size > protocol.MAX_FRAGMENT:
            cid = await self.blocks.add(path)
            await self.client.pin(holder, [cid], self.timeout, attempts=3)
            if cid not in self.state.held([cid]):  # not ours to keep: the holder has it now
                await self.blocks.unpin(cid)
            return cid
        data = await self.blocks.bridge.run(path.read_bytes)
        if cid is None:  # the CID is ours to compute: never taken from the holder's word
            cid = await self.blocks.bridge.run(file_cid, data)
        await self.client.store(holder, cid, data, self.timeout, attempts=3)
        return cid

    async def pin_everywhere(self, peers: Iterable[str], cids: list[str]) -> None:
        """Ask each of ``peers`` to pin ``cids`` (manifests), best effort."""
        await asyncio.gather(
            *(self.client.pin(p, cids, self.timeout) for p in peers), return_exceptions=True
        )
