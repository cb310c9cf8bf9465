"""The server side of the peer protocol (`fusenode.node.protocol`): an aiohttp app that checks
who is asking before it reads anything else, reads no more than the route allows, hands the
message to the node's `PeerHandler`, and signs every answer.

Order of checks for each request, each refusal answered at once (and the connection closed,
so an unread body is never taken in):

1. the signed headers (`fusenode.node.peerauth.verify_request_headers`): key, peer ID, date
   within the clock window, signature over method, target, nonce, body hash and this node's
   peer ID, nonce never seen (401);
2. the peer accepted by ``[network] accept_from`` (403);
3. Content-Length present for a body (411: a chunked body could not be bounded up front) and
   within the route's limit, `protocol.BODY_LIMITS` (413);
4. for /store, the holder's capacity and the peer's quota for that many bytes, and the
   peer's stores in flight (507);
5. the body, read in pieces up to Content-Length, checked against the signed hash; a store
   must arrive at `protocol.STORE_MIN_RATE` after a grace period (408), so a body that
   trickles in cannot hold a reservation and a connection forever.

Replies are signed for the authenticated requester; a request that fails authentication is
answered unsigned (a signature costs a private-key operation a flood must not buy).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from fusenode.errors import Error
from fusenode.node import protocol
from fusenode.node.peerauth import (
    HEADER_NONCE,
    NonceCache,
    PeerAuthError,
    PeerKey,
    SignedRequest,
    sign_reply,
    verify_request_headers,
)
from fusenode.node.protocol import (
    BadPeerRequest,
    CidList,
    Health,
    PeerList,
    Receipt,
    StoreTooSlow,
)
from fusenode.storage.backend import validate_cid
from fusenode.storage.errors import InvalidArgument

if TYPE_CHECKING:
    from fusenode.node.gc import Gate

__all__ = ["PeerHandler", "create_peer_app"]

log = logging.getLogger(__name__)

_READ = 256 * 1024


def _key(name: str, kind: type) -> object:
    # aiohttp >= 3.12 wants typed request keys; older ones take a plain string.
    return web.RequestKey(name, kind) if hasattr(web, "RequestKey") else name


REQUESTER = _key("requester", str)
SIGNED = _key("signed", SignedRequest)
LENGTH = _key("length", int)


class PeerHandler(Protocol):
    """What this node does for peers (`fusenode.node.holder.Holder`)."""

    peer_id: str
    key: PeerKey

    def health(self) -> Health: ...

    def known_peers(self, requester: str) -> PeerList: ...

    def held(self, cids: list[str]) -> set[str]: ...

    async def unpin_for(self, owner: str, cids: list[str]) -> list[str]: ...

    async def release_for(self, owner: str, cids: list[str]) -> list[str]:
        """Raise `protocol.NotOwner` when ``cids`` name a hold of another node."""
        ...

    def renew_for(self, owner: str, cids: list[str]) -> list[str]: ...

    #: How long this node keeps a hold without renewal (told to owners in renew replies, so
    #: they renew in time); None: not told.
    lease_seconds: float | None

    def admit(self, owner: str, cid: str, size: int) -> None:
        """Raise `protocol.OverCapacity` unless ``owner`` may store ``cid`` (``size`` bytes)."""
        ...

    async def store_for(
        self, owner: str, expected: str, size: int, chunks: AsyncIterator[bytes]
    ) -> Receipt: ...

    async def block(self, cid: str) -> bytes | None: ...


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


async def _body_chunks(request: web.Request, length: int, digest: str) -> AsyncIterator[bytes]:
    """The request's body in pieces, exactly ``length`` bytes; raises `BadPeerRequest` when it
    ends early or does not hash to the signed ``digest`` (after the last piece)."""
    h = hashlib.sha256()
    left = length
    while True:
        chunk = await request.content.read(min(_READ, left)) if left else b""
        if left and not chunk:
            raise BadPeerRequest(f"the body ended {left} bytes short of its Content-Length")
        h.update(chunk)
        left -= len(chunk)
        # The last piece is handed over only once the whole body is known to be the signed one.
        if not left and not hmac.compare_digest(h.hexdigest(), digest):
            raise BadPeerRequest("the body is not the one signed")
        if chunk:
            yield chunk
        if not left:
            return


async def _read_body(request: web.Request) -> bytes:
    signed: SignedRequest = request[SIGNED]  # type: ignore[index]
    parts = [c async for c in _body_chunks(request, request[LENGTH], signed.body_sha256)]  # type: ignore[index]
    return b"".join(parts)


def create_peer_app(
    node: PeerHandler,
    accept_from: tuple[str, ...],
    nonces: NonceCache | None = None,
    gate: Gate | None = None,
) -> web.Application:
    """The peer API of ``node``; ``accept_from`` is ``[network] accept_from``; ``gate``: the
    node's (a request waits while a garbage collection runs)."""
    nonces = nonces or NonceCache()

    def signed_reply(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        """Sign ``resp`` for the authenticated requester (never for an unauthenticated one:
        a signature costs a private-key operation a flood must not be able to buy)."""
        requester = request.get(REQUESTER)  # type: ignore[call-overload]
        if isinstance(resp, web.Response) and requester:
            nonce = request.headers.get(HEADER_NONCE, "")
            body = resp.body or b""
            resp.headers.update(sign_reply(node.key, requester, nonce, resp.status, body))  # type: ignore[arg-type]
        return resp

    def refuse(request: web.Request, status: int, kind: str, message: str) -> web.StreamResponse:
        resp = _error(status, kind, message)
        resp.force_close()  # whatever body is left unread is never taken in
        return signed_reply(request, resp)

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            # audience: a request signed for another node cannot be replayed to this one.
            signed = verify_request_headers(
                request.headers, request.method, request.raw_path, audience=node.peer_id
            )
        except PeerAuthError as e:
            return refuse(request, 401, "PeerAuthError", str(e))
        peer = signed.peer_id
        if "*" not in accept_from and peer not in accept_from:
            return refuse(request, 403, "Forbidden", f"peer {peer} is not accepted")
        # Only an accepted peer's nonces are remembered: others cannot fill the cache.
        try:
            if not nonces.accept(peer, signed.nonce):
                raise PeerAuthError(f"request {signed.nonce} was already received: a replay")
        except PeerAuthError as e:
            return refuse(request, 401, "PeerAuthError", str(e))
        request[REQUESTER] = peer  # type: ignore[index]
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            # Content-Length would bound only the compressed size.
            return refuse(request, 415, "UnsupportedMediaType", "compressed bodies are refused")
        missing = request.match_info.http_exception  # no such route, or not that method
        if missing is not None:
            return refuse(request, missing.status, type(missing).__name__, missing.reason)
        limit = protocol.BODY_LIMITS.get((request.method, request.path), 0)
        length = request.content_length
        if length is None and request.body_exists:
            return refuse(request, 411, "LengthRequired", "a request body needs Content-Length")
        if (length or 0) > limit:
            return refuse(
                request, 413, "TooLarge", f"body of {length} bytes; this route takes {limit}"
            )
        request[SIGNED] = signed  # type: ignore[index]
        request[LENGTH] = length or 0  # type: ignore[index]
        try:
            if gate is None:
                resp = await handler(request)
            else:
                async with gate.op():
                    resp = await handler(request)
        except web.HTTPException as e:
            return refuse(request, e.status, type(e).__name__, e.reason)
        except Error as e:
            return refuse(request, e.http_status, type(e).__name__, str(e))
        except Exception:  # the daemon keeps serving, and tells a peer nothing of its insides
            log.exception("peer request %s %s failed", request.method, request.path)
            return refuse(request, 500, "InternalError", "internal error in the peer's daemon")
        return signed_reply(request, resp)

    async def cids_of(request: web.Request) -> list[str]:
        return list(CidList.parse(await _read_body(request)).cids)

    def query_cid(request: web.Request) -> str:
        try:
            return validate_cid(request.query.get("cid", ""))
        except InvalidArgument as e:
            raise BadPeerRequest(str(e)) from None

    async def health(request: web.Request) -> web.Response:
        return web.json_response(node.health().body())

    async def peers(request: web.Request) -> web.Response:
        return web.json_response(node.known_peers(request[REQUESTER]).body())  # type: ignore[index]

    async def has(request: web.Request) -> web.Response:
        held = node.held(await cids_of(request))
        return web.json_response(CidList(tuple(sorted(held))).body("held"))

    async def unpin(request: web.Request) -> web.Response:
        released = await node.unpin_for(request[REQUESTER], await cids_of(request))  # type: ignore[index]
        return web.json_response(CidList(tuple(released)).body("released"))

    async def release(request: web.Request) -> web.Response:
        released = await node.release_for(request[REQUESTER], await cids_of(request))  # type: ignore[index]
        return web.json_response(CidList(tuple(released)).body("released"))

    async def renew(request: web.Request) -> web.Response:
        renewed = node.renew_for(request[REQUESTER], await cids_of(request))  # type: ignore[index]
        body: dict[str, Any] = dict(CidList(tuple(renewed)).body("renewed"))
        if node.lease_seconds is not None:
            body["lease_seconds"] = node.lease_seconds
        return web.json_response(body)

    async def store(request: web.Request) -> web.Response:
        expected = query_cid(request)
        owner: str = request[REQUESTER]  # type: ignore[index]
        size: int = request[LENGTH]  # type: ignore[index]
        node.admit(owner, expected, size)  # before a byte is read
        signed: SignedRequest = request[SIGNED]  # type: ignore[index]
        chunks = _body_chunks(request, size, signed.body_sha256)
        # A body that trickles in would hold its reservation (and a connection) forever.
        deadline = protocol.STORE_GRACE + size / protocol.STORE_MIN_RATE
        try:
            async with asyncio.timeout(deadline):
                receipt = await node.store_for(owner, expected, size, chunks)
        except TimeoutError:
            raise StoreTooSlow(
                f"{size} bytes did not arrive within {deadline:.0f} s (at least "
                f"{protocol.STORE_MIN_RATE // 1024} KiB/s after {protocol.STORE_GRACE:.0f} s)"
            ) from None
        return web.json_response(receipt.body())

    async def block(request: web.Request) -> web.Response:
        cid = query_cid(request)
        data = await node.block(cid)
        if data is None:
            return _error(404, "NotFound", f"block {cid} is not in this node's blockstore")
        return web.Response(body=data, content_type="application/octet-stream")

    # client_max_size: nothing here calls request.read(); bodies are read in bounded pieces.
    app = web.Application(middlewares=[guard], client_max_size=protocol.MAX_BODY)
    app.router.add_get(protocol.HEALTH, health)
    app.router.add_get(protocol.PEERS, peers)
    app.router.add_post(protocol.HAS, has)
    app.router.add_post(protocol.UNPIN, unpin)
    app.router.add_post(protocol.RELEASE, release)
    app.router.add_post(protocol.RENEW, renew)
    app.router.add_post(protocol.STORE, store)
    app.router.add_get(protocol.BLOCK, block)
    return app
