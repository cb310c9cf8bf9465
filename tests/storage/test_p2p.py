"""Stream mounting (HTTP tunnelled through libp2p) and PubSub on real KuboNodes, 127.0.0.1 only.

Module-wide nodes A and B and an HTTP server standing for A's peer API. A and B each
`connect` to the other, as the daemons must: a node redials the peers it was asked to connect
to right after a restart, and nothing else brings a restarted forwarder back to its peer (its
peerstore is in memory only, so it forgot the peer's address). Tests that close or restart a node say so; the order
of the tests in this file does not matter.
"""

from __future__ import annotations

import ctypes
import hashlib
import http.client
import http.server
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusenode.storage.errors import BackendError, BackendTimeout, InvalidArgument
from fusenode.storage.kubo import KuboNode, find_libkubo
from fusenode.storage.kubo.library import PUBSUB_PROTOTYPES
from fusenode.storage.transport import MAX_PUBSUB_MESSAGE, P2PForward, P2PListener

PROTO = "/x/fusenode/peer/1"
# A well-formed peer ID no node here has ever seen (the libp2p bootstrap node's).
STRANGER = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"


class PeerApi(http.server.BaseHTTPRequestHandler):
    """Stands for A's peer API: GET answers with the path, POST with the body's sha256."""

    def do_GET(self) -> None:
        self._answer(f"A{self.path}".encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(hashlib.sha256(body).hexdigest().encode())

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def request(port: int, path: str = "/", body: bytes | None = None, timeout: float = 10) -> bytes:
    """One HTTP request on a new connection (each one opens a new libp2p stream)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST" if body is not None else "GET", path, body=body)
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read()
    finally:
        conn.close()


def port_of(multiaddr: str) -> int:
    return int(multiaddr.rsplit("/", 1)[1])


def wait_until(check: Callable[[], bool], timeout: float) -> float:
    """Poll ``check`` until it is true; return the seconds it took (fail after ``timeout``)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.05)
    return time.monotonic() - start


def tunnel_works(port: int) -> bool:
    try:
        return request(port, "/probe", timeout=3) == b"A/probe"
    except OSError:
        return False


def force_restart(node: KuboNode, tmp: Path) -> None:
    """Make ``node`` miss a deadline (fetch of content nobody has) so that it restarts."""
    never = tmp / f"never-{os.urandom(4).hex()}.bin"
    never.write_bytes(os.urandom(5000))
    cid = node.hash_only(never)
    pid = node.pid
    with pytest.raises(BackendTimeout):
        node.fetch_bytes(cid, timeout=0.5)
    wait_until(lambda: node.is_running() and node.pid != pid, 15)


class Env:
    def __init__(self, a: KuboNode, b: KuboNode, api_port: int) -> None:
        self.a, self.b = a, b
        self.target = f"/ip4/127.0.0.1/tcp/{api_port}"
        self.a_id = a.identity().peer_id


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("p2p")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PeerApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    a = KuboNode(root / "a")
    try:
        b = KuboNode(root / "b")
        try:
            a.connect(b.identity().addresses[0], timeout=10)
            b.connect(a.identity().addresses[0], timeout=10)
            yield Env(a, b, server.server_address[1])
        finally:
            b.close()
    finally:
        a.close()
        server.shutdown()
        server.server_close()


@pytest.fixture
def tunnel(env: Env) -> Iterator[int]:
    """A listens on PROTO, B forwards a fresh local port to it: yields that port."""
    env.a.transport.p2p_listen(PROTO, env.target)
    forward = env.b.transport.p2p_forward(PROTO, "/ip4/127.0.0.1/tcp/0", env.a_id)
    yield port_of(forward.listen)
    env.b.transport.p2p_close(PROTO)
    env.a.transport.p2p_close(PROTO)


# ------------------------------------------------------------------- no node needed


def test_pubsub_prototypes_match_the_shipped_header() -> None:
    """Compared as ctypes types, not names: c_longlong is c_long on 64-bit Linux."""
    header = find_libkubo().with_suffix(".h").read_text()
    c_types = {
        "char*": ctypes.c_char_p,
        "int": ctypes.c_int,
        "void*": ctypes.c_void_p,
        "long long int": ctypes.c_longlong,
    }
    for name, (restype, argtypes) in PUBSUB_PROTOTYPES.items():
        m = re.search(rf"extern (char\*|int|long long int) {name}\(([^)]*)\);", header)
        assert m, name
        # A returned char* is declared c_void_p so that it can be freed.
        assert restype is (ctypes.c_void_p if m.group(1) == "char*" else c_types[m.group(1)])
        params = [p.strip().rsplit(" ", 1)[0] for p in m.group(2).split(",")]
        assert argtypes == [c_types[p] for p in params], name


