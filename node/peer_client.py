"""The typed client of the peer protocol (`fusenode.node.protocol`): signed requests to other
daemons through libp2p stream forwards, one forward per peer, and only signed replies
believed.

Each reply is read up to its route's bound (`protocol.MAX_REPLY`, `protocol.MAX_BLOCK_REPLY`)
and must carry the signature of the peer that was called over this request's nonce, its
status and its body (`fusenode.node.peerauth.verify_reply`); anything else, whoever sent it
(a local process on the forward's port while the tunnel was down, say), is treated as no
answer at all.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import ClientError, ClientResponse, ClientSession, ClientTimeout, TCPConnector
from yarl import URL

from fusenode import defaults
from fusenode.node import protocol
from fusenode.node.aio import AsyncTransport
from fusenode.node.peerauth import (
    HEADER_KEY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    PeerAuthError,
    PeerKey,
    sign_request,
    verify_reply,
)
from fusenode.node.protocol import (
    CidList,
    Health,
    PeerList,
    PeerOverCapacity,
    PeerRefused,
    PeerUnreachable,
    Receipt,
)
from fusenode.system import free_loopback_port

if TYPE_CHECKING:
    from fusenode.node.gc import Gate

__all__ = ["PeerClient", "SignedReceipt"]


@dataclass(frozen=True)
class SignedReceipt:
    """A holder's signed receipt as kept by the placing node: the reply body, the request
    nonce it answers, and the holder's key and signature (anyone can check it with
    `fusenode.node.peerauth.verify_reply`, status 200)."""

    receipt: Receipt
    body: bytes
    nonce: str
    key: str
    signature: str

    def record(self) -> str:
        return json.dumps(
            {
                "body": base64.b64encode(self.body).decode(),
                "nonce": self.nonce,
                "key": self.key,
                "signature": self.signature,
            },
            sort_keys=True,
        )


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    data: bytes = b""
    content_type: str = ""
    timeout: float = defaults.PEER_CALL_TIMEOUT


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    nonce: str
    headers: dict[str, str]


class PeerClient:
    """Calls other daemons' peer APIs, signed with this node's libp2p key."""

    def __init__(self, transport: AsyncTransport, key: PeerKey, gate: Gate | None = None) -> None:
        self.transport = transport
        self.key = key
        self.gate = gate  # the node's: no call starts while a garbage collection runs
        self._ports: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._session: ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- the protocol's requests -------------------------------------------------------------

    async def health(self, peer_id: str, timeout: float = defaults.HEALTH_TIMEOUT) -> Health:
        return Health.parse(await self.call(peer_id, "GET", protocol.HEALTH, timeout=timeout))

    async def peers(self, peer_id: str) -> PeerList:
        """The fusenode peers ``peer_id`` has seen answer lately (peer exchange)."""
        return PeerList.parse(await self.call(peer_id, "GET", protocol.PEERS))

    async def has(self, peer_id: str, cids: list[str]) -> set[str]:
        return await self._cid_lists(peer_id, protocol.HAS, cids, "held")

    async def unpin(self, peer_id: str, cids: list[str]) -> set[str]:
        return await self._cid_lists(peer_id, protocol.UNPIN, cids, "released")

    async def release(self, peer_id: str, cids: list[str]) -> set[str]:
        """Ask ``peer_id`` to drop our holds of ``cids`` (refused for a CID we did not place
        there); which ones it released."""
        return await self._cid_lists(peer_id, protocol.RELEASE, cids, "released")

    async def renew(self, peer_id: str, cids: list[str]) -> tuple[set[str], float | None]:
        """Renew our leases on ``cids`` at ``peer_id``: which ones it holds for us, and how
        long its leases last (None when it did not say, or said nonsense)."""
        renewed: set[str] = set()
        lease: float | None = None
        for i in range(0, len(cids), protocol.MAX_CIDS):
            chunk = CidList(tuple(cids[i : i + protocol.MAX_CIDS])).body()
            reply = await self.call(peer_id, "POST", protocol.RENEW, chunk)
            renewed |= set(CidList.parse(reply, "renewed").cids)
            said = reply.get("lease_seconds") if isinstance(reply, dict) else None
            number = isinstance(said, int | float) and not isinstance(said, bool)
            if number and math.isfinite(said) and said > 0:  # type: ignore[arg-type]
                lease = float(said)  # type: ignore[arg-type]
        return renewed, lease

    async def _cid_lists(self, peer_id: str, path: str, cids: list[str], key: str) -> set[str]:
        """POST ``cids`` in requests of at most `protocol.MAX_CIDS`; the union of the replies'
        ``key`` lists."""
        out: set[str] = set()
        for i in range(0, len(cids), protocol.MAX_CIDS):
            chunk = CidList(tuple(cids[i : i + protocol.MAX_CIDS])).body()
            reply = await self.call(peer_id, "POST", path, chunk)
            out |= set(CidList.parse(reply, key).cids)
        return out

    async def store(
        self, peer_id: str, cid: str, data: bytes, timeout: float, attempts: int = 1
    ) -> SignedReceipt:
        """Stream a fragment (or manifest) to ``peer_id``; its signed receipt. Raises
        `PeerOverCapacity` when the peer will not hold that much more for us."""
        path = f"{protocol.STORE}?cid={cid}"
        request = _Request("POST", path, data, "application/octet-stream", timeout)
        reply = await self._retrying(peer_id, request, attempts)
        payload = self._checked(peer_id, path, reply)
        receipt = Receipt.parse(payload)
        if receipt.cid != cid or receipt.size != len(data):
            raise PeerRefused(
                f"peer {peer_id} acknowledged {receipt.cid} ({receipt.size} bytes), "
                f"not {cid} ({len(data)} bytes)"
            )
        return SignedReceipt(
            receipt,
            reply.body,
            reply.nonce,
            reply.headers.get(HEADER_KEY.lower(), ""),
            reply.headers.get(HEADER_SIGNATURE.lower(), ""),
        )

    async def block(
        self, peer_id: str, cid: str, timeout: float = defaults.AUDIT_TIMEOUT
    ) -> bytes | None:
        """The raw bytes of block ``cid`` from ``peer_id``'s own blockstore; None when it
        answers that it has not got it. The caller checks the bytes against the CID."""
        path = f"{protocol.BLOCK}?cid={cid}"
        reply = await self._retrying(peer_id, _Request("GET", path, timeout=timeout), 1)
        if reply.status == 404:
            return None
        if reply.status != 200:
            self._checked(peer_id, path, reply)
        return reply.body

    # -- transport ---------------------------------------------------------------------------

    async def _port(self, peer_id: str) -> int:
        async with self._lock:
            port = self._ports.get(peer_id)
            if port is None:
                port = free_loopback_port()
                listen = f"/ip4/127.0.0.1/tcp/{port}"
                await self.transport.p2p_forward(protocol.PROTOCOL, listen, peer_id)
                self._ports[peer_id] = port
            return port

    async def call(
        self,
        peer_id: str,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float = defaults.PEER_CALL_TIMEOUT,
        *,
        attempts: int = 1,
    ) -> dict[str, Any]:
        """One signed JSON request and its checked JSON answer; ``attempts`` > 1 retries it
        when no answer came back (every peer endpoint is idempotent, and a reply can be lost
        when a tunnel stream closes)."""
        data = json.dumps(body).encode() if body is not None else b""
        content_type = "application/json" if body is not None else ""
        request = _Request(method, path, data, content_type, timeout)
        return self._checked(peer_id, path, await self._retrying(peer_id, request, attempts))

    async def _retrying(self, peer_id: str, request: _Request, attempts: int) -> _Reply:
        if self.gate is None:
            return await self._attempts(peer_id, request, attempts)
        async with self.gate.op():
            return await self._attempts(peer_id, request, attempts)

    async def _attempts(self, peer_id: str, request: _Request, attempts: int) -> _Reply:
        for attempt in range(attempts):
            try:
                return await self._call_once(peer_id, request)
            except PeerUnreachable:
                if attempt + 1 >= attempts:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    @staticmethod
    def _checked(peer_id: str, path: str, reply: _Reply) -> dict[str, Any]:
        """The JSON object of a reply; an error status raised as `PeerRefused`."""
        text = reply.body.decode("utf-8", "replace")
        try:
            payload = json.loads(text) if text else {}
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            if reply.status < 400:
                raise PeerRefused(f"peer {peer_id} answered {path} with something not JSON")
            payload = {}
        if reply.status >= 400:
            error = payload.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            message = message[:500] if isinstance(message, str) else text[:200]
            kind = PeerOverCapacity if reply.status == 507 else PeerRefused
            raise kind(f"peer {peer_id} refused {path}: {message} (HTTP {reply.status})")
        return payload

    async def _call_once(self, peer_id: str, request: _Request) -> _Reply:
        method, path, data = request.method, request.path, request.data
        if self._session is None:
            # No keep-alive: a pooled connection through a tunnel dies silently when the far
            # node restarts; a fresh stream per request costs ~2 ms on loopback.
            # No decompression: a reply is bounded by the bytes that arrive, not what they
            # would inflate to.
            self._session = ClientSession(
                connector=TCPConnector(force_close=True), auto_decompress=False
            )
        headers = sign_request(self.key, method, path, data, audience=peer_id)
        nonce = headers[HEADER_NONCE]
        if request.content_type:
            headers["Content-Type"] = request.content_type
        limit = protocol.MAX_BLOCK_REPLY if path.startswith(protocol.BLOCK) else protocol.MAX_REPLY
        try:
            port = await self._port(peer_id)
            async with self._session.request(
                method,
                URL(f"http://127.0.0.1:{port}{path}", encoded=True),  # as signed: no re-quoting
                # BytesIO: aiohttp streams it (with its Content-Length) without a warning.
                data=io.BytesIO(data) if method != "GET" else None,
                headers=headers,
                timeout=ClientTimeout(total=request.timeout),
            ) as resp:
                body = await _read_bounded(resp, limit)
                status = resp.status
                # Lower-cased names: HTTP header names are case-insensitive.
                reply_headers = {k.lower(): v for k, v in resp.headers.items()}
        except (ClientError, TimeoutError, OSError) as e:
            raise PeerUnreachable(f"peer {peer_id} did not answer: {e or type(e).__name__}") from e
        except PeerUnreachable:
            raise
        except Exception as e:  # a Kubo error creating the forward
            raise PeerUnreachable(f"peer {peer_id} unreachable: {e}") from e
        try:
            verify_reply(reply_headers, peer_id, self.key.peer_id, nonce, status, body)
        except PeerAuthError as e:
            # Not the peer's answer to us (a tunnel error page, someone else on the port, or
            # a refusal of our signature, which is answered unsigned): as if nothing had come
            # back, with what it said.
            said = body[:200].decode("utf-8", "replace")
            raise PeerUnreachable(
                f"no authentic answer from peer {peer_id} ({e}); HTTP {status}: {said}"
            ) from None
        return _Reply(status, body, nonce, reply_headers)


async def _read_bounded(resp: ClientResponse, limit: int) -> bytes:
    """At most ``limit`` bytes of a reply body; more is an answer not worth reading."""
    if resp.content_length is not None and resp.content_length > limit:
        raise PeerUnreachable(f"reply of {resp.content_length} bytes, over the {limit} allowed")
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.read(64 * 1024)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            raise PeerUnreachable(f"reply over the {limit} bytes allowed")
        parts.append(chunk)
