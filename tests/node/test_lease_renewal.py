"""The owner's side of leases (`fusenode.node.leases`) on a real state database and a fake
peer client: one renewal per holder with what still counts there and the manifests this node
keeps; a fragment its holder no longer holds is marked lost (repair rebuilds it)."""

from __future__ import annotations

import asyncio

from fusenode import defaults
from fusenode.node.context import NodeContext
from fusenode.node.leases import Leases
from fusenode.node.protocol import PeerUnreachable
from fusenode.node.state import State

ME = "12D3KooWMe"


class FakeClient:
    def __init__(self, holds: dict[str, set[str]], down: set[str]) -> None:
        self.holds, self.down = holds, down
        self.asked: dict[str, list[str]] = {}
        self.leases: dict[str, float] = {}

    async def renew(self, peer: str, cids: list[str]) -> tuple[set[str], float | None]:
        self.asked[peer] = cids
        if peer in self.down:
            raise PeerUnreachable(f"peer {peer} did not answer")
        return self.holds.get(peer, set()) & set(cids), self.leases.get(peer)


def test_renewals_are_batched_per_holder_and_missing_fragments_marked_lost(tmp_path):
    state = State(tmp_path / "s.db")
    placements = [(0, 0, "QmF0", ME), (0, 1, "QmF1", "bob"), (0, 2, "QmF2", "carol")]
    placements += [(1, 0, "QmG0", "bob"), (1, 1, "QmG1", "dave"), (1, 2, "QmG2", "carol")]
    state.record_model("QmM", 2, 3, 2, "distinct", placements)
    state.hold(["QmM", "QmF0"], ME)
    state.mark_lost("QmG2", "carol", "failed audit")  # no longer counts: not renewed
    client = FakeClient({"bob": {"QmF1", "QmM"}, "carol": {"QmF2", "QmM"}}, down={"dave"})
    ctx = NodeContext(ME, None, state, tmp_path)  # type: ignore[arg-type]
    leases = Leases(ctx, client, None, lease_days=30)  # type: ignore[arg-type]

    assert leases.wanted() == {
        "bob": ["QmF1", "QmG0", "QmM"],
        "carol": ["QmF2", "QmM"],
        "dave": ["QmG1", "QmM"],
    }
    summary = asyncio.run(leases.renew())
    assert set(client.asked) == {"bob", "carol", "dave"}
    assert summary["unanswered"] == ["dave"] and summary["holders"] == 2
    assert summary["renewed"] == 4 and summary["missing"] == 1
    lost = {(p.cid, p.peer): p.lost for p in state.placements("QmM")}
    assert lost[("QmG0", "bob")] and "lease renewal" in lost[("QmG0", "bob")]
    assert lost[("QmG1", "dave")] is None  # no answer is not a "no longer held"
    assert leases.interval == 6 * 3600.0  # passes at least every 6 h
    assert Leases(ctx, client, None, lease_days=0.0002).interval == 0.0002 * 86400 / 4  # type: ignore[arg-type]
    state.close()


def test_a_holder_with_a_shorter_lease_is_renewed_in_time(tmp_path):
    """Holders say how long they keep a hold; an owner renews a shorter-lease holder at a
    quarter of that lease, but a peer claiming a tiny lease cannot make it spin."""
    state = State(tmp_path / "s.db")
    state.record_model("QmM", 1, 2, 1, "distinct", [(0, 0, "QmF0", "bob"), (0, 1, "QmF1", "carol")])
    client = FakeClient({"bob": {"QmF0"}, "carol": {"QmF1"}}, down=set())
    ctx = NodeContext(ME, None, state, tmp_path)  # type: ignore[arg-type]
    leases = Leases(ctx, client, None, lease_days=30)  # type: ignore[arg-type]
    assert leases.interval == 6 * 3600.0
    client.leases = {"bob": 3600.0}  # bob keeps a hold an hour without renewal
    asyncio.run(leases.renew())
    assert leases.interval == 900.0
    client.leases = {"bob": 3600.0, "carol": 1.0}  # carol claims one second
    asyncio.run(leases.renew())
    assert leases.interval == defaults.LEASE_PEER_FLOOR == 60.0
    client.leases = {}  # they stopped saying: our own interval again
    asyncio.run(leases.renew())
    assert leases.interval == 6 * 3600.0
    state.close()
