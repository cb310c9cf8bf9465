"""Hostile peers against real daemons (separate processes, 127.0.0.1 only): one test per
finding of the hostile-peer review, each driving the attack for real with an attacker that
has its own libp2p key and Kubo node (tests/support/attacker.py), or with a holder whose disk
is tampered with, and asserting that the attack fails, the node keeps serving and nothing
stored is lost.

The network: node 0 places models; nodes 1-3 hold; node 4 offers almost no capacity. Node 1
gives each peer a small quota. Audits run every 2 s.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fusenode.node.peerauth import HEADER_NONCE, verify_reply
from fusenode.storage.kubo import flatfs_path
from fusenode.storage.manifest import (
    ENCRYPTION_NONE,
    ErasureParams,
    FragmentRef,
    Manifest,
    Metadata,
    SegmentRef,
    canonical_json,
)
from fusenode.storage.unixfs import block_cid, file_cid, parse_dag_node
from tests.support.attacker import Attacker
from tests.support.cli import assert_ok

pytestmark = pytest.mark.slow

MiB = 1 << 20
CONFIG = {
    ("storage", "segment_size"): "262144",
    ("storage", "fetch_timeout"): "10.0",
    ("repair", "interval"): "60.0",  # repairs below come from audits, not from the timer
    ("repair", "unreachable_after"): "600.0",
    ("repair", "audit_interval"): "2.0",
}
PER_NODE = {
    1: {("storage", "peer_quota"): '"1 MiB"'},
    4: {("storage", "capacity"): "100000"},  # less than one 128 KiB fragment
}
ok = assert_ok


def status(net, i: int, cid: str) -> dict:
    return json.loads(ok(net.cli(i, "status", cid, "--json")).stdout)


def holders(st: dict) -> set[str]:
    return {f["peer"] for s in st["segments"] for f in s["fragments"]}


def memory(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux: clear_refs, value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def kubo_pids(pid: int) -> set[int]:
    """The daemon's child processes (its Kubo node)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def held_by(net, i: int) -> dict[str, int]:
    with sqlite3.connect(net.nodes[i].repo / "state.db") as db:
        rows = db.execute("SELECT owner, SUM(size) FROM held GROUP BY owner").fetchall()
    return dict(rows)


@pytest.fixture(scope="module")
def net(network):
    return network(5, CONFIG, PER_NODE)


@pytest.fixture(scope="module")
def attacker(net, tmp_path_factory):
    a = Attacker(tmp_path_factory.mktemp("attacker") / "repo", net.nodes[1].multiaddr)
    for node in net.nodes[2:]:
        a.kubo.connect(node.multiaddr, 20.0)
    yield a
    a.close()


@pytest.fixture(scope="module")
def stored(net, tmp_path_factory):
    src = tmp_path_factory.mktemp("data") / "model.onnx"
    src.write_bytes(os.urandom(700_000))  # 3 segments of 256 KiB, 128 KiB fragments
    cid = ok(net.cli(0, "put", str(src), "-k", "2", "-n", "3")).stdout.strip().splitlines()[-1]
    return src, cid


def still_readable(net, stored, tmp: Path, node: int = 0) -> None:
    src, cid = stored
    out = tmp / f"check-{time.monotonic_ns()}"
    ok(net.cli(node, "get", cid, "-o", str(out)))
    assert out.read_bytes() == src.read_bytes()


# -- 1. quotas and capacity ---------------------------------------------------------------


def test_a_put_beyond_a_holders_capacity_lands_elsewhere(net, stored):
    _, cid = stored
    st = status(net, 0, cid)
    assert st["healthy"]
    assert net.nodes[4].peer_id not in holders(st)  # refused (507): its fragments went elsewhere
    for seg in st["segments"]:
        assert len({f["peer"] for f in seg["fragments"]}) == 3  # still three distinct nodes
    assert held_by(net, 4).get(net.nodes[0].peer_id, 0) == 0


def test_a_peer_cannot_store_past_its_quota(net, attacker, stored, tmp_path):
    victim = net.nodes[1].peer_id
    statuses, reasons = [], []
    for _ in range(8):  # 8 x 200 KB against a 1 MiB quota
        blob = os.urandom(200_000)
        reply = attacker.call(victim, "POST", f"/peer/v1/store?cid={file_cid(blob)}", blob)
        statuses.append(reply.status)
        if reply.status != 200:
            reasons.append(reply.json()["error"]["message"])
    assert statuses[:5] == [200] * 5 and set(statuses[5:]) == {507}, statuses
    assert all("quota" in r for r in reasons)
    accounted = held_by(net, 1)[attacker.peer_id]
    assert 5 * 200_000 <= accounted <= MiB  # accounted per peer, and never past the quota
    # The node keeps serving its real peers, and what it held is intact.
    still_readable(net, stored, tmp_path)
    ok(net.cli(1, "id"))


