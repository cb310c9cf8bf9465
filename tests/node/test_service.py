"""The use cases on in-memory fakes: put places on the allocator's nodes and records it, get
and status read it back, refusals come before the network is asked (node/service.py)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fusenode.node.aio import AsyncBlocks, Bridge
from fusenode.node.config import Config, PlacementSection, StorageSection
from fusenode.node.context import NodeContext
from fusenode.node.errors import PlacementError
from fusenode.node.network import Offline
from fusenode.node.optimizer import Optimizer
from fusenode.node.placement import Placed
from fusenode.node.protocol import PeerOverCapacity, PeerUnreachable
from fusenode.node.repo import Repo, identity_text, write_private
from fusenode.node.service import NodeService
from fusenode.node.state import State
from fusenode.storage import age
from fusenode.storage.errors import HeaderError, InvalidArgument
from tests.support.fakes import FakeBackend

SELF = "self"
CID = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"


class FakeNetwork:
    """Peers that all store into one in-memory backend; records what the use cases ask."""

    networked = True

    def __init__(self, backend: FakeBackend, peers: list[str]) -> None:
        self.backend = backend
        self.peers = peers
        self.asked_live = 0
        self.placed: list[tuple[str, str]] = []
        self.pinned: list[tuple[list[str], list[str]]] = []
        self.announced: list[tuple[str, str, bool]] = []
        self.full: set[str] = set()  # peers that refuse to hold more (507)
        self.hostile: set[str] = set()  # peers that never answer a store
        self.fail_after: int | None = None  # the put breaks after this many placements
        self.state: State | None = None

    async def live_peers(self) -> list[str]:
        self.asked_live += 1
        return list(self.peers)

    async def discover(self) -> list[str]:
        self.discovered = getattr(self, "discovered", 0) + 1
        return list(self.peers)

    async def holders(self, cids: list[str]) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for holder, cid in self.placed:
            found.setdefault(cid, set()).add(holder)
        return found

    async def place(self, holder: str, path: Path, cid: str | None = None) -> Placed:
        if holder in self.full:
            raise PeerOverCapacity(f"peer {holder} refused: full (HTTP 507)")
        if holder in self.hostile:
            raise PeerUnreachable(f"peer {holder} did not answer")
        if self.fail_after is not None and len(self.placed) >= self.fail_after:
            raise OSError("the disk of this node failed")
        added = self.backend.add(path)
        self.placed.append((holder, added))
        if holder == SELF and self.state is not None:
            self.state.hold([added], SELF)
        return Placed(added, None if holder == SELF else f"receipt from {holder}")

    async def read_small_file(self, cid: str, max_size: int) -> bytes | None:
        return None

    async def distribute(self, peers: list[str], cid: str, data: bytes) -> None:
        self.pinned.append((list(peers), [cid]))

    async def announce(self, cid: str, kind: str, encrypted: bool) -> None:
        self.announced.append((cid, kind, encrypted))

    async def report(self) -> list[dict[str, Any]]:
        return []


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    (tmp_path / "tmp").mkdir()
    write_private(tmp_path / "identity.txt", identity_text(age.X25519Identity.generate()))
    config = Config(
        storage=StorageSection(segment_size=4096), placement=PlacementSection(allow_weak=False)
    )
    return Repo(tmp_path, config)


def run(repo: Repo, network_for: Any, scenario: Any) -> Any:
    async def main() -> Any:
        backend = FakeBackend()
        state = State(repo.files.state)
        ctx = NodeContext(SELF, AsyncBlocks(backend, Bridge()), state, repo.files.tmp)
        network = network_for(backend, ctx)
        try:
            return await scenario(NodeService(repo, ctx, network), network, state)
        finally:
            state.close()

    return asyncio.run(main())


def model(repo: Repo, size: int = 10_000) -> Path:
    path = repo.path / "model.onnx"
    path.write_bytes(os.urandom(size))
    return path


def test_put_places_distinctly_records_and_reads_back(repo: Repo) -> None:
    src = model(repo)

    async def scenario(service, network, state):
        reply = await service.put(str(src), None, None, [], False)
        assert reply["placement"] == "distinct" and (reply["k"], reply["n"]) == (4, 6)
        segments = reply["segments"]
        assert segments == 3 and reply["size"] == 10_000 and reply["encrypted"]
        # Each segment's six fragments on six distinct nodes, every node used evenly.
        rows = state.placements(reply["cid"])
        per_segment = Counter((r.segment, r.peer) for r in rows)
        assert max(per_segment.values()) == 1 and len(rows) == 6 * segments
        assert Counter(r.peer for r in rows) == {p: segments for p in (SELF, *network.peers)}
        assert reply["holders"] == {p: segments for p in (SELF, *network.peers)}
        # The manifest went to every holder; the put was announced.
        assert network.pinned == [(sorted((SELF, *network.peers)), [reply["cid"]])]
        assert network.announced == [(reply["cid"], "stored", True)]
        status = await service.status(reply["cid"])
        assert status["healthy"] and status["owner"]
        assert all(seg["distinct"] for seg in status["segments"])
        got = await service.get(reply["cid"], str(repo.path / "out"), None)
        assert (repo.path / "out").read_bytes() == src.read_bytes()
        assert got["size"] == 10_000 and got["name"] == "model.onnx"

    run(repo, lambda backend, ctx: FakeNetwork(backend, ["p1", "p2", "p3", "p4", "p5"]), scenario)


def test_a_full_holder_is_passed_over(repo: Repo) -> None:
    """A holder that refuses for lack of room gets no fragment; with a spare node the put
    stays distinct, and the holders' receipts are kept with the placement."""
    src = model(repo)

    async def scenario(service, network, state):
        network.full = {"p2"}
        reply = await service.put(str(src), None, None, [], False)
        assert reply["placement"] == "distinct" and "p2" not in reply["holders"]
        rows = state.placements(reply["cid"])
        assert max(Counter((r.segment, r.peer) for r in rows).values()) == 1
        assert all(r.receipt == f"receipt from {r.peer}" for r in rows if r.peer != SELF)
        assert all(r.receipt is None for r in rows if r.peer == SELF)

    peers = ["p1", "p2", "p3", "p4", "p5", "p6"]  # 7 nodes for n = 6
    run(repo, lambda backend, ctx: FakeNetwork(backend, peers), scenario)


