"""Audits: proof that the holders of the fragments this node placed still have them.

A holder's word is worth nothing by itself: `/has` answers what it likes, and a daemon that
answers health checks may have deleted its blocks long ago. So every ``[repair]
audit_interval`` seconds the placing node challenges each holder for blocks chosen at random
in the fragments it holds, fetched from that holder alone (``GET /peer/v1/block``, its own
blockstore, never the network) under a deadline (`defaults.AUDIT_TIMEOUT`), and checks each
against its CID. The placing node keeps no copy: a fragment's CID is the hash of its root
block, the root lists its children's CIDs, and so on down to the leaves, so one path from the
root to a random leaf is checkable from the CID alone (Storj audits stripes of erasure shares
the same way: a few random pieces, often, rather than everything, rarely).

One challenge per fragment: the root block, then a leaf chosen uniformly by byte offset and
every block on the way to it. A holder missing a fraction f of a fragment's leaves fails each
audit with probability f; one missing all of them (deleted, or never stored) fails at once.
Each pass audits up to `defaults.AUDIT_FRAGMENTS` fragments per holder, least recently
audited first, so a holder with fewer fragments than that has every one of them checked
every interval.

Outcomes:

- *passed*: every block came back and hashed to its CID.
- *failed*: the holder answered but a block was missing (404), corrupt, not a UnixFS file
  node, or it left `UNANSWERED_FAIL` audits in a row unanswered while answering health checks
  (a holder cannot dodge audits by timing out). The fragment's placement is marked lost, and
  repair rebuilds it on another node (a pass starts at once); the old copy is released.
- *unanswered*: no authentic answer in time. Not a verdict by itself; a holder that does not
  answer health checks either (before its audits, or right after one went unanswered) is
  left to liveness (`fusenode.node.monitor`), so a restart never costs a rebuild. A verdict
  is recorded only while the placement still lists that holder (a rebalance may have moved
  the fragment, and the old copy been released, during the audit).

Each holder has a score, Storj's beta reputation: alpha and beta start at 1 and 0, each audit
multiplies both by `FORGET` and adds 1 to alpha for a pass or to beta for a failure; the score
is alpha / (alpha + beta). A holder under `DISTRUST_BELOW` gets no new fragments from repair
or rebalancing until passing audits bring it back (one failure costs about 14 passes).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from fusenode import defaults
from fusenode.node.aio import every
from fusenode.node.context import NodeContext
from fusenode.node.peer_client import PeerClient
from fusenode.node.protocol import PeerError
from fusenode.node.state import Placement, State
from fusenode.storage.unixfs import block_cid, parse_dag_node

__all__ = ["DISTRUST_BELOW", "FORGET", "Auditor", "distrusted"]

log = logging.getLogger(__name__)

FORGET = 0.95
DISTRUST_BELOW = 0.8
#: Audits in a row a holder that answers health checks may leave unanswered.
UNANSWERED_FAIL = 2
#: Holders audited at once.
HOLDERS_AT_ONCE = 8
#: Blocks one challenge may walk (a path from the root down to a leaf is 2-4 blocks).
MAX_DEPTH = 8


def distrusted(state: State) -> set[str]:
    """Holders whose audit score is under `DISTRUST_BELOW`."""
    return {p for p, s in state.scores().items() if s["score"] < DISTRUST_BELOW}


class AuditFailed(Exception):
    """The holder answered, and the answer proves it has not got the fragment intact."""


class Auditor:
    def __init__(
        self,
        ctx: NodeContext,
        client: PeerClient,
        *,
        timeout: float = defaults.AUDIT_TIMEOUT,
        per_holder: int = defaults.AUDIT_FRAGMENTS,
        on_failure: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.peer_id, self.state = ctx.peer_id, ctx.state
        self.client = client
        self.timeout = timeout
        self.per_holder = per_holder
        self.on_failure = on_failure
        self._random = secrets.SystemRandom()
        self._lock = asyncio.Lock()

    async def run(self, *, repair: bool = True) -> dict[str, Any]:
        """One pass over every holder; its summary (audited, passed, failed, unanswered,
        skipped: holders that did not answer a health check). ``repair``: after a failure,
        call ``on_failure`` (a repair pass) at once."""
        async with self._lock:
            summary = await self._pass()
        if summary["failed"] and repair and self.on_failure is not None:
            await self.on_failure()  # rebuild now, not at the next repair pass
        return summary

    def _chosen(self) -> dict[str, list[Placement]]:
        """Per holder, the fragments to audit this pass: least recently audited first."""
        last = self.state.audits()
        by_peer: dict[str, list[Placement]] = defaultdict(list)
        for p in self.state.placements():
            if p.peer != self.peer_id and not p.lost:
                by_peer[p.peer].append(p)
        chosen = {}
        for peer, rows in by_peer.items():
            unique = list({r.cid: r for r in rows}.values())
            unique.sort(key=lambda r: (last.get((r.cid, peer), {}).get("time") or "", r.cid))
            chosen[peer] = unique[: self.per_holder]
        return chosen

    async def _pass(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "audited": 0,
            "passed": 0,
            "failed": [],
            "unanswered": [],
            "skipped": [],
        }
        gate = asyncio.Semaphore(HOLDERS_AT_ONCE)

        async def holder(peer: str, rows: list[Placement]) -> None:
            async with gate:
                try:
                    await self.client.health(peer)
                except PeerError:
                    summary["skipped"].append(peer)  # liveness decides about this one
                    return
                for row in rows:
                    result, detail = await self.audit(peer, row.cid)
                    if result == "down":  # the rest of its fragments wait for the next pass
                        summary["skipped"].append(peer)
                        return
                    if result == "skipped":
                        continue
                    summary["audited"] += 1
                    if result == "passed":
                        summary["passed"] += 1
                    else:
                        summary[result].append({"peer": peer, "cid": row.cid, "detail": detail})

        await asyncio.gather(*(holder(p, rows) for p, rows in sorted(self._chosen().items())))
        return summary

    async def audit(self, peer: str, cid: str) -> tuple[str, str]:
        """Challenge ``peer`` for fragment ``cid``, record the outcome; (result, detail).
        Results: passed, failed, unanswered (recorded); skipped (the fragment moved) and
        down (the holder stopped answering health checks), recorded as nothing."""
        try:
            path = await self._challenge(peer, cid)
        except AuditFailed as e:
            return self._failed(peer, cid, str(e))
        except PeerError as e:
            try:  # a holder that went down (a restart) is liveness's business, not a verdict
                await self.client.health(peer)
            except PeerError:
                return "down", f"the holder stopped answering: {e}"
            detail = f"no answer to the audit: {e}"
            streak = self.state.record_audit(cid, peer, "unanswered", detail)
            if streak >= UNANSWERED_FAIL:
                return self._failed(
                    peer, cid, f"{streak} audits in a row unanswered while it answers health"
                )
            return "unanswered", detail
        self.state.record_audit(cid, peer, "passed", path)
        self.state.update_score(peer, True, FORGET)
        return "passed", path

    def _failed(self, peer: str, cid: str, detail: str) -> tuple[str, str]:
        if not self.state.placed_on(cid, peer):  # moved meanwhile (rebalance, repair)
            return "skipped", "the fragment moved while it was audited"
        self.state.record_audit(cid, peer, "failed", detail)
        score = self.state.update_score(peer, False, FORGET)
        self.state.mark_lost(cid, peer, f"failed audit: {detail}")
        log.warning("audit of %s on %s failed (score %.2f): %s", cid, peer, score, detail)
        return "failed", detail

    async def _challenge(self, peer: str, cid: str) -> str:
        """Walk from the root of fragment ``cid`` to a random leaf, every block fetched from
        ``peer`` and checked; a description of the path on success."""
        want, offset, depth, path = cid, None, 0, []
        while True:
            block = await self.client.block(peer, want, self.timeout)
            if block is None:
                raise AuditFailed(f"block {want} of {cid} is missing on the holder")
            if block_cid(block) != want:
                raise AuditFailed(f"block {want} of {cid} came back corrupt")
            try:
                node = parse_dag_node(block)
            except ValueError as e:
                raise AuditFailed(f"block {want} of {cid} is not a UnixFS file node: {e}") from None
            if offset is None:
                offset = self._random.randrange(node.filesize) if node.filesize else 0
            if not node.links:
                path.append(want)
                return f"{len(path)} blocks checked, down to byte {offset}"
            depth += 1
            if depth > MAX_DEPTH:
                raise AuditFailed(f"fragment {cid} is deeper than {MAX_DEPTH} levels")
            index = 0
            while index < len(node.links) - 1 and offset >= node.blocksizes[index]:
                offset -= node.blocksizes[index]
                index += 1
            path.append(want)
            want = node.links[index]

    async def run_forever(self, stop: asyncio.Event, interval: float) -> None:
        """A pass every ``interval`` seconds until ``stop``."""
        await every(interval, stop, self.run, lambda s: bool(s["failed"]), "audit")
