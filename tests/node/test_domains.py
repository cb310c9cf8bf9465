"""Failure domains from recorded addresses (node/domains.py), and placement over them."""

from __future__ import annotations

import pytest

from fusenode.node.allocator import Allocator, SegmentAllocation
from fusenode.node.domains import domain_function
from fusenode.node.state import State


@pytest.fixture
def state(tmp_path):
    s = State(tmp_path / "state.db")
    s.peer_answered("a2", ["/ip4/10.0.0.1/tcp/4002/p2p/a2"])  # same machine as self
    s.peer_answered("b", ["/ip4/127.0.0.1/tcp/1/p2p/b", "/ip4/10.0.0.2/tcp/4001/p2p/b"])
    s.peer_answered("c", ["/ip4/10.0.1.3/tcp/4001/p2p/c"])
    s.peer_answered("d", ["/ip6/fd00::4/tcp/4001/p2p/d"])
    s.peer_answered("mute", [])
    yield s
    s.close()


OWN = ["/ip4/127.0.0.1/tcp/4001/p2p/self", "/ip4/10.0.0.1/tcp/4001/p2p/self"]


def test_modes(state):
    node = domain_function("node", False, "self", OWN, state)
    assert {node(p) for p in ("self", "a2", "b")} == {"self", "a2", "b"}
    ip = domain_function("ip", False, "self", OWN, state)
    assert ip("self") == ip("a2") == "10.0.0.1"  # loopback addresses never decide
    assert ip("b") == "10.0.0.2" and ip("d") == "fd00::4"
    assert ip("mute") == "node:mute" and ip("unknown") == "node:unknown"
    subnet = domain_function("subnet24", False, "self", OWN, state)
    assert subnet("self") == subnet("b") == "10.0.0.0/24" != subnet("c")
    assert subnet("d") == "fd00::/48"


def test_auto_is_node_on_loopback_and_ip_elsewhere(state):
    assert domain_function("auto", True, "self", OWN, state)("a2") == "a2"
    assert domain_function("auto", False, "self", OWN, state)("a2") == "10.0.0.1"


def test_two_nodes_on_one_machine_never_hold_two_fragments_of_a_segment(state):
    allocator = Allocator(domain_function("ip", False, "self", OWN, state))
    plan = allocator.plan("self", ["a2", "b", "c", "d"], 4, networked=True, allow_weak=False)
    alloc = SegmentAllocation(allocator, plan, 4)
    for s in range(8):
        holders = [alloc.holder(s, i) for i in range(4)]
        assert not {"self", "a2"} <= set(holders)  # one machine, one fragment
    with pytest.raises(Exception, match="distinct"):  # 4 machines cannot take 5 distinctly
        allocator.plan("self", ["a2", "b", "c", "d"], 5, networked=True, allow_weak=False)