def test_when_only_doubling_up_is_left_the_put_says_weak(repo: Repo) -> None:
    src = model(repo)

    async def scenario(service, network, state):
        network.full = {"p1"}
        reply = await service.put(str(src), None, None, [], False)
        assert reply["placement"] == "weak" and "p1" not in reply["holders"]
        assert sum(reply["holders"].values()) == 6 * reply["segments"]
        assert state.model(reply["cid"])[4] == "weak"
        network.full = {"p1", "p2", "p3", "p4", "p5"}  # only this node has room
        reply = await service.put(str(src), None, None, [], False)
        assert reply["holders"] == {SELF: 6 * reply["segments"]}

    run(repo, lambda backend, ctx: FakeNetwork(backend, ["p1", "p2", "p3", "p4", "p5"]), scenario)


def test_a_peer_that_fails_every_store_cannot_stop_a_put(repo: Repo) -> None:
    """Not only a full holder: one that errs or stays silent is passed over too, and what it
    may have stored anyway is released once it answers (the surplus rule)."""
    src = model(repo)

    async def scenario(service, network, state):
        network.hostile = {"p3"}
        reply = await service.put(str(src), None, None, [], False)
        assert reply["placement"] == "distinct" and "p3" not in reply["holders"]
        surplus = state.surplus()
        assert surplus and {peer for _, peer in surplus} == {"p3"}

    peers = ["p1", "p2", "p3", "p4", "p5", "p6"]
    run(repo, lambda backend, ctx: FakeNetwork(backend, peers), scenario)


def test_a_failed_put_releases_what_it_placed(repo: Repo) -> None:
    src = model(repo)

    async def scenario(service, network, state):
        network.fail_after = 8
        with pytest.raises(OSError, match="disk"):
            await service.put(str(src), None, None, [], False)
        placed = network.placed
        assert len(placed) == 8 and state.placements() == []  # nothing published
        remote = {(cid, h) for h, cid in placed if h != SELF}
        assert set(state.surplus()) == remote  # released by those peers when they answer
        ours = [cid for h, cid in placed if h == SELF]
        assert ours and state.held(ours) == set()  # ours: at once

    def network_for(backend, ctx):
        network = FakeNetwork(backend, ["p1", "p2", "p3", "p4", "p5"])
        network.state = ctx.state  # holds this node's own fragments, as the Placer does
        return network

    run(repo, network_for, scenario)


def test_too_few_nodes_refuse_before_anything_is_stored(repo: Repo) -> None:
    src = model(repo)

    async def scenario(service, network, state):
        with pytest.raises(PlacementError, match="allow_weak"):
            await service.put(str(src), 2, 4, [], False)
        assert network.placed == [] and network.announced == []
        assert state.placements() == []

    run(repo, lambda backend, ctx: FakeNetwork(backend, ["p1", "p2"]), scenario)


