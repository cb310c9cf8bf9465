"""What a node does for its peers: hold the fragments and manifests they stream to it, within
its capacity and their quotas, and show the blocks it holds to whoever audits them.

A hold is a row (CID, owner, bytes) in the state database; a CID stays pinned in the embedded
Kubo while any owner holds it (`fusenode.node.state.State.release`). The peer API
(`fusenode.node.peer_server`) calls this; nothing here knows HTTP.

Capacity and quotas (``[storage] capacity``, ``[storage] peer_quota``): bytes held for
others, accounted per owner in the state database, each hold at least
`defaults.MIN_HOLD_BYTES`. "auto" capacity is what is held for others plus the free disk
less a reserve; "auto" quota is half the capacity. A store is admitted (or refused with
`OverCapacity`, 507) from its Content-Length before a byte of it is read, and the bytes of
stores in flight are reserved, so concurrent requests cannot overshoot together. This node's
own holds (its models, owner = itself) count against neither.

Nothing a peer sends here makes this node fetch anything from the network: a store carries its
bytes, and the rest are lookups in the state database or the local blockstore.

Leases (``[storage] lease_days``, as Tahoe-LAFS's): a hold for another node lasts while its
owner renews it (``/peer/v1/renew``, `renew_for`); `expire` releases the holds not renewed
for a lease. Only the owner recorded at store time may release a hold early
(``/peer/v1/release``, `release_for`: `NotOwner` for anyone else). Released blocks stay on
disk until the next garbage collection (`fusenode.node.gc`).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fusenode import defaults
from fusenode.node.context import NodeContext
from fusenode.node.peerkeys import PeerKey
from fusenode.node.protocol import (
    MAX_STORES_IN_FLIGHT,
    BadPeerRequest,
    Health,
    NotOwner,
    OverCapacity,
    PeerList,
    Receipt,
)
from fusenode.storage.unixfs import FileHasher, parse_dag_node

__all__ = ["Holder", "Limits", "offered"]


@dataclass(frozen=True)
class Limits:
    """``[storage] capacity`` and ``peer_quota`` in bytes; None for "auto"."""

    capacity: int | None = None
    peer_quota: int | None = None


def offered(limits: Limits, held: int, disk_total: int, disk_free: int) -> tuple[int, int]:
    """(capacity, quota) given the bytes held for others and the disk's size and room."""
    capacity = limits.capacity
    if capacity is None:
        reserve = max(defaults.DISK_RESERVE, int(disk_total * defaults.DISK_RESERVE_FRACTION))
        capacity = held + max(0, disk_free - reserve)
    quota = limits.peer_quota
    if quota is None:
        quota = int(capacity * defaults.AUTO_QUOTA_FRACTION)
    return capacity, min(quota, capacity)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class Holder:
    def __init__(
        self, ctx: NodeContext, key: PeerKey, *, recent: float, limits: Limits = Limits()
    ) -> None:
        self.peer_id = ctx.peer_id
        self.key = key
        self.addresses = tuple(ctx.blocks.identity().addresses)
        self.blocks, self.state, self.tmp = ctx.blocks, ctx.state, ctx.tmp
        self.recent = recent
        self.limits = limits
        self._reserved: Counter[str] = Counter()
        self._in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()

    def health(self) -> Health:
        # No side effect: who asks is not recorded. Liveness is what this node's own checks
        # see (`fusenode.node.monitor`), never what peers claim by calling us.
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

    async def block(self, cid: str) -> bytes | None:
        return await self.blocks.read_block(cid)

    # -- capacity ----------------------------------------------------------------------------

    def offered(self) -> tuple[int, int]:
        """(capacity, per-peer quota) in bytes as of now."""
        held = self.state.held_bytes(besides=self.peer_id)
        disk = shutil.disk_usage(self.tmp)
        return self._limits(held, disk.total, disk.free)

    def _limits(self, held: int, disk_total: int, disk_free: int) -> tuple[int, int]:
        return offered(self.limits, held, disk_total, disk_free)

    def admit(self, owner: str, cid: str, size: int) -> None:
        """Reserve ``size`` bytes for ``owner``'s store of ``cid``, or raise `OverCapacity`
        saying which limit it would break. `store_for` releases the reservation. A CID the
        owner already holds here (a retry whose answer was lost) is admitted whatever its
        quota: it costs nothing more."""
        charge = max(size, defaults.MIN_HOLD_BYTES)
        with self._lock:
            if self._in_flight[owner] >= MAX_STORES_IN_FLIGHT:
                raise OverCapacity(
                    f"peer {owner} has {MAX_STORES_IN_FLIGHT} stores in flight here already"
                )
            if not self.state.holds(cid, owner):
                self._check_room(owner, charge)
            self._reserved[owner] += charge
            self._in_flight[owner] += 1

    def _check_room(self, owner: str, charge: int) -> None:
        held = self.state.held_bytes(besides=self.peer_id)
        disk = shutil.disk_usage(self.tmp)
        capacity, quota = self._limits(held, disk.total, disk.free)
        total = held + sum(self._reserved.values())
        mine = self.state.held_bytes(owner) + self._reserved[owner]
        if total + charge > capacity:
            raise OverCapacity(
                f"this node is full: it holds {_mib(total)} for peers and offers "
                f"{_mib(capacity)} ([storage] capacity); {_mib(charge)} more do not fit"
            )
        if mine + charge > quota:
            raise OverCapacity(
                f"peer {owner} has used {_mib(mine)} of its {_mib(quota)} quota here "
                f"([storage] peer_quota); {_mib(charge)} more do not fit"
            )
        if charge * 2 > disk.free:  # the scratch copy and Kubo's own, both on this disk
            raise OverCapacity(f"this node's disk has {_mib(disk.free)} free")

    def _unreserve(self, owner: str, size: int) -> None:
        with self._lock:
            self._reserved[owner] -= max(size, defaults.MIN_HOLD_BYTES)
            if self._reserved[owner] <= 0:
                del self._reserved[owner]
            self._in_flight[owner] -= 1
            if self._in_flight[owner] <= 0:
                del self._in_flight[owner]

    async def account_legacy_holds(self) -> int:
        """Give holds recorded before sizes were (schema version 1: size 0) the size of
        what they hold, read from the root block on disk, at least `MIN_HOLD_BYTES`; how
        many were updated. Run at start, so old holds count against quotas too."""
        updated = 0
        for cid, owner in self.state.unsized_holds(besides=self.peer_id):
            root = await self.blocks.read_block(cid)
            try:
                size = parse_dag_node(root).filesize if root is not None else 0
            except ValueError:
                size = 0
            self.state.hold([cid], owner, max(size, defaults.MIN_HOLD_BYTES))
            updated += 1
        return updated

    # -- holding -----------------------------------------------------------------------------

    async def store_for(
        self, owner: str, expected: str, size: int, chunks: AsyncIterator[bytes]
    ) -> Receipt:
        """Add a fragment streamed by ``owner`` if it hashes to ``expected``; its receipt.
        `admit` must have reserved ``size`` bytes for it first.

        The bytes go to a scratch file as they arrive (memory stays at one piece whatever the
        size) and are hashed on the way (`fusenode.storage.unixfs.FileHasher`); only bytes
        that are what the owner claims reach the blockstore (which has no GC to take them out
        again). Kubo's own answer is compared too, in case the two hashings ever disagree.
        """
        try:
            if not expected.startswith("Qm"):  # Kubo's add gives CIDv0: another would not match
                raise BadPeerRequest(
                    f"expected a CIDv0 (Qm...), the form Kubo's add gives, not {expected}"
                )
            hasher = FileHasher()
            with tempfile.NamedTemporaryFile(dir=self.tmp, prefix=".store-") as f:
                async for chunk in chunks:
                    hasher.update(chunk)
                    f.write(chunk)
                f.flush()
                actual = hasher.cid()
                if actual != expected:
                    raise BadPeerRequest(f"fragment hashes to {actual}, not {expected}")
                cid = await self.blocks.add(Path(f.name))
            if cid != expected:
                if cid not in self.state.held([cid]):
                    await self.blocks.unpin(cid)
                raise BadPeerRequest(f"fragment hashes to {cid}, not {expected}")
            self.state.hold([cid], owner, max(size, defaults.MIN_HOLD_BYTES))
        finally:
            self._unreserve(owner, size)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return Receipt(cid, size, stamp)

    async def unpin_for(self, owner: str, cids: list[str]) -> list[str]:
        """Drop ``owner``'s holds; unpin what nobody holds any more."""
        released = []
        for cid in cids:
            if not self.state.holds(cid, owner):
                continue
            if self.state.release(cid, owner):
                await self.blocks.unpin(cid)
            released.append(cid)
        return released

    async def release_for(self, owner: str, cids: list[str]) -> list[str]:
        """``owner``'s release of its holds (``fusenode rm``): refused as a whole
        (`NotOwner`) when it names a CID held here only for other nodes; CIDs not held here
        at all are already released (the request is idempotent)."""
        owners = self.state.owners(cids)
        foreign = sorted(c for c, who in owners.items() if owner not in who)
        if foreign:
            raise NotOwner(
                f"{len(foreign)} of the CIDs named ({foreign[0]}, ...) were not placed here "
                f"by {owner}: only the node that placed them may release them"
            )
        return await self.unpin_for(owner, cids)

    #: Set by the node's `fusenode.node.leases.Leases`; told to owners in renew replies.
    lease_seconds: float | None = None

    def renew_for(self, owner: str, cids: list[str]) -> list[str]:
        """Renew ``owner``'s leases on those of ``cids`` it holds here; which ones (the
        owner learns from the others that this node no longer holds them)."""
        return sorted(self.state.renew(owner, cids))

    async def expire(self, lease_seconds: float) -> int:
        """Release every hold for another node whose lease was not renewed for
        ``lease_seconds``; how many holds went."""
        expired = self.state.expired(lease_seconds, besides=self.peer_id)
        for cid, owner in expired:
            if self.state.release(cid, owner):
                await self.blocks.unpin(cid)
        return len(expired)
