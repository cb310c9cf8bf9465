"""The peer network on real daemons (separate processes, 127.0.0.1 only).

One 6-node network is shared by the scenario tests below, which run in order: placement,
retrieval after SIGKILL of n-k nodes, repair, restart. A small 3-node network covers refusals.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from fusenode.node.localnet import LocalNetwork
from tests.support.cli import Cli, assert_ok, clean_env

pytestmark = pytest.mark.slow

FAST = {
    ("storage", "segment_size"): "262144",  # several segments from a small file
    ("storage", "fetch_timeout"): "10.0",
    ("repair", "interval"): "1.0",
    ("repair", "unreachable_after"): "3.0",
}


ok = assert_ok


def cid_of(proc) -> str:
    return ok(proc).stdout.strip().splitlines()[-1]


def status(net, i, cid) -> dict:
    return json.loads(ok(net.cli(i, "status", cid, "--json")).stdout)


@pytest.fixture(scope="module")
def net(network):
    return network(6, FAST)


@pytest.fixture(scope="module")
def stored(net, tmp_path_factory):
    src = tmp_path_factory.mktemp("data") / "model.onnx"
    src.write_bytes(os.urandom(700_000))  # 3 segments of 256 KiB
    cid = cid_of(net.cli(0, "put", str(src), "-k", "4", "-n", "6"))
    return src, cid


def test_peers_joined(net):
    deadline = time.monotonic() + 20
    while True:
        peers = json.loads(ok(net.cli(0, "peers", "--json")).stdout)
        connected = {p["peer_id"] for p in peers if p["connected"]}
        if connected >= {n.peer_id for n in net.nodes[1:]} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert connected >= {n.peer_id for n in net.nodes[1:]}


def test_placement_on_distinct_peers(net, stored):
    _, cid = stored
    st = status(net, 0, cid)
    assert st["healthy"] and st["owner"] and (st["k"], st["n"]) == (4, 6)
    assert len(st["segments"]) == 3
    everyone = {n.peer_id for n in net.nodes}
    for seg in st["segments"]:
        holders = [f["peer"] for f in seg["fragments"]]
        assert len(set(holders)) == 6 and set(holders) <= everyone
        assert all(f["answered"] for f in seg["fragments"])


def test_id_matches_daemon(net):
    info = json.loads(ok(net.cli(1, "id", "--json")).stdout)
    assert set(info) == {"peer_id", "addresses", "recipient"}
    assert info["peer_id"] == net.nodes[1].peer_id
    assert info["recipient"].startswith("age1")
    assert any(a.endswith("/p2p/" + info["peer_id"]) for a in info["addresses"])


def test_get_after_sigkill_of_n_minus_k_nodes(net, stored, tmp_path):
    src, cid = stored
    net.kill(4)
    net.kill(5)
    out = tmp_path / "out.onnx"
    identity = str(net.nodes[0].repo / "identity.txt")
    ok(net.cli(2, "get", cid, "-o", str(out), "--identity", identity))
    assert out.read_bytes() == src.read_bytes()


def test_repair_restores_redundancy(net, stored):
    _, cid = stored
    dead = {net.nodes[4].peer_id, net.nodes[5].peer_id}
    deadline = time.monotonic() + 60
    while True:
        st = status(net, 0, cid)
        holders = {f["peer"] for s in st["segments"] for f in s["fragments"]}
        if st["healthy"] and not holders & dead:
            break
        assert time.monotonic() < deadline, json.dumps(st, indent=1)
        time.sleep(1)
    for seg in st["segments"]:  # the 4 live nodes hold all 6 fragments: two nodes hold two
        assert all(f["answered"] for f in seg["fragments"])


def test_restart_keeps_state(net, stored, tmp_path):
    src, cid = stored
    net.kill(0, signal.SIGTERM)
    net.start_node(0)
    deadline = time.monotonic() + 30
    while True:  # node 0 has no bootstrap peers: it redials the peers it knew
        st = status(net, 0, cid)
        if st["healthy"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert st["owner"] and st["healthy"]
    out = tmp_path / "again.onnx"
    ok(net.cli(0, "get", cid, "-o", str(out)))
    assert out.read_bytes() == src.read_bytes()


# -- a small network: refusals and failures ----------------------------------------------------


@pytest.fixture(scope="module")
def small(network):
    return network(3, FAST)


def test_too_few_nodes_for_distinct_placement(small, tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(10_000))
    proc = small.cli(0, "put", str(src), "-k", "4", "-n", "6")
    assert proc.returncode == 7 and "Traceback" not in proc.stderr  # PlacementError
    assert "reachable node(s)" in proc.stderr and "allow_weak" in proc.stderr
    assert proc.stdout.strip() == ""  # no CID: nothing claims to be stored


def test_post_quantum_keys_through_the_daemons(small, tmp_path):
    """Issue 13's contract with daemons running: put to an age1pq1 recipient on one node
    (node 1: node 0 must have placed nothing, see the interrupted put below),
    get with the PQ identity on another, info without a key shows no size or name, and a
    share to a second PQ recipient opens with that key."""
    keys = {}
    for who in ("alice", "bob"):
        path = tmp_path / f"{who}.txt"
        recipient = Cli().ok("keygen", "--pq", "-o", path).stdout.strip().splitlines()[-1]
        assert recipient.startswith("age1pq1")
        keys[who] = (path, recipient)
    src = tmp_path / "secret-model.onnx"
    src.write_bytes(os.urandom(300_000))
    cid = cid_of(
        small.cli(1, "put", str(src), "-k", "2", "-n", "3", "--recipient", keys["alice"][1])
    )
    out = tmp_path / "out"
    proc = small.cli(2, "get", cid, "-o", str(out))  # node 2's own key is not a recipient
    assert proc.returncode != 0 and "no identity matches" in proc.stderr and not out.exists()
    ok(small.cli(2, "get", cid, "-o", str(out), "--identity", str(keys["alice"][0])))
    assert out.read_bytes() == src.read_bytes()
    info = json.loads(ok(small.cli(0, "info", cid, "--json")).stdout)
    assert info["encrypted"] and info["size_hidden"] and info["metadata"] is None
    assert info["payload_size"] > 300_000 and "300000" not in json.dumps(info)
    assert src.name not in json.dumps(info)
    shared = cid_of(
        small.cli(
            1, "share", cid, "--recipient", keys["bob"][1], "--identity", str(keys["alice"][0])
        )
    )
    out2 = tmp_path / "out2"
    ok(small.cli(1, "get", shared, "-o", str(out2), "--identity", str(keys["bob"][0])))
    assert out2.read_bytes() == src.read_bytes()


def _request(url, method="GET", body=None, token=None, content_type="application/json"):
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_unauthenticated_and_malformed_requests(small, tmp_path):
    api = small.nodes[1].api_url + "/api/v1"
    token = (small.nodes[1].repo / "api.token").read_text().strip()
    body = json.dumps({"path": str(tmp_path / "x")}).encode()
    for bad in (None, "wrong-token"):
        code, reply = _request(api + "/put", "POST", body, token=bad)
        assert code == 401 and "error" in reply
    for payload in (b"{", b"[]", b'{"path": 3}', b'{"path": "/x", "bogus": 1}'):
        code, reply = _request(api + "/put", "POST", payload, token=token)
        assert code == 400 and reply["error"]["message"]
    code, _ = _request(api + "/put", "POST", b"x" * (2 << 20), token=token)
    assert code == 413
    code, reply = _request(api + "/status/not-a-cid")
    assert 400 <= code < 500 and "error" in reply
    assert _request(api + "/health")[0] == 200  # still serving
    code, doc = _request(api + "/openapi.json")
    assert code == 200 and "/put" in json.dumps(doc["paths"])


def _held_rows(node) -> int:
    db = sqlite3.connect(node.repo / "state.db", timeout=10)
    try:
        return int(db.execute("SELECT COUNT(*) FROM held").fetchone()[0])
    finally:
        db.close()


def test_interrupted_put_publishes_nothing(small, tmp_path):
    """Kill the placing daemon mid-put: no manifest, no model in its state after restart.

    Mid-put for sure, whatever the machine's speed: five segments, and the kill comes as
    soon as a peer has confirmed holding the first fragment (a row in its ``held`` table).
    """
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(5 * 64 << 20))
    before = [_held_rows(node) for node in small.nodes[1:]]
    env = clean_env()
    put = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fusenode.node.cli",
            "put",
            str(src),
            "-k",
            "2",
            "-n",
            "3",
            "--repo",
            str(small.nodes[0].repo),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 60
    while [_held_rows(node) for node in small.nodes[1:]] == before:
        assert put.poll() is None and time.monotonic() < deadline, "no fragment was placed"
        time.sleep(0.02)
    small.kill(0)  # SIGKILL the placing daemon while it places fragments
    out, err = put.communicate(timeout=60)
    assert put.returncode != 0 and out.strip() == "", (out, err)
    small.start_node(0)
    db = sqlite3.connect(small.nodes[0].repo / "state.db")
    try:
        assert db.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM placements").fetchone()[0] == 0
    finally:
        db.close()


def test_id_without_daemon_and_clean_sigint(tmp_path):
    net = LocalNetwork(tmp_path, 1)
    net.init()
    repo = net.nodes[0].repo
    offline = json.loads(ok(net.cli(0, "id", "--json")).stdout)
    assert set(offline) == {"peer_id", "addresses", "recipient"}
    proc = net.cli(0, "peers")
    assert proc.returncode == 1 and "no daemon is running" in proc.stderr
    node = net.start_node(0)
    try:
        online = json.loads(ok(net.cli(0, "id", "--json")).stdout)
        assert online["peer_id"] == offline["peer_id"] == node.peer_id
        assert online["recipient"] == offline["recipient"]
        assert (repo / "api.token").stat().st_mode & 0o777 == 0o600
        assert (repo / "api.json").exists()
    finally:
        net.kill(0, signal.SIGINT)
    assert node.proc.returncode == 0  # SIGINT: a clean stop
    assert not (repo / "api.json").exists()
