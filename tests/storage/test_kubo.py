"""The embedded Kubo backend, on real nodes (each in its own child process) on 127.0.0.1.

Two module-wide nodes A and B (A dialled B) serve most tests; tests that kill or lock a node
start their own. Every repo lives under pytest's tmp dirs and listens on a 127.0.0.1 port
found free by binding a socket first.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusenode.storage.backend import NodeIdentity, validate_cid, validate_peer_multiaddr
from fusenode.storage.errors import BackendError, BackendTimeout, InvalidArgument
from fusenode.storage.kubo import (
    KuboNode,
    SwarmSettings,
    create_repo,
    find_libkubo,
    loopback_config,
    network_config,
)
from fusenode.storage.kubo.library import PROTOTYPES

CIDV0 = "QmWKoWmuRfPJXSvLHoPdJn8iFsvyum4HsUeB1LUHdVRVKW"
CIDV1 = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
CIDV1_RAW = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def missing_cid(node: KuboNode, tmp: Path) -> str:
    """A well-formed CID of content no node has (hash_only stores nothing)."""
    return node.hash_only(random_file(tmp / "never-added.bin", 10_000))


class Pair:
    def __init__(self, a: KuboNode, b: KuboNode, port_a: int, port_b: int) -> None:
        self.a, self.b, self.port_a, self.port_b = a, b, port_a, port_b


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("kubo")
    cwd_log = Path.cwd() / "kubo.log"
    cwd_log_before = cwd_log.stat().st_mtime if cwd_log.exists() else None
    port_a, port_b = free_port(), free_port()
    a = KuboNode(root / "a", port_a)
    try:
        b = KuboNode(root / "b", port_b)
        try:
            a.connect(b.identity().addresses[0], timeout=10)
            yield Pair(a, b, port_a, port_b)
        finally:
            b.close()
    finally:
        a.close()
    # The library logs to ./kubo.log of its process: it must be the repo's, never ours.
    cwd_log_after = cwd_log.stat().st_mtime if cwd_log.exists() else None
    assert cwd_log_after == cwd_log_before


# ------------------------------------------------------------------- no node needed


@pytest.mark.parametrize("cid", [CIDV0, CIDV1, CIDV1_RAW])
def test_validate_cid_accepts_v0_and_base32_v1(cid: str) -> None:
    assert validate_cid(cid) == cid


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "Qm123",
        CIDV0[:-1],  # 45 characters
        CIDV0 + "a",
        CIDV0[:-1] + "0",  # '0' is not base58
        "Qm" + "1" * 44,  # base58 fine, but not a sha2-256 multihash
        CIDV1.upper(),
        CIDV1[:-1],  # digest shorter than its declared length
        "zdj7WWeQ43G6JJvLWQWZpyHuAMq6uYWRjkBXFad11vE2LHhQ7",  # base58 CIDv1: not accepted
        "../../etc/passwd",
        "b" + "a" * 500,
        42,
    ],
)
def test_validate_cid_rejects_malformed(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        validate_cid(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", ["garbage", "/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4001/p2p/", "/p2p/Qm"]
)
def test_validate_peer_multiaddr_rejects_malformed(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_peer_multiaddr(bad)


def test_loopback_config_edits() -> None:
    config = loopback_config({"Bootstrap": ["/dnsaddr/bootstrap.libp2p.io/p2p/Qm"]}, 4123)
    assert config["Bootstrap"] == []
    assert config["Addresses"]["Swarm"] == ["/ip4/127.0.0.1/tcp/4123"]
    with pytest.raises(InvalidArgument):
        loopback_config({}, 0)


def test_network_config_off_loopback() -> None:
    swarm = SwarmSettings(
        host="10.1.2.3", announce=("/ip4/203.0.113.7/tcp/4001",), deny=("192.168.0.0/16",)
    )
    config = network_config({"Bootstrap": ["/dnsaddr/bootstrap.libp2p.io/p2p/Qm"]}, swarm, 4001)
    assert config["Bootstrap"] == [] and config["Addresses"]["API"] == []
    assert config["Addresses"]["Swarm"] == ["/ip4/10.1.2.3/tcp/4001"]
    assert config["Addresses"]["Announce"] == ["/ip4/203.0.113.7/tcp/4001"]
    assert "/ip4/127.0.0.0/ipcidr/8" in config["Addresses"]["NoAnnounce"]
    # Only the operator's ranges are filtered; no loopback-only filters off loopback.
    assert config["Swarm"]["AddrFilters"] == ["/ip4/192.168.0.0/ipcidr/16"]
    assert config["Discovery"]["MDNS"]["Enabled"] is False
    assert config["Swarm"]["DisableNatPortMap"] is True
    everywhere = network_config({}, SwarmSettings(host="::", mdns=True, nat_port_map=True), 9)
    assert everywhere["Addresses"]["Swarm"] == ["/ip6/::/tcp/9"]
    assert (
        everywhere["Discovery"]["MDNS"]["Enabled"] and not everywhere["Swarm"]["DisableNatPortMap"]
    )
    # The default stays loopback only, every other address denied.
    assert loopback_config({}, 9)["Swarm"]["AddrFilters"][-1] == "/ip6/::/ipcidr/0"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "example.com"},
        {"host": "10.0.0.1", "deny": ("10.0.0.0/99",)},
        {"announce": ("http://x",)},
        {"port": 0},
    ],
)
def test_swarm_settings_refuse_what_kubo_could_not_use(kwargs) -> None:
    with pytest.raises(InvalidArgument):
        SwarmSettings(**kwargs)


def test_library_found_without_importing_its_loader() -> None:
    already = "libkubo" in sys.modules
    path = find_libkubo()
    assert path.is_file() and path.suffix == ".so"
    assert ("libkubo" in sys.modules) == already  # its loader prints and dlopens


def test_prototypes_match_the_shipped_header() -> None:
    """Our ctypes declarations must agree with the .h beside the library."""
    header = find_libkubo().with_suffix(".h").read_text()
    c_types = {"char*": "c_void_p", "int": "c_int", "_Bool": "c_bool"}
    for name, (restype, argtypes) in PROTOTYPES.items():
        m = re.search(rf"extern (char\*|int) {name}\(([^)]*)\);", header)
        assert m, name
        want_res = "c_void_p" if m.group(1) == "char*" else "c_int"
        assert restype.__name__ == want_res, name
        params = [p.strip().rsplit(" ", 1)[0] for p in m.group(2).split(",")]
        want_args = ["c_char_p" if p == "char*" else c_types[p] for p in params]
        assert [t.__name__ for t in argtypes] == want_args, name


# ------------------------------------------------------------------- real nodes


def test_identity_is_peer_id_and_loopback_address(pair: Pair) -> None:
    ident = pair.a.identity()
    assert isinstance(ident, NodeIdentity)
    assert re.fullmatch(r"Qm[1-9A-HJ-NP-Za-km-z]{44}|12D3Koo\w+", ident.peer_id)
    assert ident.addresses == (f"/ip4/127.0.0.1/tcp/{pair.port_a}/p2p/{ident.peer_id}",)
    assert pair.a.identity().peer_id != pair.b.identity().peer_id


def test_repo_config_is_loopback_only(pair: Pair) -> None:
    config_path = pair.a.repo_dir / "kubo" / "config"
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600  # it holds the private key
    config = json.loads(config_path.read_text())
    assert config["Bootstrap"] == []
    assert config["Addresses"]["Swarm"] == [f"/ip4/127.0.0.1/tcp/{pair.port_a}"]
    assert config["Addresses"]["API"] == []
    assert config["Addresses"]["Gateway"] == []
    assert config["Discovery"]["MDNS"]["Enabled"] is False
    assert config["Swarm"]["DisableNatPortMap"] is True
    assert config["Swarm"]["RelayClient"]["Enabled"] is False
    assert config["Swarm"]["RelayService"]["Enabled"] is False
    assert config["AutoNAT"]["ServiceMode"] == "disabled"
    assert "/ip4/128.0.0.0/ipcidr/1" in config["Swarm"]["AddrFilters"]
    assert not any("127." in f for f in config["Swarm"]["AddrFilters"])
    # Kubo's log goes inside the repo folder, not the caller's working directory.
    assert pair.a.log_path.parent == pair.a.repo_dir
    assert "Logging to file now" in pair.a.log_path.read_text()


def test_add_then_fetch_identical_and_cid_matches_hash_only(pair: Pair, tmp_path: Path) -> None:
    a = pair.a
    src = random_file(tmp_path / "obj.bin", 1_500_000)  # several 256 KiB chunks
    cid = a.add(src)
    assert validate_cid(cid) == cid
    assert a.hash_only(src) == cid
    assert a.has_pin(cid)
    dest = tmp_path / "out" / "obj.bin"
    a.fetch(cid, dest, timeout=10)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["obj.bin"]  # no temp file left
    assert a.fetch_bytes(cid, timeout=10) == src.read_bytes()
    assert a.add_bytes(src.read_bytes()) == cid
    assert a.add_bytes(b"") == a.hash_only(random_file(tmp_path / "empty", 0))

    other = random_file(tmp_path / "other.bin", 1000)
    assert a.hash_only(other) not in a.pins()  # hash_only stores and pins nothing


def test_bad_arguments_never_reach_kubo(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = pair.a

    def reached(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the call reached Kubo")

    monkeypatch.setattr(a._process, "call", reached)
    for bad in ["Qm123", "not a cid", CIDV0 + "x", ""]:
        with pytest.raises(InvalidArgument, match="malformed CID"):
            a.fetch(bad, tmp_path / "x", timeout=1)
        with pytest.raises(InvalidArgument):
            a.fetch_bytes(bad, timeout=1)
        with pytest.raises(InvalidArgument):
            a.pin(bad, timeout=1)
        with pytest.raises(InvalidArgument):
            a.unpin(bad)
        with pytest.raises(InvalidArgument):
            a.has_pin(bad)
    with pytest.raises(InvalidArgument):
        a.connect("/ip4/127.0.0.1/tcp/1", timeout=1)
    with pytest.raises(InvalidArgument):
        a.add(tmp_path)  # a directory
    with pytest.raises(InvalidArgument):
        a.add(tmp_path / "missing")
    assert not (tmp_path / "x").exists()


def test_two_nodes_connect_and_b_pins_and_fetches_from_a(pair: Pair, tmp_path: Path) -> None:
    a, b = pair.a, pair.b
    b.connect(a.identity().addresses[0], timeout=10)  # already connected: harmless
    assert b.identity().peer_id in a.peers()
    assert a.identity().peer_id in b.peers()

    data = os.urandom(700_000)
    cid = a.add_bytes(data)
    assert not b.has_pin(cid)
    b.pin(cid, timeout=20)
    assert b.has_pin(cid)
    b.fetch(cid, tmp_path / "from-a.bin", timeout=20)
    assert (tmp_path / "from-a.bin").read_bytes() == data
    b.unpin(cid)
    assert not b.has_pin(cid)
    b.unpin(cid)  # unpinning what is not pinned is fine

    second = os.urandom(50_000)  # not pinned on B: fetched from A over bitswap
    assert b.fetch_bytes(a.add_bytes(second), timeout=20) == second


def test_connect_to_closed_port_fails_fast(pair: Pair) -> None:
    # Not B's ID: libp2p reports success for a peer already connected, whatever the address.
    peer_id = CIDV0  # a sha2-256 multihash is a well-formed peer ID nobody here has
    start = time.monotonic()
    with pytest.raises(BackendError, match="could not connect"):
        pair.a.connect(f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{peer_id}", timeout=10)
    assert time.monotonic() - start < 5


def test_a_lone_node_answers_a_missing_cid_at_once(tmp_path: Path) -> None:
    """Nothing stored here and no peer to ask: Kubo would wait the whole deadline and the
    node would then be restarted; the backend answers at once, and keeps its process."""
    with KuboNode(tmp_path / "alone") as node:
        cid = missing_cid(node, tmp_path)
        present = node.add_bytes(b"here")
        assert node.has_block(present) and not node.has_block(cid)
        assert node.has_block(CIDV1) is False
        pid = node.pid
        for call in (lambda: node.fetch_bytes(cid, 30), lambda: node.pin(cid, 30)):
            start = time.monotonic()
            with pytest.raises(BackendTimeout, match="no peer is connected"):
                call()
            assert time.monotonic() - start < 2
        assert node.pid == pid and node.fetch_bytes(present, 5) == b"here"


def test_fetch_of_missing_cid_times_out_and_node_recovers(pair: Pair, tmp_path: Path) -> None:
    a, b = pair.a, pair.b
    cid = missing_cid(a, tmp_path)
    pid_before = a.pid
    dest = tmp_path / "dl" / "never.bin"
    caught: list[BaseException] = []

    def hung_fetch() -> None:
        try:
            a.fetch(cid, dest, timeout=3.0)
        except BaseException as exc:
            caught.append(exc)

    start = time.monotonic()
    worker = threading.Thread(target=hung_fetch)
    worker.start()
    # While that fetch hangs inside Kubo, other calls are served.
    time.sleep(0.3)
    quick = a.add_bytes(b"served while a fetch hangs")
    assert a.fetch_bytes(quick, timeout=5) == b"served while a fetch hangs"
    assert time.monotonic() - start < 2.9  # before the fetch's deadline
    worker.join(10)
    elapsed = time.monotonic() - start
    assert len(caught) == 1 and isinstance(caught[0], BackendTimeout), caught
    assert 3.0 <= elapsed < 5.0  # raised at the deadline, not after a restart
    assert f"timed out after 3.0 s fetching {cid}: no connected peer provided it" in str(caught[0])
    assert not dest.exists()

    # The node was restarted on the same repo, redialled B, and works.
    data = os.urandom(300_000)
    cid2 = a.add_bytes(data)
    assert a.pid != pid_before
    assert a.fetch_bytes(cid2, timeout=10) == data
    assert b.identity().peer_id in a.peers()
    assert b.fetch_bytes(cid2, timeout=20) == data
    assert a.has_pin(quick)  # same repo: what it held before is still there
    assert list(dest.parent.iterdir()) == []  # the temp file of the killed fetch is gone


def test_pin_of_missing_cid_times_out(pair: Pair, tmp_path: Path) -> None:
    cid = missing_cid(pair.b, tmp_path)
    start = time.monotonic()
    with pytest.raises(BackendTimeout, match=f"pinning {cid}: no connected peer provided it"):
        pair.b.pin(cid, timeout=2.0)
    assert time.monotonic() - start < 4.5
    assert not pair.b.has_pin(cid)


def test_second_node_on_a_repo_in_use_is_refused(pair: Pair) -> None:
    with pytest.raises(BackendError, match="is in use by another process"):
        KuboNode(pair.a.repo_dir)
    assert pair.a.peers()  # the running node is unharmed


def test_sigterm_stops_the_node_process_promptly(tmp_path: Path) -> None:
    with KuboNode(tmp_path / "c", free_port()) as node:
        restarts: list[int] = []
        node.on_restart(lambda: restarts.append(1))  # what /metrics counts
        pid = node.pid
        assert pid is not None and node.is_running()
        start = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        while node.is_running() and time.monotonic() - start < 5:
            time.sleep(0.05)
        assert not node.is_running(), "the child ignored SIGTERM"
        assert time.monotonic() - start < 3
        assert "Cleaning up node" in node.log_path.read_text()  # CleanupNode ran

        # The next call starts a fresh node on the same repo.
        cid = node.add_bytes(b"after sigterm")
        assert node.pid != pid and restarts == [1]
        assert node.fetch_bytes(cid, timeout=10) == b"after sigterm"
        child_pid = node.pid
    assert not node.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)  # gone and reaped
    node.close()  # twice is fine
    with pytest.raises(BackendError, match="closed"):
        node.peers()


def test_create_repo_is_idempotent_and_keeps_identity(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    port1, port2 = free_port(), free_port()
    create_repo(repo, port1)
    config = json.loads((repo / "kubo" / "config").read_text())
    peer_id = config["Identity"]["PeerID"]
    assert config["Addresses"]["Swarm"] == [f"/ip4/127.0.0.1/tcp/{port1}"]
    assert not list(repo.glob(".kubo-init-*"))

    with pytest.raises(InvalidArgument):
        create_repo(repo, 0)
    with KuboNode(repo, port2) as node:  # existing repo: same identity, new port
        assert node.identity().addresses == (f"/ip4/127.0.0.1/tcp/{port2}/p2p/{peer_id}",)
    with KuboNode(repo) as node:  # no port: keeps the configured one
        assert node.identity().addresses[0].startswith(f"/ip4/127.0.0.1/tcp/{port2}/")


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaps (PID 1 in containers may not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_node_process_exits_when_its_parent_dies(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fusenode.storage.kubo import KuboNode\n"
        "if __name__ == '__main__':\n"
        f"    node = KuboNode(Path({str(tmp_path / 'orphan')!r}), {free_port()})\n"
        "    print(node.pid, flush=True)\n"
        "    sys.stdin.read()\n"
    )
    (tmp_path / "host.py").write_text(script)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    host = subprocess.Popen(
        [sys.executable, str(tmp_path / "host.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env=env,
    )
    try:
        assert host.stdout is not None
        child_pid = int(host.stdout.readline())
        assert not _gone(child_pid)
        host.kill()  # no cleanup code runs in the parent
        host.wait(10)
        start = time.monotonic()
        while not _gone(child_pid) and time.monotonic() - start < 5:
            time.sleep(0.05)
        assert _gone(child_pid), "the node outlived its parent"
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(10)
        for stream in (host.stdin, host.stdout):
            if stream is not None:
                stream.close()


def test_busy_swarm_port_gives_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(BackendError, match=f"swarm port {port} is in use by another program"):
            KuboNode(tmp_path / "busy", port)


def test_call_in_flight_during_a_restart_is_retried(pair: Pair, tmp_path: Path) -> None:
    """A restart (forced here through the private hook a timeout uses) must not fail the
    other calls in flight: they are idempotent and run again on the new process."""
    b = pair.b
    cid = missing_cid(b, tmp_path)
    caught: list[BaseException] = []

    def fetch() -> None:
        try:
            b.fetch_bytes(cid, timeout=3.0)
        except BaseException as exc:
            caught.append(exc)

    start = time.monotonic()
    worker = threading.Thread(target=fetch)
    worker.start()
    time.sleep(0.5)
    b._process.begin_restart(b._process._child)
    worker.join(10)
    # Not failed by the restart at 0.5 s: retried, then timed out at its own deadline.
    assert time.monotonic() - start >= 3.0
    assert len(caught) == 1 and isinstance(caught[0], BackendTimeout), caught
    assert b.fetch_bytes(b.add_bytes(b"still fine"), timeout=10) == b"still fine"
