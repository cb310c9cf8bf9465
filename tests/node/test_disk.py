"""Disk on real daemons (separate processes, 127.0.0.1 only): garbage collection after a get,
``fusenode rm`` releasing a model on every holder, a non-owner's release refused.

One 4-node network (k=2, n=4: every node holds one fragment of each segment); the tests run
in order: get + gc on node 3, a stranger's release refused, rm by node 0 + gc on the holders,
rm while a holder is down (released once it is back).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusenode.defaults import MIN_HOLD_BYTES
from fusenode.storage.kubo import flatfs_path
from tests.support.attacker import Attacker
from tests.support.cli import Cli, assert_ok, clean_env, scrape

pytestmark = pytest.mark.slow

MiB = 1 << 20
CONFIG = {
    ("storage", "segment_size"): str(2 * MiB),  # 4 segments, 1 MiB fragments
    ("storage", "k"): "2",
    ("storage", "n"): "4",
    ("storage", "fetch_timeout"): "20.0",
    ("storage", "gc_interval"): "0.0",  # only the gc runs the tests ask for
    ("repair", "interval"): "2.0",  # pending releases are retried by the repair pass
}
ok = assert_ok


def blockstore_bytes(repo: Path) -> int:
    """Bytes of every block file of a repo's Kubo blockstore, counted here."""
    blocks = repo / "kubo" / "blocks"
    return sum(f.stat().st_size for f in blocks.glob("*/*.data"))


def held(repo: Path, owner: str | None = None) -> dict[str, int]:
    db = sqlite3.connect(repo / "state.db", timeout=10)
    try:
        sql, args = "SELECT cid, size FROM held", ()
        if owner is not None:
            sql, args = sql + " WHERE owner = ?", (owner,)
        return dict(db.execute(sql, args).fetchall())
    finally:
        db.close()


def gc(net, i: int) -> dict:
    return json.loads(ok(net.cli(i, "gc", "--json")).stdout)


@pytest.fixture(scope="module")
def net(network):
    return network(4, CONFIG)


@pytest.fixture(scope="module")
def stored(net, tmp_path_factory):
    src = tmp_path_factory.mktemp("data") / "model.bin"
    src.write_bytes(os.urandom(8 * MiB))
    cid = ok(net.cli(0, "put", str(src), "--public")).stdout.strip().splitlines()[-1]
    return src, cid


def test_gc_after_a_get_brings_the_blockstore_back_to_its_pins(net, stored, tmp_path):
    src, cid = stored
    repo = net.nodes[3].repo
    before_get = blockstore_bytes(repo)
    ok(net.cli(3, "get", cid, "-o", str(tmp_path / "out.bin")))
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    after_get = blockstore_bytes(repo)
    # The fragments fetched from the other holders stay on disk, pinned by nothing.
    assert after_get - before_get >= 4 * MiB

    report = gc(net, 3)
    after_gc = blockstore_bytes(repo)
    print(
        f"\nnode 3 blockstore: before get {before_get / MiB:.2f} MiB, after get "
        f"{after_get / MiB:.2f} MiB, after gc {after_gc / MiB:.2f} MiB "
        f"(pinned {report['pinned_after'] / MiB:.2f} MiB, gc {report['seconds']} s)"
    )
    assert report["blockstore_before"] == after_get
    assert report["blockstore_after"] == after_gc
    assert report["removed_bytes"] == after_get - after_gc > 4 * MiB
    assert abs(after_gc - report["pinned_after"]) <= 0.01 * report["pinned_after"]
    # The summary and /metrics count the run, and read the disk again after it; the planned
    # Kubo restart of the sweep is no crash restart.
    summary = json.loads(ok(net.cli(3, "status", "--json")).stdout)
    assert summary["storage"]["blockstore_bytes"] == after_gc
    assert summary["storage"]["pinned_bytes"] == report["pinned_after"]
    assert summary["activity"]["gc"]["runs"] == 1
    assert summary["activity"]["gc"]["last"]["summary"]["freed_bytes"] == report["removed_bytes"]
    got = scrape(net, 3)
    assert got[("fusenode_operation_seconds_count", (("operation", "gc"),))] == 1
    assert got[("fusenode_gc_freed_bytes_total", ())] == report["removed_bytes"]
    assert got[("fusenode_kubo_restarts_total", ())] == 0
    # What node 3 holds is all still there: its fragments (and the manifest) are pinned.
    mine = held(repo)  # (a manifest is accounted at least MIN_HOLD_BYTES, more than it has)
    assert sum(v for v in mine.values() if v > MIN_HOLD_BYTES) < report["pinned_after"]
    for frag in mine:
        assert flatfs_path(repo / "kubo", frag).exists()
    # The node works on after its Kubo restarted: node 3 gets again (its own fragment plus
    # the others' over the network), and node 0 reads node 3's fragments.
    ok(net.cli(3, "get", cid, "-o", str(tmp_path / "again.bin")))
    assert (tmp_path / "again.bin").read_bytes() == src.read_bytes()
    status = json.loads(ok(net.cli(0, "status", cid, "--json")).stdout)
    assert status["healthy"], status
    runs = sqlite3.connect(repo / "state.db").execute("SELECT COUNT(*) FROM gc_runs").fetchone()
    assert runs == (1,)


