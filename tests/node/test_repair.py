"""Repair without a network: which fragments are rebuilt, where they go, what is recorded
(node/repair.py on an in-memory backend, fake peers and a real SQLite state)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fusenode.node.aio import AsyncBlocks, Bridge
from fusenode.node.allocator import Allocator
from fusenode.node.auditor import FORGET
from fusenode.node.context import NodeContext
from fusenode.node.monitor import PeerMonitor
from fusenode.node.placement import Placed
from fusenode.node.repair import Repairer
from fusenode.node.state import State
from fusenode.storage.store import load_manifest, put_file
from fusenode.storage.unixfs import file_cid
from tests.support.fakes import FakeBackend, FakeHealth

SELF = "self"
PEERS = ["p1", "p2", "p3", "p4", "p5"]


class FakePlacer:
    """Records where fragments go, after checking the bytes are what the CID says."""

    def __init__(self, client: FakeHealth) -> None:
        self.client = client
        self.placed: list[tuple[str, str]] = []

    async def place(self, holder: str, path: Path, cid: str | None = None) -> Placed:
        actual = file_cid(path.read_bytes())
        assert cid is None or actual == cid
        self.placed.append((holder, actual))
        return Placed(actual, f"receipt from {holder}")


class World:
    """A model stored k=2 n=4 over SELF and p1..p3 (three segments); p4, p5 hold nothing."""

    def __init__(self, tmp: Path) -> None:
        self.backend = FakeBackend()
        src = tmp / "model.bin"
        src.write_bytes(os.urandom(3000))
        self.put = put_file(src, self.backend, public=True, k=2, n=4, segment_size=1024)
        self.cid = self.put.cid
        self.state = State(tmp / "state.db")
        owners = [SELF, "p1", "p2", "p3"]
        rows = [
            (seg.index, f.index, f.cid, owners[(f.index + seg.index) % 4])
            for seg in self.put.manifest.segments
            for f in seg.fragments
        ]
        self.state.record_model(self.cid, 2, 4, len(self.put.manifest.segments), "distinct", rows)
        self.health = FakeHealth({p: () for p in PEERS})
        self.now = datetime.now(UTC)
        self.clock = [self.now]
        self.placer = FakePlacer(self.health)
        self.tmp = tmp

    def repairer(self) -> Repairer:
        blocks = AsyncBlocks(self.backend, Bridge())
        blocks.peers = self._connected  # type: ignore[method-assign]
        ctx = NodeContext(SELF, blocks, self.state, self.tmp)
        monitor = PeerMonitor(ctx, self.health, unreachable_after=600, clock=lambda: self.clock[0])

        async def manifest(cid: str):
            return load_manifest(cid, self.backend)

        placer: Any = self.placer
        return Repairer(ctx, monitor, Allocator(), placer, manifest, fetch_timeout=1.0)

    async def _connected(self) -> list[str]:
        return sorted(self.health.answers)

    def run(self) -> dict:
        async def scenario():
            repairer = self.repairer()
            await repairer.monitor.check(PEERS)  # every peer answered once: seen now
            for peer in self.down:
                self.health.answers.pop(peer, None)
            self.clock[0] = self.now + timedelta(seconds=self.after)
            return await repairer.run()

        return asyncio.run(scenario())

    down: tuple[str, ...] = ()
    after = 0.0


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.state.close()


def holders_by_segment(state: State, cid: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for p in state.placements(cid):
        out.setdefault(p.segment, []).append(p.peer)
    return out


def test_nothing_to_do_while_everyone_answers(world):
    summary = world.run()
    assert summary == {
        "checked": 3,
        "unreachable": [],
        "replaced": [],
        "repaired": [],
        "failed": [],
        "rebalanced": [],
        "released": 0,
    }
    assert world.placer.placed == []


def test_a_short_outage_is_not_repaired(world):
    world.down, world.after = ("p2",), 599
    summary = world.run()
    assert summary["unreachable"] == ["p2"] and summary["replaced"] == []
    assert world.placer.placed == []


def test_an_away_holder_is_replaced_on_nodes_without_the_segment(world):
    before = holders_by_segment(world.state, world.cid)
    world.down, world.after = ("p2",), 601
    summary = world.run()
    assert summary["replaced"] == ["p2"] and summary["failed"] == []
    lost = sum(row.count("p2") for row in before.values())
    assert len(summary["repaired"]) == len(world.placer.placed) == lost == 3
    after = holders_by_segment(world.state, world.cid)
    for segment, row in after.items():
        assert "p2" not in row
        assert len(set(row)) == 4, (segment, row)  # still four distinct holders
    # The rebuilt fragments went to p4 and p5 (free), spreading the load between them.
    assert Counter(h for h, _ in world.placer.placed) in (Counter(p4=2, p5=1), Counter(p4=1, p5=2))
    # Same CIDs as the manifest lists: erasure coding is deterministic.
    listed = {f.cid for s in world.put.manifest.segments for f in s.fragments}
    assert {cid for _, cid in world.placer.placed} <= listed
    assert world.run()["replaced"] == []  # nothing placed on p2 any more


def test_too_few_fragments_left_is_reported_not_raised(world):
    world.down, world.after = ("p1", "p2", "p3"), 601
    summary = world.run()
    assert summary["replaced"] == ["p1", "p2", "p3"]
    assert len(summary["failed"]) == 3 and summary["repaired"] == []
    assert all("cannot rebuild" in f["error"] for f in summary["failed"])


def test_a_damaged_fragment_is_skipped_and_another_used(world):
    seg = world.put.manifest.segments[0]
    damaged = seg.fragments[0]  # held by SELF in segment 0
    world.backend.blocks[damaged.cid] = b"\0" + world.backend.blocks[damaged.cid][1:]
    world.down, world.after = ("p2",), 601
    summary = world.run()
    assert summary["failed"] == []
    assert any(m["segment"] == 0 for m in summary["repaired"])


def test_returning_holders_release_their_surplus_copies(world):
    world.down, world.after = ("p2",), 601
    summary = world.run()
    replaced = {m["fragment"] for m in summary["repaired"]}
    assert replaced and summary["released"] == 0  # p2 is still away
    surplus = world.state.surplus()
    assert {peer for _, peer in surplus} == {"p2"} and len(surplus) == 3
    # p2 answers again: its old copies are released, and nothing of it is placed any more.
    world.health.answers["p2"] = ()
    world.down, world.after = (), 0
    summary = world.run()
    assert summary["released"] == 3 and world.state.surplus() == []
    assert world.health.unpinned == [("p2", [cid for cid, _ in surplus])]


def test_rebalance_spreads_a_doubled_segment_when_a_domain_is_free(world):
    # Segment 0 as a weak placement left it: two fragments on p1.
    rows = world.state.placements(world.cid)
    seg0 = [r for r in rows if r.segment == 0]
    doubled = next(r for r in seg0 if r.peer == "p3")
    world.state.move_placement(world.cid, 0, doubled.fragment, "p1")
    summary = world.run()
    assert [(m["segment"], m["from"]) for m in summary["rebalanced"]] == [(0, "p1")]
    after = [r.peer for r in world.state.placements(world.cid) if r.segment == 0]
    assert len(set(after)) == 4 and after.count("p1") == 1
    assert world.state.surplus() == [] or {p for _, p in world.state.surplus()} == {"p1"}


def test_a_fragment_that_failed_its_audit_is_rebuilt_elsewhere(world):
    """The holder still answers health checks: only the audit's verdict makes it lost. The
    rebuilt copy goes to a node that holds none of the segment, never back to that holder,
    with the new holder's receipt; the old copy is released."""
    row = next(r for r in world.state.placements(world.cid) if r.peer == "p2")
    assert world.state.mark_lost(row.cid, "p2", "failed audit: block missing") == 1
    status_row = next(r for r in world.state.placements(world.cid) if r.cid == row.cid)
    assert status_row.lost == "failed audit: block missing"
    summary = world.run()
    assert summary["replaced"] == ["p2"] and summary["unreachable"] == []
    assert [(m["segment"], m["fragment"], m["from"]) for m in summary["repaired"]] == [
        (row.segment, row.fragment, "p2")
    ]
    moved = next(r for r in world.state.placements(world.cid) if r.cid == row.cid)
    assert moved.peer in ("p4", "p5") and moved.lost is None
    assert moved.receipt == f"receipt from {moved.peer}"
    # p2 answers, so its copy is released in the same pass.
    assert summary["released"] == 1 and world.health.unpinned == [("p2", [row.cid])]
    # p2's other fragments still count: only the one that failed moved.
    assert sum(r.peer == "p2" for r in world.state.placements(world.cid)) == 2


def test_distrusted_holders_get_no_rebuilt_fragments(world):
    for _ in range(2):  # two failed audits: p4's score falls under DISTRUST_BELOW
        world.state.update_score("p4", False, FORGET)
    world.down, world.after = ("p2",), 601
    summary = world.run()
    assert summary["failed"] == [] and len(summary["repaired"]) == 3
    assert {h for h, _ in world.placer.placed} == {"p5"}
