"""Audits against a real blockstore standing in for a holder: intact fragments pass, missing,
corrupt or unanswered ones fail and are marked lost, a holder that does not answer health
checks is left to liveness (node/auditor.py). Real daemons: tests/node/test_hostile.py."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from fusenode.node.aio import AsyncBlocks, Bridge
from fusenode.node.auditor import DISTRUST_BELOW, UNANSWERED_FAIL, Auditor, distrusted
from fusenode.node.context import NodeContext
from fusenode.node.protocol import Health, PeerUnreachable
from fusenode.node.repo import Repo
from fusenode.node.state import State
from fusenode.storage.unixfs import CHUNK_SIZE, parse_dag_node

SELF = "self"
HOLDER = "holder"


class HolderClient:
    """The peer client as an auditor uses it, answered from a real Kubo blockstore."""

    def __init__(self, kubo: Any) -> None:
        self.kubo = kubo
        self.down = False  # health checks fail
        self.mute = False  # block requests get no answer
        self.asked: list[str] = []

    async def health(self, peer: str, timeout: float = 3.0) -> Health:
        if self.down:
            raise PeerUnreachable("down")
        return Health(peer, ())

    async def block(self, peer: str, cid: str, timeout: float = 10.0) -> bytes | None:
        self.asked.append(cid)
        if self.mute:
            raise PeerUnreachable("no answer")
        return self.kubo.read_block(cid)


@pytest.fixture
def world(tmp_path: Path):
    repo = Repo.init(tmp_path / "holder")
    state = State(tmp_path / "state.db")
    with repo.open_backend() as kubo:
        fragments = []
        for size in (1000, CHUNK_SIZE * 5 + 7):  # one block; a root and six leaves
            path = tmp_path / f"f{size}"
            path.write_bytes(os.urandom(size))
            fragments.append(kubo.add(path))
        rows = [(0, i, cid, HOLDER) for i, cid in enumerate(fragments)]
        state.record_model("QmModel", 1, 2, 1, "distinct", rows)
        yield kubo, state, fragments
    state.close()


class Offset:
    """Stands in for the auditor's randomness: the byte offset to check is ours to say."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def randrange(self, n: int) -> int:
        return min(self.offset, n - 1)


def _audit(kubo: Any, state: State, client: HolderClient, offset: int | None = None) -> dict:
    async def main() -> dict:
        bridge = Bridge()
        ctx = NodeContext(SELF, AsyncBlocks(kubo, bridge), state, Path("/nonexistent"))
        auditor = Auditor(ctx, client, timeout=2.0)  # type: ignore[arg-type]
        if offset is not None:
            auditor._random = Offset(offset)  # type: ignore[assignment]
        try:
            return await auditor.run()
        finally:
            bridge.close()

    return asyncio.run(main())


def test_intact_fragments_pass(world) -> None:
    kubo, state, (small, big) = world
    client = HolderClient(kubo)
    summary = _audit(kubo, state, client)
    assert summary["audited"] == summary["passed"] == 2 and summary["failed"] == []
    # The big one: its root, then one leaf (the path to a random byte).
    assert client.asked.count(big) == 1 and len(client.asked) == 3
    leaf = client.asked[-1] if client.asked[-1] != small else client.asked[1]
    assert leaf in parse_dag_node(kubo.read_block(big)).links
    audits = state.audits()
    assert {audits[(c, HOLDER)]["result"] for c in (small, big)} == {"passed"}
    assert state.scores()[HOLDER]["score"] == 1.0 and distrusted(state) == set()
    assert all(p.lost is None for p in state.placements())


