"""The network as the use cases see it: who is live, who holds what, where a fragment goes.

Two implementations, so that the CLI without a daemon and the daemon run the same use cases
(`fusenode.node.service`):

- `PeerNetwork` (the daemon): live peers are those whose daemon answers (`PeerMonitor`),
  holders are asked over the peer protocol, fragments are placed on peers (`Placer`), stored
  models are announced on PubSub.
- `Offline` (a command run on a repo while no daemon serves it): this node alone; it holds
  every fragment itself ("local" placement) and announces nothing.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

from fusenode.node.blockread import read_file
from fusenode.node.context import NodeContext
from fusenode.node.monitor import PeerMonitor
from fusenode.node.placement import Placed, Placer
from fusenode.node.protocol import PeerError, PeerUnreachable

__all__ = ["Announcer", "Network", "Offline", "PeerNetwork"]


class Announcer(Protocol):
    async def announce(self, cid: str, kind: str, encrypted: bool) -> None: ...


class Network(Protocol):
    #: False for `Offline`: placement is "local", fetches wait the full deadline.
    networked: bool

    async def live_peers(self) -> list[str]: ...

    async def discover(self) -> list[str]:
        """Look for more peers (ask the live ones whom they know, dial those); the live ones."""
        ...

    async def holders(self, cids: list[str]) -> dict[str, set[str]]:
        """For each CID, the live nodes (this one included) that say they hold it."""
        ...

    async def place(self, holder: str, path: Path, cid: str | None = None) -> Placed: ...

    async def read_small_file(self, cid: str, max_size: int) -> bytes | None:
        """A manifest's bytes read block by block, bounded (`fusenode.node.blockread`);
        None where that is not possible (no daemon: Kubo's own fetch is used)."""
        ...

    async def distribute(self, peers: list[str], cid: str, data: bytes) -> None:
        """Copy the manifest ``cid`` (its bytes ``data``) to ``peers``, best effort."""
        ...

    async def announce(self, cid: str, kind: str, encrypted: bool) -> None: ...

    async def report(self) -> list[dict[str, Any]]: ...

    async def release(self, peer: str, cids: list[str]) -> set[str]:
        """Ask ``peer`` to drop this node's holds of ``cids`` (`PeerError` when it cannot)."""
        ...


class PeerNetwork:
    networked = True

    def __init__(
        self, ctx: NodeContext, monitor: PeerMonitor, placer: Placer, announcer: Announcer
    ) -> None:
        self.peer_id, self.state = ctx.peer_id, ctx.state
        self.monitor = monitor
        self.client = placer.client
        self.placer = placer
        self.announcer = announcer

    async def live_peers(self) -> list[str]:
        return await self.monitor.live_peers()

    async def discover(self) -> list[str]:
        return await self.monitor.discover()

    async def holders(self, cids: list[str]) -> dict[str, set[str]]:
        found: dict[str, set[str]] = defaultdict(set)
        for cid in self.state.held(cids):
            found[cid].add(self.peer_id)

        async def ask(peer: str) -> None:
            try:
                held = await self.client.has(peer, cids)
            except PeerError:
                return
            for cid in held & set(cids):
                found[cid].add(peer)

        await asyncio.gather(*(ask(p) for p in await self.live_peers()))
        return found

    async def place(self, holder: str, path: Path, cid: str | None = None) -> Placed:
        return await self.placer.place(holder, path, cid)

    async def read_small_file(self, cid: str, max_size: int) -> bytes | None:
        return await read_file(
            cid,
            max_size=max_size,
            local=self.placer.blocks.read_block,
            remote=self.client.block,
            peers=await self.live_peers(),
        )

    async def distribute(self, peers: list[str], cid: str, data: bytes) -> None:
        await self.placer.distribute(peers, cid, data)

    async def announce(self, cid: str, kind: str, encrypted: bool) -> None:
        await self.announcer.announce(cid, kind, encrypted)

    async def report(self) -> list[dict[str, Any]]:
        return await self.monitor.report()

    async def release(self, peer: str, cids: list[str]) -> set[str]:
        return await self.client.release(peer, cids)


class Offline:
    networked = False

    def __init__(self, ctx: NodeContext) -> None:
        self.peer_id, self.blocks, self.state = ctx.peer_id, ctx.blocks, ctx.state

    async def live_peers(self) -> list[str]:
        return []

    async def discover(self) -> list[str]:
        return []

    async def holders(self, cids: list[str]) -> dict[str, set[str]]:
        return {cid: {self.peer_id} for cid in self.state.held(cids)}

    async def read_small_file(self, cid: str, max_size: int) -> bytes | None:
        return None

    async def place(self, holder: str, path: Path, cid: str | None = None) -> Placed:
        added = await self.blocks.add(path)
        self.state.hold([added], self.peer_id)
        return Placed(added)

    async def distribute(self, peers: list[str], cid: str, data: bytes) -> None:
        return None

    async def announce(self, cid: str, kind: str, encrypted: bool) -> None:
        return None

    async def report(self) -> list[dict[str, Any]]:
        return []

    async def release(self, peer: str, cids: list[str]) -> set[str]:
        raise PeerUnreachable(f"no daemon runs here: peer {peer} is asked when one does")