def test_a_release_by_another_node_is_refused(net, stored, tmp_path_factory):
    """Only the node that placed a fragment may release it: a stranger's signed request
    naming node 0's fragments on node 1 is answered 403, and node 1 keeps them."""
    _, cid = stored
    owner = net.nodes[0].peer_id
    theirs = sorted(held(net.nodes[1].repo, owner))
    assert len(theirs) >= 4
    stranger = Attacker(tmp_path_factory.mktemp("stranger") / "repo", net.nodes[1].multiaddr)
    try:
        body = json.dumps({"cids": theirs}).encode()
        reply = stranger.call(net.nodes[1].peer_id, "POST", "/peer/v1/release", body)
        assert reply.status == 403, reply.body
        assert reply.json()["error"]["type"] == "NotOwner"
        # A CID it does not hold at all is released as a no-op (nothing to refuse).
        unknown = cid[:-4] + ("aaaa" if not cid.endswith("aaaa") else "bbbb")
        fresh = json.dumps({"cids": [unknown]}).encode()
        reply = stranger.call(net.nodes[1].peer_id, "POST", "/peer/v1/release", fresh)
        assert reply.status == 200 and reply.json() == {"released": []}
    finally:
        stranger.close()
    assert sorted(held(net.nodes[1].repo, owner)) == theirs


def test_rm_releases_the_model_everywhere_and_gc_reclaims_it(net, stored):
    _, cid = stored
    owner = net.nodes[0].peer_id
    before = {i: blockstore_bytes(net.nodes[i].repo) for i in range(4)}
    fragments = {i: set(held(net.nodes[i].repo, owner)) for i in range(1, 4)}
    assert all(cid in f for f in fragments.values())  # each holder kept the manifest

    reply = json.loads(ok(net.cli(0, "rm", cid, "--json")).stdout)
    assert reply["pending"] == {}
    assert set(reply["released"]) == {net.nodes[i].peer_id for i in range(1, 4)}
    for i in range(1, 4):
        assert reply["released"][net.nodes[i].peer_id] == len(fragments[i])
        assert held(net.nodes[i].repo, owner) == {}
    assert held(net.nodes[0].repo) == {}
    # Nothing left to delete: a second rm says so.
    proc = net.cli(0, "rm", cid)
    assert proc.returncode == 4 and "not a model this node placed" in proc.stderr

    lines = []
    for i in range(4):
        report = gc(net, i)
        after = blockstore_bytes(net.nodes[i].repo)
        lines.append(f"node {i}: {before[i] / MiB:.2f} -> {after / MiB:.2f} MiB")
        assert after == report["blockstore_after"] < 64 * 1024  # Kubo's own root, no more
        assert report["pinned_after"] == after
        for frag in fragments.get(i, ()):
            assert not flatfs_path(net.nodes[i].repo / "kubo", frag).exists()
    print("\nblockstore after rm + gc: " + "; ".join(lines))


def test_rm_while_a_holder_is_down_releases_there_once_it_is_back(net, tmp_path):
    src = tmp_path / "second.bin"
    src.write_bytes(os.urandom(2 * MiB))
    cid = ok(net.cli(0, "put", str(src), "--public")).stdout.strip().splitlines()[-1]
    owner, away = net.nodes[0].peer_id, net.nodes[2].peer_id
    kept = held(net.nodes[2].repo, owner)
    assert cid in kept
    net.kill(2, signal.SIGTERM)

    reply = json.loads(ok(net.cli(0, "rm", cid, "--json")).stdout)
    assert set(reply["pending"]) == {away}
    assert set(reply["released"]) == {net.nodes[1].peer_id, net.nodes[3].peer_id}
    assert held(net.nodes[2].repo, owner) == kept  # it was down: nothing could change there

    net.start_node(2)
    deadline = time.monotonic() + 120
    while held(net.nodes[2].repo, owner) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert held(net.nodes[2].repo, owner) == {}


