"""The Holder on a real embedded node: streamed bytes are checked against the CID the placing
node claims before anything reaches the blockstore (which has no GC to take them out), stores
are admitted within the node's capacity and the peer's quota, and blocks are read back from
the node's own disk for audits."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fusenode import defaults
from fusenode.node.aio import AsyncBlocks, Bridge
from fusenode.node.context import NodeContext
from fusenode.node.holder import Holder, Limits
from fusenode.node.peerkeys import load_private_key
from fusenode.node.protocol import MAX_STORES_IN_FLIGHT, BadPeerRequest, OverCapacity
from fusenode.node.repo import Repo
from fusenode.node.state import State
from fusenode.storage.errors import BackendTimeout
from fusenode.storage.multiformats import b58decode
from fusenode.storage.unixfs import CHUNK_SIZE, MAX_LINKS, block_cid, file_cid, parse_dag_node

OWNER = "12D3KooWOwnerOwnerOwnerOwnerOwnerOwnerOwnerOwnerA"
OTHER = "12D3KooWOtherOtherOtherOtherOtherOtherOtherOtherB"
NEW = file_cid(b"a fragment not held yet")


async def _pieces(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _run(tmp_path: Path, limits: Limits, scenario) -> None:
    repo = Repo.init(tmp_path / "node")
    state = State(repo.files.state)
    with repo.open_backend() as kubo:

        async def main() -> None:
            bridge = Bridge()
            blocks = AsyncBlocks(kubo, bridge)
            ctx = NodeContext(kubo.identity().peer_id, blocks, state, repo.files.tmp)
            key = load_private_key(repo.files.kubo)
            holder = Holder(ctx, key, recent=600, limits=limits)
            try:
                await scenario(holder, kubo, state)
            finally:
                bridge.close()

        asyncio.run(main())
    state.close()


async def _store(holder: Holder, owner: str, data: bytes, cid: str | None = None):
    cid = cid or file_cid(data)
    holder.admit(owner, cid, len(data))
    return await holder.store_for(owner, cid, len(data), _pieces(data))


def test_store_for_checks_the_bytes_before_adding(tmp_path: Path) -> None:
    async def scenario(holder: Holder, kubo, state: State) -> None:
        good = os.urandom(300_000)  # two chunks: a real UnixFS tree
        cid = file_cid(good)
        receipt = await _store(holder, OWNER, good)
        assert (receipt.cid, receipt.size) == (cid, len(good))
        assert cid in kubo.pins() and state.held([cid]) == {cid}
        assert state.held_bytes(OWNER) == len(good)

        forged = os.urandom(len(good))
        pins_before = kubo.pins()
        with pytest.raises(BadPeerRequest, match=f"hashes to {file_cid(forged)}, not {cid}"):
            await _store(holder, OWNER, forged, cid)
        assert kubo.pins() == pins_before  # nothing pinned...
        with pytest.raises(BackendTimeout):  # ...and not a block of it in the blockstore
            kubo.fetch_bytes(file_cid(forged), 1.0)
        assert kubo.fetch_bytes(cid, 5.0) == good  # what was held is untouched
        assert state.held_bytes(OWNER) == len(good)  # the refused store accounted nothing

        # The same content named as a CIDv1: Kubo's add would store it as CIDv0, so the
        # holder could not hold it under the name asked for; refused before adding.
        other = os.urandom(1000)
        digest = b58decode(file_cid(other))[2:]
        v1 = "b" + base64.b32encode(b"\x01\x70\x12\x20" + digest).decode().rstrip("=").lower()
        with pytest.raises(BadPeerRequest, match="expected a CIDv0"):
            await _store(holder, OWNER, other, v1)
        with pytest.raises(BackendTimeout):
            kubo.fetch_bytes(file_cid(other), 1.0)

    _run(tmp_path, Limits(), scenario)


def test_capacity_and_quota_are_accounted_per_peer(tmp_path: Path) -> None:
    mib = 2**20

    async def scenario(holder: Holder, kubo, state: State) -> None:
        assert holder.offered() == (3 * mib, 2 * mib)
        first = os.urandom(mib)
        await _store(holder, OWNER, first)
        await _store(holder, OWNER, first)  # a retry of the same store is not charged twice
        assert state.held_bytes(OWNER) == mib
        with pytest.raises(OverCapacity, match=r"peer_quota"):
            holder.admit(OWNER, NEW, mib + 1)  # 1 MiB held + 1 MiB and a byte > 2 MiB quota
        await _store(holder, OTHER, os.urandom(mib))
        with pytest.raises(OverCapacity, match=r"\[storage\] capacity"):
            holder.admit(OTHER, NEW, mib + 1)  # 2 MiB held in all + 1 MiB and a byte > 3 MiB
        # Reservations count while a store is in flight: two admitted at once cannot overshoot.
        holder.admit(OTHER, NEW, mib // 2)
        with pytest.raises(OverCapacity):
            holder.admit(OWNER, NEW, mib // 2 + 1)
        # Tiny stores are accounted at least MIN_HOLD_BYTES each.
        small = await _store(holder, OWNER, b"x")
        assert state.held_bytes(OWNER) == mib + defaults.MIN_HOLD_BYTES
        # Released holds give their room back.
        assert await holder.unpin_for(OWNER, [small.cid, file_cid(first)]) == [
            small.cid,
            file_cid(first),
        ]
        assert state.held_bytes(OWNER) == 0
        assert state.held_bytes(besides=holder.peer_id) == state.held_bytes(OTHER) == mib

    _run(tmp_path, Limits(capacity=3 * mib, peer_quota=2 * mib), scenario)


def test_reservations_are_given_back_and_retries_are_admitted(tmp_path: Path) -> None:
    mib = 2**20

    async def scenario(holder: Holder, kubo, state: State) -> None:
        # A store that fails half-way (the body ended, or did not hash) gives its room back.
        async def broken() -> AsyncIterator[bytes]:
            yield b"x" * 1000
            raise BadPeerRequest("the body ended 999000 bytes short of its Content-Length")

        holder.admit(OWNER, NEW, mib)
        with pytest.raises(BadPeerRequest, match="short"):
            await holder.store_for(OWNER, NEW, mib, broken())
        assert holder._reserved == {} and holder._in_flight == {}
        # Up to its quota; then a retry of a store already held (its answer was lost) is
        # admitted still, and charges nothing more; a new CID is not.
        data = os.urandom(mib)
        await _store(holder, OWNER, data)
        await _store(holder, OWNER, data)
        assert state.held_bytes(OWNER) == mib
        with pytest.raises(OverCapacity, match="quota"):
            holder.admit(OWNER, NEW, 1)
        # A peer cannot hold more than MAX_STORES_IN_FLIGHT stores open at once.
        for _ in range(MAX_STORES_IN_FLIGHT):
            holder.admit(OTHER, NEW, 10)
        with pytest.raises(OverCapacity, match="in flight"):
            holder.admit(OTHER, NEW, 10)

    _run(tmp_path, Limits(capacity=4 * mib, peer_quota=mib), scenario)


def test_holds_from_before_quotas_are_accounted_at_start(tmp_path: Path) -> None:
    async def scenario(holder: Holder, kubo, state: State) -> None:
        data = os.urandom(300_000)
        path = Path(kubo.repo_dir) / "legacy"
        path.write_bytes(data)
        cid = kubo.add(path)
        state.hold([cid], OWNER)  # as a version 1 repo recorded it: no size
        state.hold([file_cid(b"gone")], OTHER)  # its blocks are not even here
        assert state.held_bytes(OWNER) == 0
        assert await holder.account_legacy_holds() == 2
        assert state.held_bytes(OWNER) == len(data)
        assert state.held_bytes(OTHER) == defaults.MIN_HOLD_BYTES
        assert await holder.account_legacy_holds() == 0

    _run(tmp_path, Limits(), scenario)


def test_auto_capacity_follows_the_free_disk(tmp_path: Path) -> None:
    async def scenario(holder: Holder, kubo, state: State) -> None:
        capacity, quota = holder.offered()
        usage = os.statvfs(tmp_path)
        free = usage.f_bavail * usage.f_frsize
        reserve = max(defaults.DISK_RESERVE, int(usage.f_blocks * usage.f_frsize * 0.05))
        assert abs(capacity - max(0, free - reserve)) < 64 * 2**20
        assert quota == capacity // 2

    _run(tmp_path, Limits(), scenario)


def test_blocks_are_read_from_the_nodes_own_disk(tmp_path: Path) -> None:
    """read_block serves audits: each block hashes to its CID, parents list their children,
    and a deleted block file is gone at once (no cache, no network)."""

    async def scenario(holder: Holder, kubo, state: State) -> None:
        data = os.urandom(CHUNK_SIZE * (MAX_LINKS + 3) + 5)  # two levels: 177 leaves
        path = Path(kubo.repo_dir) / "tmp-file"
        path.write_bytes(data)
        cid = kubo.add(path)
        root = await holder.block(cid)
        assert root is not None and block_cid(root) == cid
        node = parse_dag_node(root)
        assert node.filesize == len(data) and len(node.links) == 2
        assert node.blocksizes == (CHUNK_SIZE * MAX_LINKS, CHUNK_SIZE * 3 + 5)
        middle = parse_dag_node(await holder.block(node.links[1]))
        leaf_cid = middle.links[-1]
        leaf = await holder.block(leaf_cid)
        assert block_cid(leaf) == leaf_cid and parse_dag_node(leaf).data == data[-5:]
        kubo._block_path(leaf_cid).unlink()
        assert await holder.block(leaf_cid) is None
        assert await holder.block(file_cid(b"never stored")) is None

    _run(tmp_path, Limits(), scenario)


def test_release_only_by_the_owner_leases_expire_and_gc_reclaims(tmp_path: Path) -> None:
    """A release naming another owner's hold is refused whole; the owner's own release and a
    lease that ran out both unpin; the next gc deletes the blocks, and nothing else."""
    from fusenode.node.gc import GarbageCollector
    from fusenode.node.protocol import NotOwner
    from fusenode.storage.kubo import flatfs_path

    async def scenario(holder: Holder, kubo, state: State) -> None:
        theirs, mine, kept = (os.urandom(300_000) for _ in range(3))
        a, b, c = file_cid(theirs), file_cid(mine), file_cid(kept)
        await _store(holder, OWNER, theirs)
        await _store(holder, OTHER, mine)
        await _store(holder, OWNER, kept)
        with pytest.raises(NotOwner, match="only the node that placed them"):
            await holder.release_for(OTHER, [a, b])
        assert state.held([a, b, c]) == {a, b, c}  # refused whole: not even its own went
        assert await holder.release_for(OTHER, [b, NEW]) == [b]  # NEW: not held, a no-op
        assert b not in kubo.pins() and state.held([b]) == set()

        # Leases: renewed ones stay; a lease not renewed for its length is released.
        assert holder.renew_for(OWNER, [a, c, b]) == sorted([a, c])
        assert await holder.expire(3600.0) == 0
        state._run("UPDATE held SET renewed = '2000-01-01T00:00:00.000000Z' WHERE cid = ?", [a])
        assert await holder.expire(3600.0) == 1
        assert state.held([a, c]) == {c} and a not in kubo.pins() and c in kubo.pins()

        kubo_dir = holder.blocks.sync.repo_dir / "kubo"
        assert flatfs_path(kubo_dir, a).exists() and flatfs_path(kubo_dir, b).exists()
        collector = GarbageCollector(holder_ctx(holder))
        report = await collector.run("cli")
        assert report.removed_blocks >= 6  # two files of a root and two leaves each
        assert not flatfs_path(kubo_dir, a).exists() and not flatfs_path(kubo_dir, b).exists()
        assert kubo.fetch_bytes(c, 10.0) == kept  # the node runs on, what is held is intact
        assert report.blockstore_after == report.pinned_after
        assert await collector.usage() == (report.blockstore_after, report.pinned_after)
        assert state.last_gc()["removed_blocks"] == report.removed_blocks
        assert state.gc_total() == 1

    _run(tmp_path, Limits(), scenario)


def holder_ctx(holder: Holder) -> NodeContext:
    return NodeContext(holder.peer_id, holder.blocks, holder.state, holder.tmp)
