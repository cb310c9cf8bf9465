"""Placement policy: which node holds which fragment. One policy, for put and for repair.

Pure: no I/O, no clock, no randomness, so the same inputs always give the same placement and
the policy is tested without a network (tests/node/test_allocator.py).

The rule, for every fragment to place: among the candidate nodes, take the one whose failure
domain holds the fewest fragments of this segment; among those, the one holding the fewest
fragments overall; then by rank. A failure domain is a node by default (`Allocator.domain_of`
can group nodes, e.g. by IP address). Consequences:

- with at least n domains, the n fragments of a segment land in n distinct domains;
- with fewer (a weak placement, or a repair while nodes are down), fragments double up on the
  least-loaded domains: all n fragments on fewer nodes still beat missing ones;
- load spreads evenly over segments and models.

Ranks: a put ranks candidates by rotation (this node first, then live peers in peer-ID order,
rotated by the segment index), so with exactly n candidates fragment i of segment s goes to
candidate (i + s) mod n; a repair ranks by peer ID.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fusenode.node.errors import PlacementError

__all__ = ["Allocator", "PutPlan", "SegmentAllocation"]

#: Placement modes: "distinct" (n domains), "weak" (fewer, accepted by configuration),
#: "local" (no network: the node holds every fragment itself).
MODES = ("distinct", "weak", "local")


@dataclass(frozen=True)
class PutPlan:
    mode: str
    candidates: tuple[str, ...]


class Allocator:
    def __init__(self, domain_of: Callable[[str], str] | None = None) -> None:
        self.domain_of = domain_of or (lambda node: node)

    def plan(
        self, local: str, live: Sequence[str], n: int, *, networked: bool, allow_weak: bool
    ) -> PutPlan:
        """The candidates for a put of n fragments per segment, and the placement mode;
        `PlacementError` when the network has too few domains and weak placement is off."""
        if not networked:
            return PutPlan("local", (local,))
        candidates = (local, *sorted(set(live) - {local}))
        domains = len({self.domain_of(c) for c in candidates})
        if domains >= n:
            return PutPlan("distinct", candidates)
        if allow_weak:
            return PutPlan("weak", candidates)
        raise PlacementError(
            f"only {len(candidates)} reachable node(s) (this one included) for n={n} "
            f"fragments per segment: fragments cannot go to distinct nodes. Start more "
            "nodes, lower n, or set [placement] allow_weak = true to accept a weaker "
            "placement"
        )

    def choose(
        self,
        candidates: Sequence[str],
        segment_load: Counter[str],
        total_load: Counter[str],
        rank: Callable[[str], object],
    ) -> str:
        """The candidate for the next fragment of a segment (see the module docstring).
        ``segment_load`` counts this segment's fragments per domain, ``total_load`` all
        fragments per node."""
        if not candidates:
            raise PlacementError("no node to place a fragment on")
        return min(
            candidates,
            key=lambda c: (segment_load[self.domain_of(c)], total_load[c], rank(c)),
        )

    def replacement(
        self, candidates: Sequence[str], kept: Sequence[str], total_load: Counter[str]
    ) -> str:
        """Where a repair puts a rebuilt fragment: ``kept`` are the nodes still holding the
        segment's other fragments."""
        segment_load = Counter(self.domain_of(node) for node in kept)
        return self.choose(candidates, segment_load, total_load, rank=lambda c: c)


class SegmentAllocation:
    """The holders of each segment of one put, computed in segment order and remembered.

    Thread-safe: put's fragment sink asks from worker threads in any order, and segment s is
    always computed after segments 0..s-1, so the placement does not depend on timing.
    """

    def __init__(self, allocator: Allocator, plan: PutPlan, n: int) -> None:
        self.allocator = allocator
        self.candidates = plan.candidates
        self.n = n
        self.total: Counter[str] = Counter()
        self._segments: list[list[str]] = []
        self._full: set[str] = set()
        #: True once a refusal made two fragments of a segment share a domain.
        self.weakened = False
        self._lock = threading.Lock()

    def holder(self, segment: int, index: int) -> str:
        with self._lock:
            while len(self._segments) <= segment:
                self._segments.append(self._next(len(self._segments)))
            return self._segments[segment][index]

    def refused(self, segment: int, index: int, node: str) -> str:
        """``node`` refused fragment ``index`` of ``segment`` (full, or over our quota): it
        gets no more fragments in this put. Where that fragment goes instead: the usual rule
        over the other candidates, the segment's other fragments counted, so a node without
        any of the segment when there is one. `PlacementError` when every node refused."""
        with self._lock:
            self._full.add(node)
            holders = self._segments[segment]
            if holders[index] != node:  # another thread already moved it
                return holders[index]
            others = [h for i, h in enumerate(holders) if i != index]
            open_ = [c for c in self.candidates if c not in self._full]
            if not open_:
                raise PlacementError("every node refused to hold more: the network is full")
            segment_load = Counter(self.allocator.domain_of(h) for h in others)
            choice = self.allocator.choose(open_, segment_load, self.total, rank=lambda c: c)
            if segment_load[self.allocator.domain_of(choice)]:
                self.weakened = True
            holders[index] = choice
            self.total[node] -= 1
            self.total[choice] += 1
            return choice

    def _next(self, segment: int) -> list[str]:
        count = len(self.candidates)
        position = {c: i for i, c in enumerate(self.candidates)}
        open_ = [c for c in self.candidates if c not in self._full] or list(self.candidates)
        segment_load: Counter[str] = Counter()
        holders = []
        for _ in range(self.n):
            node = self.allocator.choose(
                open_,
                segment_load,
                self.total,
                rank=lambda c: (position[c] - segment) % count,
            )
            if segment_load[self.allocator.domain_of(node)]:
                self.weakened = self.weakened or bool(self._full)
            holders.append(node)
            segment_load[self.allocator.domain_of(node)] += 1
            self.total[node] += 1
        return holders
