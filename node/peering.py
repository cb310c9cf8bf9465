"""How daemons ask each other to pin, and how they decide whom to accept requests from.

Transport: HTTP/1.1 tunnelled through libp2p streams (Kubo stream mounting, protocol
:data:`PROTOCOL`). Each daemon serves its *peer API* on a private 127.0.0.1 port and exposes it
with ``p2p_listen``; to call peer X, a daemon opens ``p2p_forward`` from a local port to X's
peer ID and speaks HTTP to that port. Peers are therefore addressed by libp2p peer ID alone,
and the answering side is authenticated by libp2p's secure channel (we dialled its peer ID).

Requester authentication: every request carries a signature made with the sender's libp2p
private key over method, path, date and body hash (node.peerauth). The receiver derives the
peer ID from the public key sent along, checks it equals the claimed one, checks the signature
and the clock skew; only then is the request considered to come from that peer ID. Whether it
is *accepted* is configuration: ``[network] accept_from`` (``["*"]``: any authenticated peer,
or a list of peer IDs).

Why not PubSub with receipts: Kubo's PubSub drops messages in bursts and has no
request/response; HTTP gives status codes, bodies and timeouts for free.

Peer API (all JSON, all signed):

    GET  /peer/v1/health           -> {"peer_id": ..., "addresses": [...]}
    POST /peer/v1/pin   {"cids"}   -> {"pinned": [...]}   fetch from peers, pin, remember owner
    POST /peer/v1/has   {"cids"}   -> {"held": [...]}     which of these this node holds
    POST /peer/v1/unpin {"cids"}   -> {"released": [...]} drop the caller's holds
    POST /peer/v1/store?cid=CID    -> {"cid": CID}        body: a fragment's bytes; add, pin,
                                                          hold; refused unless it hashes to CID

Every request is idempotent, so a client retries one whose answer was lost (a reply can be
lost through a tunnel when a stream closes early).

Why /store: with /pin the placing node must first add every fragment to its own blockstore
for the holder to fetch over bitswap; Kubo has no garbage collection, so the placing node
would keep every fragment it gave away (2.75x on disk instead of 1.5x). Streaming the bytes
to the holder stores each fragment once, where it belongs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from fusenode.node.errors import NodeError

PROTOCOL = "/x/fusenode/peer/1"
MAX_BODY = 1 << 20
#: Largest fragment streamed with /peer/v1/store (bigger ones go through /pin and bitswap).
MAX_FRAGMENT = 256 << 20
log = logging.getLogger("fusenode.peering")


class PeerUnreachable(NodeError):
    """A peer did not answer (down, disconnected, or its daemon is not running)."""


class PeerRefused(NodeError):
    """A peer answered with an error."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- server ------------------------------------------------------------------------------------

# aiohttp >= 3.12 wants typed request keys; older ones take a plain string.
REQUESTER = web.RequestKey("requester", str) if hasattr(web, "RequestKey") else "requester"


def create_peer_app(node: Any, accept_from: tuple[str, ...]) -> web.Application:
    """The peer API; ``node`` is the daemon's service (node.service.NodeService)."""
    from fusenode.node.peerauth import PeerAuthError, verify_request

    @web.middleware
    async def authenticate(request: web.Request, handler):
        body = await request.read()
        try:
            # audience: a request signed for another node cannot be replayed to this one.
            peer = verify_request(
                request.headers, request.method, request.raw_path, body, audience=node.peer_id
            )
        except PeerAuthError as e:
            return web.json_response(
                {"error": {"type": "PeerAuthError", "message": str(e)}}, status=401
            )
        if "*" not in accept_from and peer not in accept_from:
            return web.json_response(
                {"error": {"type": "Forbidden", "message": f"peer {peer} is not accepted"}},
                status=403,
            )
        request[REQUESTER] = peer  # type: ignore[index]
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response(
                {"error": {"type": "BadRequest", "message": str(e)}}, status=400
            )
        except Exception as e:  # the daemon keeps serving
            log.exception("peer request %s %s failed", request.method, request.path)
            return web.json_response(
                {"error": {"type": type(e).__name__, "message": str(e)}}, status=500
            )

    async def cids_of(request: web.Request) -> list[str]:
        from fusenode.storage.backend import validate_cid

        if (request.content_length or 0) > MAX_BODY:
            raise ValueError(f"body over {MAX_BODY} bytes")
        data = json.loads(await request.read() or b"{}")
        if not isinstance(data, dict) or not isinstance(data.get("cids"), list):
            raise ValueError('body must be {"cids": [...]}')
        return [validate_cid(c) for c in data["cids"]]

    async def health(request: web.Request) -> web.Response:
        node.state.peer_answered(request[REQUESTER])  # type: ignore[index]
        return web.json_response({"peer_id": node.peer_id, "addresses": node.addresses})

    async def pin(request: web.Request) -> web.Response:
        cids = await cids_of(request)
        pinned = await node.pin_for(request[REQUESTER], cids)  # type: ignore[index]
        return web.json_response({"pinned": pinned})

    async def has(request: web.Request) -> web.Response:
        cids = await cids_of(request)
        return web.json_response({"held": sorted(node.state.held(cids))})

    async def unpin(request: web.Request) -> web.Response:
        cids = await cids_of(request)
        released = await node.unpin_for(request[REQUESTER], cids)  # type: ignore[index]
        return web.json_response({"released": released})

    async def store(request: web.Request) -> web.Response:
        from fusenode.storage.backend import validate_cid

        expected = validate_cid(request.query.get("cid", ""))
        data = await request.read()  # already read (and its hash signed) by the middleware
        cid = await node.store_for(request[REQUESTER], expected, data)  # type: ignore[index]
        return web.json_response({"cid": cid})

    app = web.Application(middlewares=[authenticate], client_max_size=MAX_FRAGMENT + 4096)
    app.router.add_get("/peer/v1/health", health)
    app.router.add_post("/peer/v1/pin", pin)
    app.router.add_post("/peer/v1/has", has)
    app.router.add_post("/peer/v1/unpin", unpin)
    app.router.add_post("/peer/v1/store", store)
    return app


# -- client ------------------------------------------------------------------------------------


class PeerClient:
    """Signed requests to other daemons through libp2p stream forwards (one per peer)."""

    def __init__(self, kubo: Any, key: Any) -> None:
        self.kubo = kubo
        self.key = key
        self._ports: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._session: ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _port(self, peer_id: str) -> int:
        async with self._lock:
            port = self._ports.get(peer_id)
            if port is None:
                port = free_port()
                await asyncio.to_thread(
                    self.kubo.transport.p2p_forward, PROTOCOL, f"/ip4/127.0.0.1/tcp/{port}", peer_id
                )
                self._ports[peer_id] = port
            return port

    async def call(
        self,
        peer_id: str,
        method: str,
        path: str,
        body: dict | None = None,
        timeout: float = 10.0,
        *,
        raw: bytes | None = None,
        attempts: int = 1,
    ) -> dict:
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

    async def _call_once(self, peer_id, method, path, body, timeout, raw) -> dict:
        from fusenode.node.peerauth import sign_request
        from yarl import URL

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
                URL(f"http://127.0.0.1:{port}{path}", encoded=True),
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
        if status >= 400:
            message = payload.get("error", {}).get("message", text[:200])
            if status >= 500 and "p2p" in message.lower():
                raise PeerUnreachable(f"peer {peer_id} did not answer: {message}")
            raise PeerRefused(f"peer {peer_id} refused {path}: {message} (HTTP {status})")
        return payload