def test_a_gc_asked_for_during_a_get_waits_for_it(net, tmp_path):
    """The gate: a gc requested while a get is transferring runs once the get is done (the
    get succeeds, and the gc then removes everything it fetched), never in the middle of it
    (blocks fetched after a sweep would stay on disk, unpinned)."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(48 * MiB))
    cid = ok(net.cli(0, "put", str(src), "--public")).stdout.strip().splitlines()[-1]
    repo = net.nodes[3].repo
    ok(net.cli(3, "gc"))  # start from the pins alone
    baseline = blockstore_bytes(repo)
    get = subprocess.Popen(
        [*net_cli(net, 3, "get", cid, "-o", str(tmp_path / "out.bin"))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while blockstore_bytes(repo) < baseline + 2 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)  # the get is fetching
        assert get.poll() is None, "the get ended before the gc could be asked for"
        report = gc(net, 3)
    finally:
        _, err = get.communicate(timeout=300)
    assert get.returncode == 0, err
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    after = blockstore_bytes(repo)
    assert report["removed_bytes"] >= 24 * MiB - 2 * MiB  # what the get fetched from others
    assert abs(after - report["pinned_after"]) <= 0.01 * report["pinned_after"]
    assert after == report["blockstore_after"]


def net_cli(net, i: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "fusenode.node.cli", *args, "--repo", str(net.nodes[i].repo)]


def test_a_put_while_a_holder_sweeps_still_places_on_n_nodes(net, tmp_path):
    """A gc stops its node's Kubo for a second or two. On a network of exactly n nodes, a put
    made meanwhile waits for that peer (live a moment ago) instead of failing for want of n
    distinct nodes; the put is started at several points of the sweep."""
    for i, delay in enumerate((0.2, 0.6, 1.0)):
        src = tmp_path / f"p{i}.bin"
        src.write_bytes(os.urandom(300_000))
        sweep = subprocess.Popen(
            net_cli(net, 3, "gc"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        try:
            time.sleep(delay)
            proc = net.cli(0, "put", str(src), "--public")
        finally:
            _, err = sweep.communicate(timeout=120)
        assert sweep.returncode == 0, err
        cid = ok(proc).stdout.strip().splitlines()[-1]
        status = json.loads(ok(net.cli(0, "status", cid, "--json")).stdout)
        for seg in status["segments"]:
            assert len({f["peer"] for f in seg["fragments"]}) == 4, (delay, seg)
        [model] = [
            m
            for m in json.loads(ok(net.cli(0, "ls", "--json")).stdout)["models"]
            if m["cid"] == cid
        ]
        assert model["placement"] == "distinct", model


def test_rm_of_a_share_and_of_the_model_it_shares(net, tmp_path):
    """A share (new keys, same fragments) is deleted by the node that made it, on every node
    it was copied to, and the model stays; deleting the model deletes its shares too."""
    owner = net.nodes[0].peer_id
    src = tmp_path / "shared.bin"
    src.write_bytes(os.urandom(MiB))
    cid = ok(net.cli(0, "put", str(src))).stdout.strip().splitlines()[-1]
    key = tmp_path / "friend.txt"
    friend = Cli().ok("keygen", "-o", key).stdout.strip().splitlines()[-1]

    def share() -> str:
        return ok(net.cli(0, "share", cid, "--recipient", friend)).stdout.strip().splitlines()[-1]

    first = share()
    assert all(first in held(net.nodes[i].repo, owner) for i in range(4))
    reply = json.loads(ok(net.cli(0, "rm", first, "--json")).stdout)
    assert reply["pending"] == {} and reply["local"] == 1 and reply["shares"] == []
    assert all(first not in held(net.nodes[i].repo) for i in range(4))
    ok(
        net.cli(
            2,
            "get",
            cid,
            "-o",
            str(tmp_path / "still.bin"),
            "--identity",
            str(net.nodes[0].repo / "identity.txt"),
        )
    )
    assert (tmp_path / "still.bin").read_bytes() == src.read_bytes()

    second = share()
    listing = json.loads(ok(net.cli(0, "ls", "--json")).stdout)
    assert [(sh["cid"], sh["source"]) for sh in listing["shares"]] == [(second, cid)]
    ok(net.cli(1, "get", second, "-o", str(tmp_path / "friend.bin"), "--identity", str(key)))
    reply = json.loads(ok(net.cli(0, "rm", cid, "--json")).stdout)
    assert reply["shares"] == [second]
    assert all(
        second not in held(net.nodes[i].repo) and cid not in held(net.nodes[i].repo)
        for i in range(4)
    )
    proc = net.cli(0, "rm", second)
    assert proc.returncode == 4 and "not a model this node placed or shared" in proc.stderr
