"""Repair: the placing node rebuilds the fragments of holders that have been away too long.

A pass (every ``[repair] interval`` seconds, or `fusenode repair`): health-check every peer that
holds a fragment this node placed; those *away* (`PeerMonitor.away`: silent for
``[repair] unreachable_after`` seconds) lose their fragments, and so does every fragment an
audit found missing or corrupt on its holder (`fusenode.node.auditor` marks the placement
lost). For each segment that lost some,
fetch k good fragments from the live holders (each checked against its CID), re-encode the
segment (erasure coding is deterministic, so a rebuilt fragment has the bytes, and the CID,
the manifest lists), and place each lost one where the allocator says (the same policy as
put: a node without a fragment of the segment first), never on a holder that lost one of the
segment's fragments nor on one whose audit score fell below `auditor.DISTRUST_BELOW`. The placement table records the move.
One failed segment does not stop the pass; the summary lists it.

When an away holder comes back (a partition healed), its old copies are *surplus*: the
placement already has the rebuilt ones. The rule: they are released. Each move records the
old copy (``surplus`` table), and once its holder answers again the owner asks it to drop its
hold (``/peer/v1/unpin``, which only the owner's own hold can be) unless the placement put
that fragment back on it meanwhile. Keeping them as extra redundancy would let the placement
table and the network drift apart, and the holder's disk is its operator's.

Rebalance: a segment with two fragments in one failure domain (a weak placement, or a repair
while too few domains were live) gets one of them moved to a live domain that holds none of
the segment, when there is one: the placement is never left weaker than the network allows.
At most `MAX_REBALANCE` moves a pass, so a returning network is not flooded.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fusenode.node.aio import every
from fusenode.node.allocator import Allocator
from fusenode.node.auditor import distrusted
from fusenode.node.context import NodeContext
from fusenode.node.errors import NodeError
from fusenode.node.monitor import PeerMonitor
from fusenode.node.placement import Placed, Placer
from fusenode.node.protocol import PeerError, PeerOverCapacity
from fusenode.node.state import Placement
from fusenode.storage.erasure import ErasureCoder
from fusenode.storage.errors import StorageError
from fusenode.storage.manifest import FragmentRef, Manifest

__all__ = ["Repairer"]

log = logging.getLogger(__name__)

#: Fragments moved by one pass to spread a segment over more domains.
MAX_REBALANCE = 16


class Repairer:
    def __init__(
        self,
        ctx: NodeContext,
        monitor: PeerMonitor,
        allocator: Allocator,
        placer: Placer,
        manifest: Callable[[str], Awaitable[Manifest]],
        *,
        fetch_timeout: float,
    ) -> None:
        self.peer_id, self.blocks, self.state, self.tmp = (
            ctx.peer_id,
            ctx.blocks,
            ctx.state,
            ctx.tmp,
        )
        self.monitor = monitor
        self.allocator = allocator
        self.placer = placer
        self.manifest = manifest
        self.fetch_timeout = fetch_timeout
        self._lock = asyncio.Lock()

    async def run(self) -> dict[str, Any]:
        """One repair pass; its summary (checked, unreachable, replaced, repaired, failed)."""
        async with self._lock:
            return await self._pass()

    async def _pass(self) -> dict[str, Any]:
        placements = self.state.placements()
        holders = sorted({p.peer for p in placements if p.peer != self.peer_id})
        surplus_holders = {peer for _, peer in self.state.surplus()}
        answers = await self.monitor.check(sorted(set(holders) | surplus_holders))
        away = set(self.monitor.away({p: answers[p] for p in holders}))
        failed_audit = {p.peer for p in placements if p.lost}
        summary: dict[str, Any] = {
            "checked": len(holders),
            "unreachable": sorted(p for p in holders if not answers[p]),
            "replaced": sorted(away | failed_audit),
            "repaired": [],
            "failed": [],
            "rebalanced": [],
            "released": 0,
        }
        bad = distrusted(self.state)
        live = [p for p in await self.monitor.live_peers() if p not in bad]
        if away or failed_audit:
            await self._repair_lost(placements, away, live, summary)
        summary["rebalanced"] = await self._rebalance(live)
        summary["released"] = await self._release(answers)
        return summary

    async def _repair_lost(
        self, placements: list[Placement], away: set[str], live: list[str], summary: dict
    ) -> None:
        by_segment: dict[tuple[str, int], list[Placement]] = defaultdict(list)
        for p in placements:
            by_segment[(p.manifest, p.segment)].append(p)
        total = Counter(p.peer for p in placements)  # fragments per node, all models
        for (manifest_cid, segment), rows in sorted(by_segment.items()):
            lost = [r for r in rows if r.peer in away or r.lost]
            if not lost:
                continue
            try:
                moves = await self._segment(manifest_cid, segment, rows, lost, live, total)
                summary["repaired"].extend(moves)
            except Exception as e:  # keep repairing the others; report this one
                log.warning("repair of %s segment %d failed: %s", manifest_cid, segment, e)
                summary["failed"].append(
                    {"manifest": manifest_cid, "segment": segment, "error": str(e)}
                )

    async def _release(self, answers: dict[str, bool]) -> int:
        """Ask holders that answer again to drop the copies repair replaced; how many went."""
        current = {(p.cid, p.peer) for p in self.state.placements()}
        pending: dict[str, list[str]] = defaultdict(list)
        for cid, peer in self.state.surplus():
            if (cid, peer) in current:  # placed there again since: it counts
                self.state.drop_surplus(cid, peer)
            elif answers.get(peer):
                pending[peer].append(cid)
        released = 0
        for peer, cids in pending.items():
            try:
                await self.placer.client.unpin(peer, cids)
            except PeerError as e:
                log.info("release of %d surplus copies on %s: %s", len(cids), peer, e)
                continue
            for cid in cids:
                self.state.drop_surplus(cid, peer)
            released += len(cids)
        return released

    async def _rebalance(self, live: list[str]) -> list[dict[str, Any]]:
        """Move one fragment of each segment that doubles up in a domain to a live domain
        without any of the segment, while there is one (see the module docstring)."""
        domain = self.allocator.domain_of
        candidates = [self.peer_id, *live]
        reachable = set(candidates)
        placements = self.state.placements()
        total = Counter(p.peer for p in placements)
        by_segment: dict[tuple[str, int], list[Placement]] = defaultdict(list)
        for p in placements:
            by_segment[(p.manifest, p.segment)].append(p)
        moves: list[dict[str, Any]] = []
        for (manifest_cid, segment), rows in sorted(by_segment.items()):
            if len(moves) >= MAX_REBALANCE:
                break
            counts = Counter(domain(r.peer) for r in rows)
            doubled = [r for r in rows if counts[domain(r.peer)] > 1 and r.peer in reachable]
            free = [c for c in candidates if counts[domain(c)] == 0]
            if not doubled or not free:
                continue
            row = doubled[-1]
            others = [r.peer for r in rows if r is not row]
            target = self.allocator.replacement(free, others, total)
            try:
                await self._move(manifest_cid, row, target)
            except Exception as e:
                log.warning("rebalance of %s segment %d: %s", manifest_cid, segment, e)
                continue
            total[target] += 1
            total[row.peer] -= 1
            moves.append(_move_record(row, target))
        return moves

    async def _move(self, manifest_cid: str, row: Placement, target: str) -> None:
        """Copy fragment ``row`` to ``target`` (checked by CID), then record the move and
        the old copy as surplus (or drop this node's own hold at once)."""
        manifest = await self.manifest(manifest_cid)
        seg = manifest.segments[row.segment]
        ref = seg.fragments[row.fragment]
        coder = ErasureCoder(manifest.erasure.k, manifest.erasure.n)

        def fetch_checked() -> bytes:
            data = self.blocks.sync.fetch_bytes(ref.cid, self.fetch_timeout)
            coder.check_fragment(row.fragment, data, seg.size, cid=ref.cid, sha256=ref.sha256)
            return data

        data = await self.blocks.bridge.run(fetch_checked)
        with tempfile.NamedTemporaryFile(dir=self.tmp, prefix=".rebalance-") as f:
            f.write(data)
            f.flush()
            placed = await self.placer.place(target, Path(f.name), cid=ref.cid)
        if placed.cid != ref.cid:
            raise NodeError(f"fragment {row.fragment} was stored as {placed.cid}, not {ref.cid}")
        self.state.move_placement(manifest_cid, row.segment, row.fragment, target, placed.receipt)
        await self._surplus(manifest_cid, ref.cid, row.peer)

    async def _surplus(self, manifest_cid: str, cid: str, peer: str) -> None:
        if peer == self.peer_id:  # our own copy: release it here, now
            if self.state.release(cid, self.peer_id):
                await self.blocks.unpin(cid)
        else:
            self.state.add_surplus(manifest_cid, cid, peer)

    async def _segment(
        self,
        manifest_cid: str,
        segment: int,
        rows: list[Placement],
        lost: list[Placement],
        live: list[str],
        total: Counter[str],
    ) -> list[dict[str, Any]]:
        manifest = await self.manifest(manifest_cid)
        seg = manifest.segments[segment]
        coder = ErasureCoder(manifest.erasure.k, manifest.erasure.n)
        reachable = {self.peer_id, *live}
        kept = [r for r in rows if r not in lost]
        good: dict[int, bytes] = {}
        for row in kept:
            if len(good) >= coder.k:
                break
            if row.peer not in reachable:
                continue
            ref = seg.fragments[row.fragment]

            def fetch_checked(index: int = row.fragment, ref: FragmentRef = ref) -> bytes:
                # On a worker thread: checking hashes the whole fragment.
                data = self.blocks.sync.fetch_bytes(ref.cid, self.fetch_timeout)
                coder.check_fragment(index, data, seg.size, cid=ref.cid, sha256=ref.sha256)
                return data

            try:
                data = await self.blocks.bridge.run(fetch_checked)
            except StorageError as e:
                log.warning("repair: fragment %d of %s: %s", row.fragment, manifest_cid, e)
                continue
            good[row.fragment] = data
        if len(good) < coder.k:
            raise NodeError(f"only {len(good)} of {coder.k} fragments reachable: cannot rebuild")
        fragments = await self.blocks.bridge.run(coder.rebuild, good, seg.size)
        holders = [r.peer for r in kept]
        lost_on = {r.peer for r in lost}  # a holder that lost a fragment gets none back
        candidates = [c for c in (self.peer_id, *live) if c not in lost_on]
        moves = []
        for row in lost:
            ref = seg.fragments[row.fragment]
            with tempfile.NamedTemporaryFile(dir=self.tmp, prefix=".repair-") as f:
                f.write(fragments[row.fragment])
                f.flush()
                # A peer checks the bytes hash to the manifest's CID; this node checks its add.
                target, placed = await self._place_somewhere(
                    Path(f.name), ref.cid, candidates, holders, total
                )
            if placed.cid != ref.cid:
                raise NodeError(
                    f"rebuilt fragment {row.fragment} hashes to {placed.cid}, not {ref.cid}"
                )
            self.state.move_placement(manifest_cid, segment, row.fragment, target, placed.receipt)
            await self._surplus(manifest_cid, ref.cid, row.peer)
            holders.append(target)
            total[target] += 1
            total[row.peer] -= 1
            moves.append(_move_record(row, target))
            log.info(
                "repaired %s segment %d fragment %d: %s -> %s",
                manifest_cid,
                segment,
                row.fragment,
                row.peer,
                target,
            )
        return moves

    async def _place_somewhere(
        self, path: Path, cid: str, candidates: list[str], holders: list[str], total: Counter
    ) -> tuple[str, Placed]:
        """Place a rebuilt fragment where the allocator says; a node that refuses, fails or
        does not answer is passed over (for the rest of this pass too), so one hostile peer
        cannot stop a repair. A store that may have landed is released later (surplus)."""
        while True:
            target = self.allocator.replacement(candidates, holders, total)
            try:
                return target, await self.placer.place(target, path, cid=cid)
            except PeerError as e:
                log.info("repair: %s", e)
                if not isinstance(e, PeerOverCapacity):
                    self.state.add_surplus("", cid, target)
                candidates.remove(target)

    async def run_forever(self, stop: asyncio.Event, interval: float) -> None:
        """A pass every ``interval`` seconds until ``stop``."""
        await every(
            interval, stop, self.run, lambda s: bool(s["repaired"] or s["failed"]), "repair"
        )


def _move_record(row: Placement, target: str) -> dict[str, Any]:
    return {
        "manifest": row.manifest,
        "segment": row.segment,
        "fragment": row.fragment,
        "from": row.peer,
        "to": target,
    }
