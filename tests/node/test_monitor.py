"""Peer liveness without a network: health answers recorded, away after the threshold,
known peers redialled (node/monitor.py, on in-memory fakes and a real SQLite state)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fusenode.node.aio import AsyncBlocks, Bridge
from fusenode.node.context import NodeContext
from fusenode.node.monitor import AddressPolicy, PeerMonitor
from fusenode.node.protocol import Health, PeerList, PeerUnreachable
from fusenode.node.state import State
from tests.support.fakes import FakeBackend, FakeHealth


class Swarm(FakeBackend):
    """A backend whose connected peers and dials the test controls."""

    def __init__(self) -> None:
        super().__init__()
        self.connected: list[str] = []
        self.dialled: list[str] = []
        self.reachable: set[str] = set()

    def peers(self) -> list[str]:
        return list(self.connected)

    def connect(self, multiaddr: str, timeout: float) -> None:
        self.dialled.append(multiaddr)
        if multiaddr not in self.reachable:
            raise PeerUnreachable(f"cannot dial {multiaddr}")
        self.connected.append(multiaddr.rsplit("/", 1)[1])


@pytest.fixture
def state(tmp_path):
    s = State(tmp_path / "state.db")
    yield s
    s.close()


def monitor(state, swarm, health, now):
    ctx = NodeContext("self", AsyncBlocks(swarm, Bridge()), state, Path("/nonexistent"))
    return PeerMonitor(ctx, health, unreachable_after=600, clock=now)


def test_health_answers_and_failures_are_recorded(state):
    async def scenario():
        swarm = Swarm()
        swarm.connected = ["up", "down"]
        health = FakeHealth({"up": ("/ip4/127.0.0.1/tcp/1/p2p/up",)})
        m = monitor(state, swarm, health, lambda: datetime.now(UTC))
        assert await m.live_peers() == ["up"]
        assert state.peer("up").multiaddrs() == ["/ip4/127.0.0.1/tcp/1/p2p/up"]
        assert state.peer("up").last_error is None
        assert "did not answer" in state.peer("down").last_error
        assert state.peer("down").last_seen is None

    asyncio.run(scenario())


def test_away_only_after_unreachable_after(state):
    async def scenario():
        health = FakeHealth({"a": (), "b": (), "c": ()})
        now = datetime.now(UTC)
        clock = [now]
        m = monitor(state, Swarm(), health, lambda: clock[0])
        await m.check(["a", "b", "c"])  # all answer once: seen now
        health.answers.pop("a")
        health.answers.pop("b")
        answers = await m.check(["a", "b", "c", "never"])
        assert answers == {"a": False, "b": False, "c": True, "never": False}
        assert m.away(answers) == ["never"]  # a and b were seen a moment ago
        clock[0] = now + timedelta(seconds=599)
        assert m.away(answers) == ["never"]
        clock[0] = now + timedelta(seconds=601)
        assert m.away(answers) == ["a", "b", "never"]

    asyncio.run(scenario())


def test_keep_connected_learns_addresses_and_redials_known_peers(state):
    async def scenario():
        swarm = Swarm()
        swarm.connected = ["fresh"]
        health = FakeHealth({"fresh": ("/ip4/127.0.0.1/tcp/9/p2p/fresh",)})
        state.peer_answered(
            "gone", ["/ip4/127.0.0.1/tcp/7/p2p/gone", "/ip4/127.0.0.1/tcp/8/p2p/gone"]
        )
        swarm.reachable = {"/ip4/127.0.0.1/tcp/8/p2p/gone"}
        m = monitor(state, swarm, health, lambda: datetime.now(UTC))
        stop = asyncio.Event()
        task = asyncio.create_task(m.keep_connected(stop, every=0.01))
        for _ in range(200):
            if "gone" in swarm.connected:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task
        # The fresh peer's addresses were learned; the gone one redialled, second address.
        assert state.peer("fresh").multiaddrs() == ["/ip4/127.0.0.1/tcp/9/p2p/fresh"]
        assert swarm.dialled[:2] == [
            "/ip4/127.0.0.1/tcp/7/p2p/gone",
            "/ip4/127.0.0.1/tcp/8/p2p/gone",
        ]
        assert "gone" in swarm.connected

    asyncio.run(scenario())


def test_report_lists_known_and_connected_peers(state):
    async def scenario():
        swarm = Swarm()
        swarm.connected = ["ipfs-only", "node"]
        state.peer_answered("offline")
        m = monitor(state, swarm, FakeHealth({"node": ()}), lambda: datetime.now(UTC))
        report = {p["peer_id"]: p for p in await m.report()}
        assert set(report) == {"ipfs-only", "node", "offline"}
        assert report["node"]["fusenode"] and report["node"]["connected"]
        assert report["ipfs-only"]["connected"] and not report["ipfs-only"]["fusenode"]
        assert not report["offline"]["connected"] and report["offline"]["last_seen"]

    asyncio.run(scenario())


def test_health_reply_parsing_keeps_only_strings():
    assert Health.parse({"peer_id": "p", "addresses": ["/a", 3, None]}) == Health("p", ("/a",))
    assert Health.parse(b"{}") == Health("", ())


def test_address_policy_keeps_what_this_node_could_dial():
    peer = "QmPeer"
    offered = [
        f"/ip4/127.0.0.1/tcp/1/p2p/{peer}",
        f"/ip4/10.0.0.5/tcp/4001/p2p/{peer}",
        f"/ip4/192.168.1.5/tcp/4001/p2p/{peer}",
        "/ip4/10.0.0.5/tcp/4001/p2p/QmSomeoneElse",  # names another peer
        f"/ip4/0.0.0.0/tcp/4001/p2p/{peer}",
        f"/ip6/fe80::1/tcp/4001/p2p/{peer}",
        f"/ip4/10.0.0.5/udp/4001/quic/p2p/{peer}",
        f"/dns4/node.example/tcp/4001/p2p/{peer}",
        "garbage",
    ]
    on_loopback = AddressPolicy(loopback=True)
    assert on_loopback.usable(peer, offered) == [f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"]
    off = AddressPolicy(loopback=False, deny=["192.168.0.0/16"])
    assert off.usable(peer, offered) == [
        f"/ip4/10.0.0.5/tcp/4001/p2p/{peer}",
        f"/dns4/node.example/tcp/4001/p2p/{peer}",
    ]
    many = [f"/ip4/10.0.0.{i}/tcp/4001/p2p/{peer}" for i in range(1, 30)]
    assert len(off.usable(peer, many)) == 8  # bounded


def test_peer_exchange_learns_and_dials_the_peers_others_know(state):
    async def scenario():
        swarm = Swarm()
        swarm.connected = ["boot"]
        health = FakeHealth({"boot": ("/ip4/127.0.0.1/tcp/1/p2p/boot",), "far": ()})
        health.lists["boot"] = [
            Health("far", ("/ip4/127.0.0.1/tcp/2/p2p/far",)),
            Health("self", ("/ip4/127.0.0.1/tcp/3/p2p/self",)),  # ourselves: ignored
            Health("liar", ("/ip4/127.0.0.1/tcp/4/p2p/someone",)),  # no usable address
        ]
        swarm.reachable = {"/ip4/127.0.0.1/tcp/2/p2p/far"}
        m = monitor(state, swarm, health, lambda: datetime.now(UTC))
        live = await m.discover()
        assert live == ["boot", "far"]
        assert state.peer("far").multiaddrs() == ["/ip4/127.0.0.1/tcp/2/p2p/far"]
        assert state.peer("self") is None and state.peer("liar") is None
        assert "far" in swarm.connected

    asyncio.run(scenario())


def test_peer_lists_are_bounded_when_read():
    items = [{"peer_id": f"p{i}", "addresses": ["/a"] * 20} for i in range(100)]
    items.append({"peer_id": "x" * 500, "addresses": []})
    parsed = PeerList.parse({"peers": items})
    assert len(parsed.peers) == 64 and all(len(p.addresses) == 8 for p in parsed.peers)
    assert PeerList.parse(b'{"peers": "no"}') == PeerList(())