def test_the_pin_route_is_gone(net, attacker):
    """Pinning by CID made a node fetch whatever a peer named (and pinned 60,000 CIDs in one
    request); holders now only take bytes streamed to them."""
    victim = net.nodes[2].peer_id
    body = json.dumps({"cids": [file_cid(os.urandom(10))]}).encode()
    reply = attacker.call(victim, "POST", "/peer/v1/pin", body)
    assert reply.status == 404


# -- 2. no peer request can restart Kubo ---------------------------------------------------


def test_asking_for_a_block_nobody_has_costs_nothing(net, attacker, stored, tmp_path):
    victim = net.nodes[2]
    before = kubo_pids(victim.proc.pid)
    assert before
    started = time.monotonic()
    for _ in range(5):
        missing = file_cid(os.urandom(64))
        reply = attacker.call(victim.peer_id, "GET", f"/peer/v1/block?cid={missing}")
        assert reply.status == 404
    assert time.monotonic() - started < 10  # answered from the disk, not after a deadline
    assert kubo_pids(victim.proc.pid) == before  # the same Kubo process: never restarted
    still_readable(net, stored, tmp_path)


# -- 3 (liveness part). a peer cannot keep itself alive by calling us ----------------------


def test_calling_our_health_does_not_make_a_peer_live(net, attacker):
    victim = net.nodes[0]
    for _ in range(3):
        assert attacker.call(victim.peer_id, "GET", "/peer/v1/health").status == 200
    with sqlite3.connect(victim.repo / "state.db") as db:
        row = db.execute("SELECT last_seen FROM peers WHERE peer_id = ?", (attacker.peer_id,))
        seen = row.fetchone()
    assert seen is None or seen[0] is None


# -- 4. replies are authenticated -----------------------------------------------------------


def test_every_reply_is_signed_by_the_peer_for_this_request(net, attacker):
    victim = net.nodes[3].peer_id
    headers = attacker.signed(victim, "GET", "/peer/v1/health")
    reply = attacker.request(victim, "GET", "/peer/v1/health", headers=headers)
    nonce = headers[HEADER_NONCE]
    verify_reply(reply.headers, victim, attacker.peer_id, nonce, reply.status, reply.body)
    # A receipt is a signature over (CID, size, time) for this request, kept by the placer.
    blob = os.urandom(5000)
    path = f"/peer/v1/store?cid={file_cid(blob)}"
    headers = attacker.signed(victim, "POST", path, blob)
    reply = attacker.request(victim, "POST", path, blob, headers=headers)
    verify_reply(reply.headers, victim, attacker.peer_id, headers[HEADER_NONCE], 200, reply.body)
    assert reply.json()["cid"] == file_cid(blob) and reply.json()["size"] == 5000


def test_the_placing_node_keeps_signed_receipts(net, stored):
    _, cid = stored
    with sqlite3.connect(net.nodes[0].repo / "state.db") as db:
        rows = db.execute("SELECT cid, peer, receipt FROM placements WHERE manifest = ?", (cid,))
        rows = rows.fetchall()
    remote = [(c, p, r) for c, p, r in rows if p != net.nodes[0].peer_id]
    assert remote
    for frag, peer, record in remote:
        receipt = json.loads(record)
        body = base64.b64decode(receipt["body"])
        headers = {
            "X-Fusenode-Peer": peer,
            "X-Fusenode-Key": receipt["key"],
            "X-Fusenode-Signature": receipt["signature"],
        }
        placer = net.nodes[0].peer_id  # checkable by anyone: holder, placer, nonce, bytes
        verify_reply(headers, peer, placer, receipt["nonce"], 200, body)
        assert json.loads(body)["cid"] == frag


# -- 5. bounded requests --------------------------------------------------------------------


def test_a_300_mib_unsigned_body_is_refused_with_memory_bounded(net, attacker, stored, tmp_path):
    victim = net.nodes[2]
    reset_peak(victim.proc.pid)
    rss_before = memory(victim.proc.pid, "VmRSS")
    held_before = held_by(net, 2)
    headers = {"Content-Length": str(300 * MiB), "Content-Type": "application/octet-stream"}
    path = f"/peer/v1/store?cid={file_cid(b'x')}"
    sent, reply = attacker.stream(victim.peer_id, path, headers, 300 * MiB)
    # Refused at once (401), or the connection closed on it before the reply was read.
    assert reply is None or reply.status == 401, reply
    grew = memory(victim.proc.pid, "VmHWM") - rss_before  # the peak during the attack
    assert grew < 64 * MiB, f"memory grew by {grew / MiB:.0f} MiB ({sent / MiB:.0f} MiB sent)"
    assert held_by(net, 2) == held_before
    still_readable(net, stored, tmp_path)