# ------------------------------------------------------------------- real nodes


def test_http_through_the_tunnel(env: Env, tunnel: int) -> None:
    assert request(tunnel, "/hello?x=1") == b"A/hello?x=1"
    big = os.urandom(10 * 1024 * 1024)
    start = time.monotonic()
    assert (
        request(tunnel, "/upload", body=big, timeout=30) == hashlib.sha256(big).hexdigest().encode()
    )
    assert time.monotonic() - start < 10  # ~0.1 s here; only a gross regression trips this
    assert P2PListener(PROTO, env.target) in env.a.transport.p2p_listeners()
    forwards = env.b.transport.p2p_forwards()
    assert P2PForward(PROTO, f"/ip4/127.0.0.1/tcp/{tunnel}", env.a_id) in forwards


def test_listen_and_forward_are_idempotent_and_conflicts_are_clear(env: Env, tunnel: int) -> None:
    assert env.a.transport.p2p_listen(PROTO, env.target) == P2PListener(PROTO, env.target)
    assert len([x for x in env.a.transport.p2p_listeners() if x.protocol == PROTO]) == 1
    with pytest.raises(BackendError, match=f"{PROTO} already has a listener"):
        env.a.transport.p2p_listen(PROTO, "/ip4/127.0.0.1/tcp/9")
    listen = f"/ip4/127.0.0.1/tcp/{tunnel}"
    assert env.b.transport.p2p_forward(PROTO, listen, env.a_id).listen == listen
    with pytest.raises(BackendError, match="already forwards"):
        env.b.transport.p2p_forward("/x/other", listen, env.a_id)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = f"/ip4/127.0.0.1/tcp/{squatter.getsockname()[1]}"
        with pytest.raises(BackendError, match="port is in use"):
            env.b.transport.p2p_forward(PROTO, busy, env.a_id)
    assert [f.listen for f in env.b.transport.p2p_forwards()] == [
        listen
    ]  # failures left nothing behind
    assert request(tunnel, "/still") == b"A/still"


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("p2p_listen", ("fusenode", "/ip4/127.0.0.1/tcp/80")),  # no /x/ prefix
        ("p2p_listen", ("/x/a b", "/ip4/127.0.0.1/tcp/80")),
        ("p2p_listen", (PROTO, "/ip4/10.0.0.1/tcp/80")),  # not loopback
        ("p2p_listen", (PROTO, "/ip4/0.0.0.0/tcp/80")),
        ("p2p_listen", (PROTO, "/ip4/127.0.0.1/tcp/0")),
        ("p2p_listen", (PROTO, "/ip4/127.0.0.1/udp/80")),
        ("p2p_forward", (PROTO, "/ip4/0.0.0.0/tcp/0", STRANGER)),  # would open a LAN tunnel
        ("p2p_forward", (PROTO, "/ip4/127.0.0.1/tcp/70000", STRANGER)),
        ("p2p_forward", (PROTO, "/ip4/127.0.0.1/tcp/0", "not-a-peer-id")),
    ],
)
def test_bad_arguments_are_refused_before_kubo(
    env: Env, method: str, args: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidArgument):
        getattr(env.a.transport, method)(*args)


def test_close_by_filters(env: Env) -> None:
    a = env.a
    a.transport.p2p_listen("/x/c/1", env.target)
    a.transport.p2p_listen("/x/c/2", env.target)
    fw = a.transport.p2p_forward("/x/c/1", "/ip4/127.0.0.1/tcp/0", STRANGER)
    assert a.transport.p2p_close("/x/c/1", forwards=False) == 1  # the listener only
    assert {x.protocol for x in a.transport.p2p_listeners()} >= {"/x/c/2"}
    assert "/x/c/1" not in {x.protocol for x in a.transport.p2p_listeners()}
    assert a.transport.p2p_close(peer_id=STRANGER) == 1
    assert fw not in a.transport.p2p_forwards()
    assert a.transport.p2p_close("/x/c/2", target=env.target) == 1
    assert a.transport.p2p_close("/x/c/nothing") == 0


def test_forward_to_a_peer_never_seen_fails_at_once(env: Env) -> None:
    fw = env.b.transport.p2p_forward(PROTO, "/ip4/127.0.0.1/tcp/0", STRANGER)
    try:
        start = time.monotonic()
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            request(port_of(fw.listen), timeout=10)
        assert time.monotonic() - start < 1.0  # no address for it: the stream is reset at once
    finally:
        env.b.transport.p2p_close(listen=fw.listen)


