"""The typed client of the peer protocol (`fusenode.node.protocol`): signed requests to other
daemons through libp2p stream forwards, one forward per peer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector
from yarl import URL

from fusenode import defaults
from fusenode.node import protocol
from fusenode.node.aio import AsyncTransport
from fusenode.node.peerauth import PeerKey, sign_request
from fusenode.node.protocol import CidList, Health, PeerList, PeerRefused, PeerUnreachable
from fusenode.system import free_loopback_port

__all__ = ["PeerClient"]


class PeerClient:
    """Calls other daemons' peer APIs, signed with this node's libp2p key."""

    def __init__(self, transport: AsyncTransport, key: PeerKey) -> None:
        self.transport = transport
        self.key = key
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

    async def pin(self, peer_id: str, cids: list[str], timeout: float, attempts: int = 1) -> None:
        body = CidList(tuple(cids)).body()
        await self.call(peer_id, "POST", protocol.PIN, body, timeout=timeout, attempts=attempts)

    async def has(self, peer_id: str, cids: list[str]) -> set[str]:
        reply = await self.call(peer_id, "POST", protocol.HAS, CidList(tuple(cids)).body())
        return set(CidList.parse(reply, "held").cids)

    async def unpin(self, peer_id: str, cids: list[str]) -> set[str]:
        reply = await self.call(peer_id, "POST", protocol.UNPIN, CidList(tuple(cids)).body())
        return set(CidList.parse(reply, "released").cids)

    async def store(
        self, peer_id: str, cid: str, data: bytes, timeout: float, attempts: int = 1
    ) -> None:
        path = f"{protocol.STORE}?cid={cid}"
        await self.call(peer_id, "POST", path, raw=data, timeout=timeout, attempts=attempts)

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
        raw: bytes | None = None,
        attempts: int = 1,
    ) -> dict[str, Any]:
        """One signed request; ``attempts`` > 1 retries it when no answer came back (every
        peer endpoint is idempotent, and a reply can be lost when a tunnel stream closes)."""
        for attempt in range(attempts):
            try:
                return await self._call_once(peer_id, method, path, body, timeout, raw)
            except PeerUnreachable:
                if attempt + 1 >= attempts:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _call_once(
        self,
        peer_id: str,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        timeout: float,
        raw: bytes | None,
    ) -> dict[str, Any]:
        if self._session is None:
            # No keep-alive: a pooled connection through a tunnel dies silently when the far
            # node restarts; a fresh stream per request costs ~2 ms on loopback.
            self._session = ClientSession(connector=TCPConnector(force_close=True))
        if raw is not None:
            data, content_type = raw, "application/octet-stream"
        else:
            data = json.dumps(body).encode() if body is not None else b""
            content_type = "application/json"
        headers = sign_request(self.key, method, path, data, audience=peer_id)
        headers["Content-Type"] = content_type
        try:
            port = await self._port(peer_id)
            async with self._session.request(
                method,
                URL(f"http://127.0.0.1:{port}{path}", encoded=True),  # as signed: no re-quoting
                data=data,
                headers=headers,
                timeout=ClientTimeout(total=timeout),
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (ClientError, TimeoutError, OSError) as e:
            raise PeerUnreachable(f"peer {peer_id} did not answer: {e or type(e).__name__}") from e
        except Exception as e:  # a Kubo error creating the forward
            raise PeerUnreachable(f"peer {peer_id} unreachable: {e}") from e
        try:
            payload = json.loads(text) if text else {}
        except ValueError:
            payload = {"error": {"message": text[:200]}}
        if not isinstance(payload, dict):
            payload = {"error": {"message": text[:200]}}
        if status >= 400:
            error = payload.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            message = message if isinstance(message, str) else text[:200]
            if status >= 500 and "p2p" in message.lower():
                raise PeerUnreachable(f"peer {peer_id} did not answer: {message}")
            raise PeerRefused(f"peer {peer_id} refused {path}: {message} (HTTP {status})")
        return payload