def test_bodies_are_bounded_by_bytes_received(net, attacker):
    victim = net.nodes[2].peer_id
    body = b'{"cids": []}'
    # Chunked: its length is not known up front, so it cannot be bounded: refused.
    headers = attacker.signed(victim, "POST", "/peer/v1/has", body)
    headers["Transfer-Encoding"] = "chunked"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    reply = attacker.request(victim, "POST", "/peer/v1/has", chunked, headers=headers)
    assert reply.status == 411
    # Signed, but longer than the route takes: refused from Content-Length, unread.
    big = b" " * (2 * MiB)
    headers = attacker.signed(victim, "POST", "/peer/v1/has", big)
    reply = attacker.request(victim, "POST", "/peer/v1/has", big, headers=headers)
    assert reply.status == 413


# -- 6. replays ---------------------------------------------------------------------------


def test_a_replayed_request_is_refused(net, attacker):
    victim = net.nodes[3].peer_id
    blob = os.urandom(3000)
    path = f"/peer/v1/store?cid={file_cid(blob)}"
    headers = attacker.signed(victim, "POST", path, blob)
    first = attacker.request(victim, "POST", path, blob, headers=headers)
    assert first.status == 200
    again = attacker.request(victim, "POST", path, blob, headers=headers)
    assert again.status == 401 and "replay" in again.json()["error"]["message"]
    # A captured request cannot be sent to another node either.
    other = net.nodes[2].peer_id
    moved = attacker.request(other, "POST", path, blob, headers=headers)
    assert moved.status == 401


# -- 7. manifests bounded before use --------------------------------------------------------


def _block(repo: Path, cid: str) -> bytes:
    return flatfs_path(repo / "kubo", cid).read_bytes()


def _manifest_of(net, cid: str) -> Manifest:
    """The model's manifest, read from node 0's own blockstore."""
    root = parse_dag_node(_block(net.nodes[0].repo, cid))
    parts = [parse_dag_node(_block(net.nodes[0].repo, c)).data for c in root.links]
    return Manifest.from_bytes(root.data if not root.links else b"".join(parts))


def test_a_manifest_listing_fragments_twice_is_refused_before_any_fetch(
    net, attacker, stored, tmp_path
):
    _, cid = stored
    manifest = _manifest_of(net, cid)
    obj = manifest.to_obj()
    obj["segments"][1]["fragments"] = obj["segments"][0]["fragments"]  # the same ones again
    forged = canonical_json(obj)
    forged_cid = file_cid(forged)
    # The attacker gets its manifest onto an honest node (a store within its quota)...
    assert (
        attacker.call(
            net.nodes[3].peer_id, "POST", f"/peer/v1/store?cid={forged_cid}", forged
        ).status
        == 200
    )
    # ...and a user is tricked into fetching it.
    out = tmp_path / "forged.out"
    proc = net.cli(0, "get", forged_cid, "-o", str(out))
    assert proc.returncode != 0 and "listed twice" in proc.stderr, proc.stderr
    assert not out.exists()


def test_a_manifest_declaring_more_than_the_disk_holds_is_refused(net, attacker, tmp_path):
    k, n, size = 1, 2, 1 << 30
    count = 19 * 1024  # 19 TiB at 1 GiB segments, in a manifest of a few MB
    created = datetime(2025, 1, 1, tzinfo=UTC)
    segments = tuple(
        SegmentRef(
            s,
            size,
            tuple(FragmentRef(j, file_cid(b"%d-%d" % (s, j)), 80 + size) for j in range(n)),
        )
        for s in range(count)
    )
    manifest = Manifest(
        created=created,
        encryption=ENCRYPTION_NONE,
        erasure=ErasureParams(k, n, size),
        payload_size=count * size,
        segments=segments,
        metadata=Metadata("huge.onnx", count * size, "0" * 64, created),
    )
    forged = manifest.to_bytes()
    assert len(forged) < 8 * MiB
    forged_cid = file_cid(forged)
    reply = attacker.call(net.nodes[3].peer_id, "POST", f"/peer/v1/store?cid={forged_cid}", forged)
    assert reply.status == 200, reply.body
    out = tmp_path / "huge.out"
    proc = net.cli(0, "get", forged_cid, "-o", str(out))
    assert proc.returncode != 0, proc.stdout
    assert "GiB" in proc.stderr and "free" in proc.stderr, proc.stderr
    assert not out.exists()