def test_deleted_blocks_fail_the_audit_and_mark_the_fragment_lost(world) -> None:
    kubo, state, (small, big) = world
    for leaf in parse_dag_node(kubo.read_block(big)).links:
        kubo._block_path(leaf).unlink()  # the holder's disk lost the leaves, not the root
    summary = _audit(kubo, state, HolderClient(kubo))
    assert summary["passed"] == 1
    [failure] = summary["failed"]
    assert failure["cid"] == big and "missing on the holder" in failure["detail"]
    lost = {p.cid: p.lost for p in state.placements()}
    assert lost[small] is None and "failed audit" in lost[big]
    assert state.audits()[(big, HOLDER)]["result"] == "failed"
    assert state.scores()[HOLDER]["score"] < DISTRUST_BELOW
    assert distrusted(state) == {HOLDER}
    # A fragment already lost is not audited again.
    assert _audit(kubo, state, HolderClient(kubo))["audited"] == 1


def test_a_corrupt_block_fails_the_audit(world) -> None:
    kubo, state, (small, _big) = world
    path = kubo._block_path(small)
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    summary = _audit(kubo, state, HolderClient(kubo))
    [failure] = summary["failed"]
    assert failure["cid"] == small and "corrupt" in failure["detail"]


def test_audits_left_unanswered_while_health_answers_fail(world) -> None:
    kubo, state, _ = world
    client = HolderClient(kubo)
    client.mute = True
    for _ in range(UNANSWERED_FAIL - 1):
        summary = _audit(kubo, state, client)
        assert summary["failed"] == [] and len(summary["unanswered"]) == 2
        assert all(p.lost is None for p in state.placements())
    summary = _audit(kubo, state, client)
    assert len(summary["failed"]) == 2
    assert all("unanswered" in f["detail"] for f in summary["failed"])


def test_a_holder_that_is_down_is_left_to_liveness(world) -> None:
    kubo, state, _ = world
    client = HolderClient(kubo)
    client.down = True
    for _ in range(UNANSWERED_FAIL + 1):
        summary = _audit(kubo, state, client)
        assert summary["skipped"] == [HOLDER] and summary["audited"] == 0
    assert client.asked == [] and state.audits() == {}
    assert all(p.lost is None for p in state.placements())


@pytest.mark.parametrize("leaf", [0, 1, 4, 5])
def test_the_walk_goes_to_the_leaf_holding_the_random_byte(world, leaf) -> None:
    kubo, state, (_small, big) = world
    links = parse_dag_node(kubo.read_block(big)).links
    assert len(links) == 6  # five full chunks and a 7-byte one
    client = HolderClient(kubo)
    offset = leaf * CHUNK_SIZE + (3 if leaf < 5 else 6)  # a byte inside that chunk
    assert _audit(kubo, state, client, offset)["passed"] == 2
    assert client.asked[client.asked.index(big) + 1] == links[leaf]


def test_a_holder_that_restarts_mid_audit_is_not_failed(world) -> None:
    """No answer to an audit, and then no answer to a health check: a restart (liveness's
    business), not a verdict, however often it happens."""
    kubo, state, _ = world

    class Restarting(HolderClient):
        async def block(self, peer, cid, timeout=10.0):
            self.down = True  # goes down while being audited
            raise PeerUnreachable("connection reset")

    for _ in range(UNANSWERED_FAIL + 1):
        summary = _audit(kubo, state, Restarting(kubo))
        assert summary["failed"] == [] and summary["skipped"] == [HOLDER]
    assert state.audits() == {} and all(p.lost is None for p in state.placements())


def test_a_fragment_moved_during_its_audit_is_not_held_against_the_old_holder(world) -> None:
    kubo, state, (small, _big) = world

    class Moving(HolderClient):
        async def block(self, peer, cid, timeout=10.0):
            if cid != small:
                return await super().block(peer, cid, timeout)
            row = next(p for p in state.placements() if p.cid == small)
            state.move_placement(row.manifest, row.segment, row.fragment, "elsewhere")
            return None  # the old holder released it: 404

    summary = _audit(kubo, state, Moving(kubo))
    assert summary["failed"] == [] and summary["passed"] == 1  # the other fragment
    assert state.scores()[HOLDER]["failed"] == 0