def test_too_few_trusted_nodes_name_the_distrusted_ones(repo: Repo) -> None:
    src = model(repo)

    async def scenario(service, network, state):
        for _ in range(10):
            state.update_score("p2", passed=False, forget=0.5)  # audits failed there
        with pytest.raises(PlacementError, match=r"distrusted after failed audits \(p2\)"):
            await service.put(str(src), 2, 4, [], False)
        assert network.placed == []

    run(repo, lambda backend, ctx: FakeNetwork(backend, ["p1", "p2", "p3"]), scenario)


@pytest.mark.parametrize(
    ("path", "k", "n", "recipients", "error", "message"),
    [
        ("missing.onnx", None, None, [], InvalidArgument, "no such file"),
        (".", None, None, [], InvalidArgument, "directory"),
        ("model.onnx", 4, 4, [], InvalidArgument, "1 <= k < n"),
        ("model.onnx", None, None, ["age1notarecipient"], HeaderError, "invalid age recipient"),
    ],
)
def test_refusals_come_before_the_network_is_asked(repo, path, k, n, recipients, error, message):
    model(repo)

    async def scenario(service, network, state):
        with pytest.raises(error, match=message):
            await service.put(str(repo.path / path), k, n, recipients, False)
        assert network.asked_live == 0 and network.placed == []

    run(repo, lambda backend, ctx: FakeNetwork(backend, []), scenario)


def _pq() -> str:
    return age.MLKEM768X25519Identity.generate().recipient.to_string()


def test_recipients_put_cannot_use_are_refused_before_the_network_is_asked(repo: Repo) -> None:
    """A post-quantum + classic mix, or more keys than a manifest's 64 KiB header holds, is
    refused by the put (and by an optimize request) before any placement or queueing."""
    model(repo)
    classic = age.X25519Identity.generate().recipient.to_string()
    many = [_pq() for _ in range(50)]

    async def scenario(service, network, state):
        for recipients, message in (([_pq(), classic], "cannot share a model"), (many, "at most")):
            with pytest.raises(InvalidArgument, match=message):
                await service.put(str(repo.path / "model.onnx"), None, None, recipients, False)
            assert network.asked_live == 0 and network.placed == []
            with pytest.raises(InvalidArgument, match=message):
                await Optimizer(service, None).submit(CID, recipients)
            assert state.jobs() == []
        job = await Optimizer(service, None).submit(CID, many[:2])  # what fits is queued
        assert state.jobs() == [job]

    run(repo, lambda backend, ctx: FakeNetwork(backend, []), scenario)


def test_without_a_network_everything_stays_here(repo: Repo) -> None:
    src = model(repo, 5000)
    reader = age.X25519Identity.generate()

    async def scenario(service, network, state):
        recipient = reader.recipient.to_string()
        reply = await service.put(str(src), 2, 3, [recipient], False)
        assert reply["placement"] == "local" and reply["holders"] == {SELF: 3 * reply["segments"]}
        rows = state.placements(reply["cid"])
        assert {r.peer for r in rows} == {SELF}
        assert state.held([r.cid for r in rows]) == {r.cid for r in rows}
        key = repo.path / "reader.txt"
        write_private(key, identity_text(reader))
        await service.get(reply["cid"], str(repo.path / "o"), str(key))
        assert (repo.path / "o").read_bytes() == src.read_bytes()
        info = await service.info(reply["cid"], str(key))
        assert info["readable"] and info["metadata"]["recipients"] == [recipient]
        assert (await service.info(reply["cid"], None))["readable"] is False  # not the node's

    run(repo, lambda backend, ctx: Offline(ctx), scenario)


def test_a_put_looks_for_more_peers_before_it_gives_up(repo: Repo) -> None:
    """A node that just joined may know one peer: the put asks the network (peer exchange)
    for the rest before refusing."""
    src = model(repo)

    class Joining(FakeNetwork):
        async def live_peers(self) -> list[str]:
            return ["p1"]  # only the bootstrap peer so far

    async def scenario(service, network, state):
        reply = await service.put(str(src), 2, 4, [], False)
        assert reply["placement"] == "distinct" and network.discovered == 1
        assert len({r.peer for r in state.placements(reply["cid"])}) == 4

    run(repo, lambda backend, ctx: Joining(backend, ["p1", "p2", "p3"]), scenario)
