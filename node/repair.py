"""Repair: the placing node rebuilds the fragments of holders that have been away too long.

A pass (every ``[repair] interval`` seconds, or `fusenode repair`): health-check every peer that
holds a fragment this node placed; those *away* (`PeerMonitor.away`: silent for
``[repair] unreachable_after`` seconds) lose their fragments. For each segment that lost some,
fetch k good fragments from the live holders (each checked against its CID), re-encode the
segment (erasure coding is deterministic, so a rebuilt fragment has the bytes, and the CID,
the manifest lists), and place each lost one where the allocator says (the same policy as
put: a node without a fragment of the segment first). The placement table records the move.
One failed segment does not stop the pass; the summary lists it.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fusenode.node.allocator import Allocator
from fusenode.node.context import NodeContext
from fusenode.node.errors import NodeError
from fusenode.node.monitor import PeerMonitor
from fusenode.node.placement import Placer
from fusenode.node.state import Placement
from fusenode.storage.erasure import ErasureCoder
from fusenode.storage.errors import StorageError
from fusenode.storage.manifest import FragmentRef, Manifest

__all__ = ["Repairer"]

log = logging.getLogger(__name__)


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
        peers = sorted({p.peer for p in placements if p.peer != self.peer_id})
        answers = await self.monitor.check(peers)
        away = set(self.monitor.away(answers))
        summary: dict[str, Any] = {
            "checked": len(peers),
            "unreachable": sorted(p for p in peers if not answers[p]),
            "replaced": sorted(away),
            "repaired": [],
            "failed": [],
        }
        if not away:
            return summary
        live = await self.monitor.live_peers()
        by_segment: dict[tuple[str, int], list[Placement]] = defaultdict(list)
        for p in placements:
            by_segment[(p.manifest, p.segment)].append(p)
        total = Counter(p.peer for p in placements)  # fragments per node, all models
        for (manifest_cid, segment), rows in sorted(by_segment.items()):
            lost = [r for r in rows if r.peer in away]
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
        return summary

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
        candidates = [self.peer_id, *live]
        moves = []
        for row in lost:
            ref = seg.fragments[row.fragment]
            target = self.allocator.replacement(candidates, holders, total)
            with tempfile.NamedTemporaryFile(dir=self.tmp, prefix=".repair-") as f:
                f.write(fragments[row.fragment])
                f.flush()
                # A peer checks the bytes hash to the manifest's CID; this node checks its add.
                cid = await self.placer.place(target, Path(f.name), cid=ref.cid)
            if cid != ref.cid:
                raise NodeError(f"rebuilt fragment {row.fragment} hashes to {cid}, not {ref.cid}")
            self.state.move_placement(manifest_cid, segment, row.fragment, target)
            holders.append(target)
            total[target] += 1
            total[row.peer] -= 1
            moves.append(
                {
                    "manifest": manifest_cid,
                    "segment": segment,
                    "fragment": row.fragment,
                    "from": row.peer,
                    "to": target,
                }
            )
            log.info(
                "repaired %s segment %d fragment %d: %s -> %s",
                manifest_cid,
                segment,
                row.fragment,
                row.peer,
                target,
            )
        return moves

    async def run_forever(self, stop: asyncio.Event, interval: float) -> None:
        """A pass every ``interval`` seconds until ``stop``."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            except TimeoutError:
                pass
            try:
                summary = await self.run()
                if summary["repaired"] or summary["failed"]:
                    log.info("repair pass: %s", summary)
            except Exception:
                log.exception("repair pass failed")
