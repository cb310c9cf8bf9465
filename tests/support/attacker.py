"""A hostile peer for tests on real daemons: its own embedded Kubo node and libp2p key, speaking
the peer protocol by hand (raw HTTP through a libp2p stream forward), so it can do what an
honest daemon never does: send unsigned or replayed requests, lie about sizes, stream huge
bodies, hammer a node with stores, publish announcements."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from pathlib import Path

from fusenode.node import protocol
from fusenode.node.peerauth import sign_request
from fusenode.node.peerkeys import load_private_key
from fusenode.storage.kubo import KuboNode, create_repo
from fusenode.system import free_loopback_port


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class Attacker:
    """``Attacker(tmp, victim_multiaddr)``: joined to the network through one node."""

    def __init__(self, root: Path, join: str) -> None:
        create_repo(root, free_loopback_port())
        self.kubo = KuboNode(root)
        self.key = load_private_key(root / "kubo")
        self.peer_id = self.key.peer_id
        self.kubo.connect(join, 20.0)
        self._ports: dict[str, int] = {}

    def close(self) -> None:
        self.kubo.close()

    def port(self, peer_id: str) -> int:
        if peer_id not in self._ports:
            port = free_loopback_port()
            self.kubo.transport.p2p_forward(
                protocol.PROTOCOL, f"/ip4/127.0.0.1/tcp/{port}", peer_id
            )
            self._ports[peer_id] = port
        return self._ports[peer_id]

    def signed(self, peer_id: str, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        return sign_request(self.key, method, path, body, audience=peer_id)

    def request(
        self,
        peer_id: str,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Reply:
        """One request as given (sign it with `signed` first for a signed one)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port(peer_id), timeout=timeout)
        try:
            conn.request(method, path, body=body or None, headers=headers or {})
            resp = conn.getresponse()
            return Reply(resp.status, dict(resp.getheaders()), resp.read())
        finally:
            conn.close()

    def call(self, peer_id: str, method: str, path: str, body: bytes = b"") -> Reply:
        """A properly signed request, as an honest peer would send it. Like the daemon's own
        client, it tries again (signed afresh, at most twice) when the stream through Kubo
        closes before any answer: on a loaded machine the first stream over a connection
        just made can be reset before it reaches the node."""
        for attempt in range(3):
            headers = self.signed(peer_id, method, path, body)
            if body:
                headers["Content-Type"] = "application/octet-stream"
            try:
                return self.request(peer_id, method, path, body, headers=headers)
            except (http.client.RemoteDisconnected, ConnectionResetError):
                if attempt == 2:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def stream(
        self,
        peer_id: str,
        path: str,
        headers: dict[str, str],
        total: int,
        *,
        chunk: int = 1 << 20,
        timeout: float = 60.0,
    ) -> tuple[int, Reply | None]:
        """POST ``total`` bytes in pieces; (bytes the node took before it stopped reading,
        its reply if one came back)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port(peer_id), timeout=timeout)
        sent = 0
        try:
            conn.putrequest("POST", path, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            piece = b"\0" * chunk
            try:
                while sent < total:
                    conn.send(piece[: min(chunk, total - sent)])
                    sent += min(chunk, total - sent)
            except OSError:
                pass  # the node closed the connection: it stopped reading
            try:
                resp = conn.getresponse()
                return sent, Reply(resp.status, dict(resp.getheaders()), resp.read())
            except (OSError, http.client.HTTPException):
                return sent, None
        finally:
            conn.close()
