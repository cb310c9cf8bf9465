"""What a node can say about itself from its state database and its disk, without asking the
network: the models it placed and their health, what it holds for others, its storage, peers
and jobs. ``fusenode ls``, ``fusenode status`` (no CID), ``GET /metrics`` and the dashboard
all read it from here (`fusenode.node.service.NodeService.ls` and ``node_status``).

Liveness: a peer is live when its daemon answered one of this daemon's checks within
`defaults.LIVE_WINDOW` seconds (the daemon checks its peers every few seconds, and records each
answer in the state). A command run without a daemon has no such checks: it passes
``live=None``, and health then counts every copy the state does not mark lost.

A model's health: *healthy* when every segment counts its n fragments (a copy counts when
it is not marked lost and its holder is live or this node); *degraded* when a segment counts
fewer than n but at least k (readable, repair will rebuild); *unavailable* when a segment
counts fewer than k.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fusenode.node.state import Placement, State

__all__ = ["disk", "held_for_others", "model_totals", "models"]


def disk(path: Path) -> tuple[int, int]:
    """(total, free) bytes of the disk holding ``path``."""
    usage = shutil.disk_usage(path)
    return usage.total, usage.free


def held_for_others(state: State, peer_id: str) -> list[dict[str, Any]]:
    """What this node holds for each other peer: CIDs (fragments and the manifests listing
    them) and bytes accounted to it."""
    return [
        {"peer": owner, "fragments": count, "bytes": size}
        for owner, count, size in state.held_per_owner(besides=peer_id)
    ]


def _segments(rows: Iterable[Placement]) -> dict[int, list[Placement]]:
    out: dict[int, list[Placement]] = defaultdict(list)
    for row in rows:
        out[row.segment].append(row)
    return out


def models(state: State, peer_id: str, live: set[str] | None) -> list[dict[str, Any]]:
    """Every model this node placed, with what put recorded and its health (module
    docstring)."""
    info = state.model_info()
    placed: dict[str, list[Placement]] = defaultdict(list)
    for p in state.placements():
        placed[p.manifest].append(p)

    def counts(p: Placement) -> bool:
        return not p.lost and (live is None or p.peer == peer_id or p.peer in live)

    out = []
    for cid, k, n, segments, placement, created in state.models():
        by_segment = _segments(placed.get(cid, []))
        counted = [sum(counts(p) for p in by_segment.get(s, [])) for s in range(segments)]
        least = min(counted, default=n)
        health = "healthy" if least >= n else "degraded" if least >= k else "unavailable"
        extra = info.get(cid, {})
        out.append(
            {
                "cid": cid,
                "name": extra.get("name"),
                "size": extra.get("size"),
                "k": k,
                "n": n,
                "segments": segments,
                "placement": placement,
                "created": created,
                "health": health,
                "degraded_segments": sum(c < n for c in counted),
                "fragments_counted": sum(counted),
                "holders": sorted({p.peer for p in placed.get(cid, [])}),
            }
        )
    return out


def model_totals(listing: list[dict[str, Any]]) -> dict[str, int]:
    """Models by health, and degraded segments over all of them."""
    totals = {"placed": len(listing), "healthy": 0, "degraded": 0, "unavailable": 0}
    for m in listing:
        totals[m["health"]] += 1
    totals["degraded_segments"] = sum(m["degraded_segments"] for m in listing)
    return totals