def test_a_manifest_cid_naming_a_large_file_is_refused_from_its_root(net, attacker, tmp_path):
    victim = net.nodes[0]
    blob = os.urandom(65 * MiB)  # over the 64 MiB a manifest may have
    cid = file_cid(blob)
    reply = attacker.call(net.nodes[3].peer_id, "POST", f"/peer/v1/store?cid={cid}", blob)
    assert reply.status == 200
    blocks = victim.repo / "kubo" / "blocks"
    before = sum(p.stat().st_size for p in blocks.rglob("*.data"))
    proc = net.cli(0, "get", cid, "-o", str(tmp_path / "big.out"))
    assert proc.returncode != 0 and "a manifest is at most" in proc.stderr, proc.stderr
    after = sum(p.stat().st_size for p in blocks.rglob("*.data"))
    assert after - before < MiB  # the root was read; the 65 MiB never came


# -- 9. the local API -----------------------------------------------------------------------


def test_local_api_reads_need_the_token_and_refuse_other_sites(net, stored):
    _, cid = stored
    url = net.nodes[0].api_url + f"/api/v1/status/{cid}"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=10)
    info.value.close()
    assert info.value.code == 401
    token = (net.nodes[0].repo / "api.token").read_text().strip()
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        request = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {token}", **headers}
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        info.value.close()
        assert info.value.code == 403
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert json.load(resp)["cid"] == cid
    with urllib.request.urlopen(net.nodes[0].api_url + "/api/v1/health", timeout=10) as resp:
        assert json.load(resp) == {"ok": True}


# -- 3. audits: a holder that deleted its fragments is caught and replaced ----------------


def test_a_holder_whose_blocks_are_deleted_is_caught_by_an_audit_and_replaced(
    net, stored, tmp_path
):
    _, cid = stored
    st = status(net, 0, cid)
    owner = net.nodes[0].peer_id
    by_peer: dict[str, list[str]] = {}
    for seg in st["segments"]:
        for f in seg["fragments"]:
            by_peer.setdefault(f["peer"], []).append(f["cid"])
    # A holder other than the owner, and not node 1 (whose store the attacker used up).
    cheat = next(n for n in net.nodes[2:4] if n.peer_id in by_peer)
    lost = by_peer[cheat.peer_id]
    # Its disk loses every block of those fragments; its daemon keeps running and answering.
    removed = 0
    for frag in lost:
        pending = [frag]
        while pending:
            want = pending.pop()
            path = flatfs_path(cheat.repo / "kubo", want)  # the root, then its leaves
            if path.exists():
                data = path.read_bytes()
                assert block_cid(data) == want
                pending += list(parse_dag_node(data).links)
                path.unlink()
                removed += 1
    assert removed >= len(lost)
    assert cheat.running
    deadline = time.monotonic() + 40  # one audit interval is 2 s; repair follows at once
    while True:
        st = status(net, 0, cid)
        where = {f["cid"]: f for s in st["segments"] for f in s["fragments"]}
        if all(where[c]["peer"] != cheat.peer_id for c in lost) and st["healthy"]:
            break
        assert time.monotonic() < deadline, json.dumps(st, indent=1)[:3000]
        time.sleep(1)
    for c in lost:
        assert where[c]["peer"] not in (cheat.peer_id, net.nodes[4].peer_id)
        assert where[c]["answered"] and "lost" not in where[c]
        audit = where[c]["audit"]  # the new copy: not audited yet, or passed
        assert audit is None or audit["result"] == "passed", audit
    for seg in st["segments"]:
        assert len({f["peer"] for f in seg["fragments"]}) == 3
    with sqlite3.connect(net.nodes[0].repo / "state.db") as db:
        results = dict(
            db.execute("SELECT cid, result FROM audits WHERE peer = ?", (cheat.peer_id,))
        )
        score = db.execute(
            "SELECT alpha, beta FROM scores WHERE peer = ?", (cheat.peer_id,)
        ).fetchone()
    assert any(results.get(c) == "failed" for c in lost)
    assert score[1] > 0  # the failure counts against the holder
    still_readable(net, stored, tmp_path)
    # Other holders' fragments were audited and passed.
    audited = [f["audit"] for s in st["segments"] for f in s["fragments"] if f["peer"] != owner]
    assert any(a and a["result"] == "passed" for a in audited)
