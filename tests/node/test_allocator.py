"""The placement policy, without a network: one rule for put and repair (node/allocator.py)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from fusenode.node.allocator import Allocator, PutPlan, SegmentAllocation
from fusenode.node.errors import PlacementError

NODES = [f"peer{i}" for i in range(10)]


def holders(plan: PutPlan, n: int, segments: int, allocator: Allocator | None = None):
    alloc = SegmentAllocation(allocator or Allocator(), plan, n)
    return [[alloc.holder(s, i) for i in range(n)] for s in range(segments)]


def test_plan_modes():
    a = Allocator()
    assert a.plan("self", NODES[:5], 6, networked=True, allow_weak=False) == PutPlan(
        "distinct", ("self", *NODES[:5])
    )
    assert a.plan("self", NODES[:2], 6, networked=True, allow_weak=True).mode == "weak"
    assert a.plan("self", NODES, 6, networked=False, allow_weak=False) == PutPlan(
        "local", ("self",)
    )
    with pytest.raises(PlacementError, match=r"only 3 reachable node\(s\).*n=6.*allow_weak"):
        a.plan("self", NODES[:2], 6, networked=True, allow_weak=False)


def test_live_peers_are_sorted_and_this_node_comes_first():
    plan = Allocator().plan("zz", ["b", "a", "zz", "c"], 3, networked=True, allow_weak=False)
    assert plan.candidates == ("zz", "a", "b", "c")


def test_exactly_n_nodes_rotate_by_segment():
    plan = PutPlan("distinct", tuple(NODES[:6]))
    for s, row in enumerate(holders(plan, 6, 8)):
        assert row == [NODES[(i + s) % 6] for i in range(6)]


@pytest.mark.parametrize("count", [7, 9, 10])
def test_more_nodes_than_n_distinct_and_balanced(count):
    plan = PutPlan("distinct", tuple(NODES[:count]))
    rows = holders(plan, 6, 30)
    assert all(len(set(row)) == 6 for row in rows)
    load = Counter(h for row in rows for h in row)
    assert set(load) == set(NODES[:count])
    assert max(load.values()) - min(load.values()) <= 1


def test_weak_placement_doubles_up_evenly():
    plan = PutPlan("weak", tuple(NODES[:4]))
    rows = holders(plan, 6, 10)
    for row in rows:
        per_node = Counter(row)
        assert sorted(per_node.values()) == [1, 1, 2, 2]  # never three on one node
    load = Counter(h for row in rows for h in row)
    assert max(load.values()) - min(load.values()) <= 1


def test_local_placement_keeps_everything_here():
    assert holders(PutPlan("local", ("self",)), 6, 3) == [["self"] * 6] * 3


def test_failure_domains_are_spread_before_nodes():
    """Two nodes on one host are one domain: a segment uses each domain once while it can."""
    host = {"a1": "A", "a2": "A", "b1": "B", "c1": "C", "d1": "D"}
    allocator = Allocator(domain_of=host.__getitem__)
    plan = allocator.plan("a1", ["a2", "b1", "c1", "d1"], 4, networked=True, allow_weak=False)
    assert plan.mode == "distinct"
    for row in holders(plan, 4, 12, allocator):
        assert sorted(host[h] for h in row) == ["A", "B", "C", "D"]
    with pytest.raises(PlacementError):  # 4 domains cannot hold 5 fragments distinctly
        allocator.plan("a1", ["a2", "b1", "c1", "d1"], 5, networked=True, allow_weak=False)


def test_placement_does_not_depend_on_the_order_fragments_are_asked_for():
    plan = PutPlan("distinct", tuple(NODES[:8]))
    expected = holders(plan, 6, 20)
    alloc = SegmentAllocation(Allocator(), plan, 6)
    asks = [(s, i) for s in reversed(range(20)) for i in range(6)]
    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(asks, pool.map(lambda a: alloc.holder(*a), asks), strict=True))
    assert [[got[(s, i)] for i in range(6)] for s in range(20)] == expected


def test_replacement_prefers_a_node_without_the_segment_then_the_least_loaded():
    a = Allocator()
    total = Counter({"p1": 5, "p2": 1, "p3": 9, "p4": 1})
    # p1 and p2 already hold fragments of this segment.
    assert a.replacement(["p1", "p2", "p3", "p4"], ["p1", "p2"], total) == "p4"
    # Only nodes with a fragment left: the one with the fewest of this segment, then load.
    assert a.replacement(["p1", "p2"], ["p1", "p2", "p2"], total) == "p1"
    # Ties are broken by peer ID, so a repair is reproducible.
    assert a.replacement(["p9", "p8"], [], Counter()) == "p8"
    with pytest.raises(PlacementError):
        a.replacement([], ["p1"], total)
