"""The Holder's /store on a real embedded node: bytes are checked against the CID the placing
node claims before anything reaches the blockstore (which has no GC to take them out)."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import pytest

from fusenode.node.aio import AsyncBlocks, Bridge
from fusenode.node.context import NodeContext
from fusenode.node.holder import Holder
from fusenode.node.protocol import BadPeerRequest
from fusenode.node.repo import Repo
from fusenode.node.state import State
from fusenode.storage.errors import BackendTimeout
from fusenode.storage.multiformats import b58decode
from fusenode.storage.unixfs import file_cid

OWNER = "12D3KooWOwnerOwnerOwnerOwnerOwnerOwnerOwnerOwner"


def test_store_for_checks_the_bytes_before_adding(tmp_path: Path) -> None:
    repo = Repo.init(tmp_path / "node")
    state = State(repo.files.state)
    with repo.open_backend() as kubo:

        async def scenario() -> None:
            bridge = Bridge()
            blocks = AsyncBlocks(kubo, bridge)
            ctx = NodeContext(kubo.identity().peer_id, blocks, state, repo.files.tmp)
            holder = Holder(ctx, pin_timeout=10, recent=600)
            good = os.urandom(300_000)  # two chunks: a real UnixFS tree
            cid = file_cid(good)
            assert await holder.store_for(OWNER, cid, good) == cid
            assert cid in kubo.pins() and state.held([cid]) == {cid}

            forged = os.urandom(len(good))
            pins_before = kubo.pins()
            with pytest.raises(BadPeerRequest, match=f"hashes to {file_cid(forged)}, not {cid}"):
                await holder.store_for(OWNER, cid, forged)
            assert kubo.pins() == pins_before  # nothing pinned...
            with pytest.raises(BackendTimeout):  # ...and not a block of it in the blockstore
                kubo.fetch_bytes(file_cid(forged), 1.0)
            assert kubo.fetch_bytes(cid, 5.0) == good  # what was held is untouched

            # The same content named as a CIDv1: Kubo's add would store it as CIDv0, so the
            # holder could not hold it under the name asked for; refused before adding.
            other = os.urandom(1000)
            digest = b58decode(file_cid(other))[2:]
            v1 = "b" + base64.b32encode(b"\x01\x70\x12\x20" + digest).decode().rstrip("=").lower()
            with pytest.raises(BadPeerRequest, match="expected a CIDv0"):
                await holder.store_for(OWNER, v1, other)
            with pytest.raises(BackendTimeout):
                kubo.fetch_bytes(file_cid(other), 1.0)
            bridge.close()

        asyncio.run(scenario())
    state.close()
