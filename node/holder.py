"""What a node does for its peers: hold fragments and manifests they place on it.

A hold is a row (CID, owner) in the state database; a CID stays pinned in the embedded Kubo
while any owner holds it (`fusenode.node.state.State.release`). The peer API
(`fusenode.node.peer_server`) calls this; nothing here knows HTTP.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fusenode.node.context import NodeContext
from fusenode.node.protocol import BadPeerRequest, Health, PeerList
from fusenode.storage.unixfs import file_cid

__all__ = ["Holder"]


class Holder:
    def __init__(self, ctx: NodeContext, pin_timeout: float, recent: float) -> None:
        self.peer_id = ctx.peer_id
        self.addresses = tuple(ctx.blocks.identity().addresses)
        self.blocks, self.state, self.tmp = ctx.blocks, ctx.state, ctx.tmp
        self.pin_timeout = pin_timeout
        self.recent = recent

    def health(self, requester: str) -> Health:
        self.state.peer_answered(requester)
        return Health(self.peer_id, self.addresses)

    def known_peers(self, requester: str) -> PeerList:
        """The peers that answered this node within ``recent`` seconds (its repair
        threshold), with the addresses they reported: what a new node needs to find them."""
        records = self.state.recent_peers(self.recent)
        return PeerList(
            tuple(
                Health(r.peer_id, tuple(r.multiaddrs()))
                for r in records
                if r.peer_id not in (requester, self.peer_id) and r.multiaddrs()
            )
        )

    def held(self, cids: list[str]) -> set[str]:
        return self.state.held(cids)

    async def pin_for(self, owner: str, cids: list[str]) -> list[str]:
        """Fetch (over bitswap) and pin ``cids`` for ``owner``."""
        for cid in cids:
            await self.blocks.pin(cid, self.pin_timeout)
        self.state.hold(cids, owner)
        return cids

    async def store_for(self, owner: str, expected: str, data: bytes) -> str:
        """Add a fragment streamed by ``owner`` if it hashes to ``expected``.

        Checked before it is added (`fusenode.storage.unixfs`), so bytes that are not what
        the owner claims never reach the blockstore (which has no GC to take them out again);
        Kubo's own answer is compared too, in case the two hashings ever disagree.
        """
        if not expected.startswith("Qm"):  # Kubo's add gives CIDv0: another form would not
            raise BadPeerRequest(
                f"expected a CIDv0 (Qm...), the form Kubo's add gives, not {expected}"
            )
        actual = await self.blocks.bridge.run(file_cid, data)
        if actual != expected:
            raise BadPeerRequest(f"fragment hashes to {actual}, not {expected}")
        with tempfile.NamedTemporaryFile(dir=self.tmp, prefix=".store-") as f:
            f.write(data)
            f.flush()
            cid = await self.blocks.add(Path(f.name))
        if cid != expected:
            if cid not in self.state.held([cid]):
                await self.blocks.unpin(cid)
            raise BadPeerRequest(f"fragment hashes to {cid}, not {expected}")
        self.state.hold([cid], owner)
        return cid

    async def unpin_for(self, owner: str, cids: list[str]) -> list[str]:
        """Drop ``owner``'s holds; unpin what nobody holds any more."""
        released = []
        for cid in cids:
            if self.state.release(cid, owner):
                await self.blocks.unpin(cid)
                released.append(cid)
        return released