def test_tunnel_and_subscription_come_back_after_either_node_restarts(
    env: Env, tunnel: int, tmp_path: Path
) -> None:
    a, b = env.a, env.b
    sub = b.transport.pubsub_subscribe("fusenode/restart")
    a.transport.p2p_listen("/x/closed", env.target)
    a.transport.p2p_close("/x/closed")  # closed before the restart: must not come back

    force_restart(a, tmp_path)
    took = wait_until(lambda: tunnel_works(tunnel), 10)
    assert P2PListener(PROTO, env.target) in a.transport.p2p_listeners()
    assert "/x/closed" not in {x.protocol for x in a.transport.p2p_listeners()}
    assert took < 5  # A redials B at once; ~0.3 s here

    force_restart(b, tmp_path)
    took = wait_until(lambda: tunnel_works(tunnel), 10)  # same local port as before
    assert took < 5
    assert P2PForward(PROTO, f"/ip4/127.0.0.1/tcp/{tunnel}", env.a_id) in b.transport.p2p_forwards()

    def delivered() -> bool:  # same subscription id, subscribed again on B's new process
        a.transport.pubsub_publish("fusenode/restart", b"after")
        msg = b.transport.pubsub_next_message(sub, timeout=0.3)
        return msg is not None and msg.data == b"after"

    wait_until(delivered, 10)
    b.transport.pubsub_unsubscribe(sub)


def test_request_to_a_closed_node_fails_fast(env: Env, tmp_path: Path) -> None:
    with socket.socket() as s:  # C's peer API: a port nothing listens on is enough here
        s.bind(("127.0.0.1", 0))
        dead_api = f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}"
    c = KuboNode(tmp_path / "c")
    try:
        c.transport.p2p_listen(PROTO, env.target)  # the module's API server, as if it were C's
        env.b.connect(c.identity().addresses[0], timeout=10)
        fw = env.b.transport.p2p_forward(PROTO, "/ip4/127.0.0.1/tcp/0", c.identity().peer_id)
        port = port_of(fw.listen)
        assert request(port, "/c") == b"A/c"

        # The target service down while C runs: the request fails at once as well.
        c.transport.p2p_close(PROTO)
        c.transport.p2p_listen(PROTO, dead_api)
        start = time.monotonic()
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            request(port, timeout=10)
        assert time.monotonic() - start < 1.0
    finally:
        c.close()
    for _ in range(3):  # C is gone: every request is reset, none hangs
        start = time.monotonic()
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            request(port, timeout=10)
        assert time.monotonic() - start < 1.0
    env.b.transport.p2p_close(listen=fw.listen)


def test_pubsub_delivers_with_the_sender_peer_id(env: Env) -> None:
    a, b = env.a, env.b
    sub_b = b.transport.pubsub_subscribe("fusenode/test")
    sub_a = a.transport.pubsub_subscribe("fusenode/test")
    try:
        payload = b"\x00binary\xff" * 10

        def delivered() -> bool:  # the mesh forms a short while after subscribing
            a.transport.pubsub_publish("fusenode/test", payload)
            msg = b.transport.pubsub_next_message(sub_b, timeout=0.5)
            if msg is None:
                return False
            assert msg.sender == env.a_id
            assert msg.data == payload
            assert msg.topics == ("fusenode/test",)
            assert len(msg.seqno) == 8
            return True

        wait_until(delivered, 10)
        own = a.transport.pubsub_next_message(
            sub_a, timeout=2
        )  # a subscriber gets its own messages
        assert own is not None and own.sender == env.a_id

        start = time.monotonic()
        while b.transport.pubsub_next_message(sub_b, timeout=0.05) is not None:
            pass  # drain the extra publishes of the warm-up
        start = time.monotonic()
        assert b.transport.pubsub_next_message(sub_b, timeout=0.3) is None
        assert 0.3 <= time.monotonic() - start < 1.5
    finally:
        a.transport.pubsub_unsubscribe(sub_a)
        b.transport.pubsub_unsubscribe(sub_b)
    with pytest.raises(InvalidArgument):
        b.transport.pubsub_next_message(sub_b, timeout=0.1)
    with pytest.raises(InvalidArgument):
        a.transport.pubsub_publish("fusenode/test", b"x" * (MAX_PUBSUB_MESSAGE + 1))
