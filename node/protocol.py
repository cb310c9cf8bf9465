"""The peer protocol: how daemons ask each other to hold fragments, in one place.

Transport: HTTP/1.1 tunnelled through libp2p streams (Kubo stream mounting, protocol
:data:`PROTOCOL`). Each daemon serves its *peer API* (`fusenode.node.peer_server`) on a
private 127.0.0.1 port and exposes it with ``p2p_listen``; to call peer X, a daemon
(`fusenode.node.peer_client`) opens ``p2p_forward`` from a local port to X's peer ID and
speaks HTTP to that port. Peers are therefore addressed by libp2p peer ID alone, and the
answering side is authenticated by libp2p's secure channel (we dialled its peer ID).

Requester authentication: every request carries a signature made with the sender's libp2p
private key over method, path, date, body hash and the receiver's peer ID
(`fusenode.node.peerauth`). Whether an authenticated peer is *accepted* is configuration:
``[network] accept_from`` (``["*"]``: any authenticated peer, or a list of peer IDs).

Messages (JSON unless said otherwise; every request signed)::

    GET  /peer/v1/health                  -> Health   {"peer_id", "addresses"}
    GET  /peer/v1/peers                   -> PeerList {"peers": [{"peer_id", "addresses"}]}
                                             fusenode peers that answered lately (exchange)
    POST /peer/v1/pin    CidList {"cids"} -> CidList  {"pinned": [...]}   fetch, pin, hold
    POST /peer/v1/has    CidList {"cids"} -> CidList  {"held": [...]}     which ones held here
    POST /peer/v1/unpin  CidList {"cids"} -> CidList  {"released": [...]} drop caller's holds
    POST /peer/v1/store?cid=CID  raw bytes -> Stored  {"cid"}   add + pin + hold; refused
                                                                unless the bytes hash to CID
    errors: any status >= 400 with {"error": {"type", "message"}}; the status is the error
            class's own (`fusenode.errors`), 401 for a bad signature, 403 for a peer not
            accepted, 400 for a malformed request

Every request is idempotent, so a client retries one whose answer was lost (a reply can be
lost through a tunnel when a stream closes early).

Why /store: with /pin the placing node must first add every fragment to its own blockstore
for the holder to fetch over bitswap; Kubo has no garbage collection, so the placing node
would keep every fragment it gave away (2.75x on disk instead of 1.5x). Streaming the bytes
to the holder stores each fragment once, where it belongs. Fragments over
:data:`MAX_FRAGMENT` still go the /pin way.

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

PROTOCOL: Final = "/x/fusenode/peer/1"
HEALTH: Final = "/peer/v1/health"
PEERS: Final = "/peer/v1/peers"
PIN: Final = "/peer/v1/pin"
HAS: Final = "/peer/v1/has"
UNPIN: Final = "/peer/v1/unpin"
STORE: Final = "/peer/v1/store"
#: Largest JSON body a peer request may have (CID lists).
MAX_BODY: Final = defaults.PEER_MAX_BODY
#: Largest fragment streamed with /store (bigger ones go through /pin and bitswap).
MAX_FRAGMENT: Final = defaults.MAX_STREAMED_FRAGMENT


class PeerError(NodeError, exit_code=7, http_status=502):
    """A call to a peer failed."""


class PeerUnreachable(PeerError, http_status=503):
    """A peer did not answer (down, disconnected, or its daemon is not running)."""


class PeerRefused(PeerError, exit_code=1):
    """A peer answered with an error."""


class BadPeerRequest(NodeError, http_status=400):
    """A peer's request is malformed (answered 400)."""


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
    ``released``."""

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
class Stored:
    """A holder's receipt for a streamed fragment."""

    cid: str

    def body(self) -> dict[str, str]:
        return {"cid": self.cid}
