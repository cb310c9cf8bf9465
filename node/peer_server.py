"""The server side of the peer protocol (`fusenode.node.protocol`): an aiohttp app that checks
who is asking, parses the message, and hands it to the node's `PeerHandler`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from fusenode.errors import Error
from fusenode.node import protocol
from fusenode.node.peerauth import PeerAuthError, verify_request
from fusenode.node.protocol import BadPeerRequest, CidList, Health, PeerList, Stored
from fusenode.storage.backend import validate_cid
from fusenode.storage.errors import InvalidArgument

__all__ = ["PeerHandler", "create_peer_app"]

log = logging.getLogger(__name__)

# aiohttp >= 3.12 wants typed request keys; older ones take a plain string.
REQUESTER = web.RequestKey("requester", str) if hasattr(web, "RequestKey") else "requester"


class PeerHandler(Protocol):
    """What this node does for peers (`fusenode.node.holder.Holder`)."""

    peer_id: str

    def health(self, requester: str) -> Health: ...

    def known_peers(self, requester: str) -> PeerList: ...

    async def pin_for(self, owner: str, cids: list[str]) -> list[str]: ...

    def held(self, cids: list[str]) -> set[str]: ...

    async def unpin_for(self, owner: str, cids: list[str]) -> list[str]: ...

    async def store_for(self, owner: str, expected: str, data: bytes) -> str: ...


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


def create_peer_app(node: PeerHandler, accept_from: tuple[str, ...]) -> web.Application:
    """The peer API of ``node``; ``accept_from`` is ``[network] accept_from``."""

    @web.middleware
    async def authenticate(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        body = await request.read()
        try:
            # audience: a request signed for another node cannot be replayed to this one.
            peer = verify_request(
                request.headers, request.method, request.raw_path, body, audience=node.peer_id
            )
        except PeerAuthError as e:
            return _error(401, "PeerAuthError", str(e))
        if "*" not in accept_from and peer not in accept_from:
            return _error(403, "Forbidden", f"peer {peer} is not accepted")
        request[REQUESTER] = peer  # type: ignore[index]
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Error as e:
            return _error(e.http_status, type(e).__name__, str(e))
        except Exception:  # the daemon keeps serving, and tells a peer nothing of its insides
            log.exception("peer request %s %s failed", request.method, request.path)
            return _error(500, "InternalError", "internal error in the peer's daemon")

    async def cids_of(request: web.Request) -> list[str]:
        if (request.content_length or 0) > protocol.MAX_BODY:
            raise BadPeerRequest(f"body over {protocol.MAX_BODY} bytes")
        return list(CidList.parse(await request.read()).cids)

    async def health(request: web.Request) -> web.Response:
        return web.json_response(node.health(request[REQUESTER]).body())  # type: ignore[index]

    async def peers(request: web.Request) -> web.Response:
        return web.json_response(node.known_peers(request[REQUESTER]).body())  # type: ignore[index]

    async def pin(request: web.Request) -> web.Response:
        pinned = await node.pin_for(request[REQUESTER], await cids_of(request))  # type: ignore[index]
        return web.json_response(CidList(tuple(pinned)).body("pinned"))

    async def has(request: web.Request) -> web.Response:
        held = node.held(await cids_of(request))
        return web.json_response(CidList(tuple(sorted(held))).body("held"))

    async def unpin(request: web.Request) -> web.Response:
        released = await node.unpin_for(request[REQUESTER], await cids_of(request))  # type: ignore[index]
        return web.json_response(CidList(tuple(released)).body("released"))

    async def store(request: web.Request) -> web.Response:
        try:
            expected = validate_cid(request.query.get("cid", ""))
        except InvalidArgument as e:
            raise BadPeerRequest(str(e)) from None
        data = await request.read()  # already read (and its hash signed) by the middleware
        cid = await node.store_for(request[REQUESTER], expected, data)  # type: ignore[index]
        return web.json_response(Stored(cid).body())

    app = web.Application(middlewares=[authenticate], client_max_size=protocol.MAX_FRAGMENT + 4096)
    app.router.add_get(protocol.HEALTH, health)
    app.router.add_get(protocol.PEERS, peers)
    app.router.add_post(protocol.PIN, pin)
    app.router.add_post(protocol.HAS, has)
    app.router.add_post(protocol.UNPIN, unpin)
    app.router.add_post(protocol.STORE, store)
    return app
