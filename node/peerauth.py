"""Who sent this request, and who answered it: peer-protocol messages signed with the nodes'
libp2p identity keys (`fusenode.node.peerkeys`).

Daemons talk HTTP through libp2p stream tunnels. The requester knows whom it dialled (libp2p
authenticated that peer ID), but the answering daemon only sees a TCP connection from its own
Kubo, and the requester only sees a local TCP port that any local process could have taken
while the tunnel was down. So both directions are signed:

Request headers (`sign_request` makes them, `verify_request_headers` checks them before a
byte of the body is read)::

    X-Fusenode-Peer       the requester's peer ID (Qm... for RSA, 12D3KooW... for Ed25519)
    X-Fusenode-Key        base64 of its libp2p PublicKey protobuf
    X-Fusenode-Date       RFC 3339 UTC, whole seconds: 2025-01-31T12:00:00Z
    X-Fusenode-Nonce      16 random bytes, base64url: a request is accepted once
    X-Fusenode-Body       hex SHA-256 of the body it sends
    X-Fusenode-Signature  base64 signature over:

    fusenode-peer-v2 \\n METHOD \\n PATH?QUERY \\n DATE \\n NONCE \\n BODY-SHA256 \\n AUDIENCE

AUDIENCE is the peer ID the request is for: a request cannot be replayed to another node, and
the receiver remembers each (peer, nonce) for as long as the date is acceptable
(`NonceCache`), so it cannot be replayed to the same node either. Because the body's hash is
among the signed headers, the receiver checks who is asking, when, for what, before reading
the body, then reads at most the route's limit and checks the hash as it goes
(`fusenode.node.peer_server`).

Reply headers (`sign_reply`, `verify_reply`): X-Fusenode-Peer, -Key and -Signature over::

    fusenode-reply-v2 \\n REQUESTER \\n REQUEST-NONCE \\n STATUS \\n hex(sha256(reply body))

REQUESTER is the peer ID that signed the request. The requester checks the replier is the
peer it called and that the reply answers its own request, sent by itself: a process on the
tunnel's port cannot forge an answer, nor relay a request of its own under the victim's
nonce and pass the answer off (that answer names the relaying process as the requester). A
holder's signed receipt for a fragment is kept as proof (`fusenode.node.placement`). A
request whose signature fails is answered unsigned (401): signing costs a private-key
operation, which an unauthenticated flood must not be able to buy.

PATH?QUERY is the request target exactly as sent on the wire (percent-encoding untouched:
aiohttp's ``request.raw_path`` on the server; on the client, pass the URL pre-encoded, e.g.
``yarl.URL(..., encoded=True)``). RSA keys sign with PKCS#1 v1.5 and SHA-256 (as libp2p does),
Ed25519 keys plainly.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from fusenode.node.peerkeys import (
    KEY_ED25519,
    KEY_RSA,
    PeerAuthError,
    PeerKey,
    load_private_key,
    peer_id_from_public_key,
    private_key_from_protobuf,
    public_key,
)

__all__ = [
    "HEADER_BODY",
    "HEADER_DATE",
    "HEADER_KEY",
    "HEADER_NONCE",
    "HEADER_PEER",
    "HEADER_SIGNATURE",
    "KEY_ED25519",
    "KEY_RSA",
    "MAX_SKEW",
    "NonceCache",
    "PeerAuthError",
    "PeerKey",
    "SignedRequest",
    "body_digest",
    "load_private_key",
    "peer_id_from_public_key",
    "private_key_from_protobuf",
    "sign_reply",
    "sign_request",
    "verify_reply",
    "verify_request",
    "verify_request_headers",
]

#: A request's headers, in the order the module docstring lists them; each is required once.
_REQUEST_HEADERS: Final = tuple(
    f"X-Fusenode-{name}" for name in ("Peer", "Key", "Date", "Nonce", "Body", "Signature")
)
HEADER_PEER, HEADER_KEY, HEADER_DATE, HEADER_NONCE, HEADER_BODY, HEADER_SIGNATURE = _REQUEST_HEADERS
_REPLY_HEADERS: Final = (HEADER_PEER, HEADER_KEY, HEADER_SIGNATURE)
_DOMAIN: Final = b"fusenode-peer-v2"
_REPLY_DOMAIN: Final = b"fusenode-reply-v2"
_DATE_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
#: How far a request's date may be from the receiver's clock, either way (seconds).
MAX_SKEW: Final = 300.0
_MAX_KEY_HEADER: Final = 4096  # base64 chars: an 8192-bit RSA key is ~1.4 KB of DER
_MAX_SIG_HEADER: Final = 2048
_NONCE_CHARS: Final = 22  # 16 bytes, base64url without padding


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _format_date(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return when.astimezone(UTC).strftime(_DATE_FORMAT)


def _request_message(
    method: str, path: str, date: str, nonce: str, digest: str, audience: str
) -> bytes:
    for name, value in (("method", method), ("path", path), ("audience", audience)):
        if not value or any(c in value for c in "\r\n"):
            raise PeerAuthError(f"request {name} {value!r:.80} cannot be signed")
    fields = (method.upper(), path, date, nonce, digest, audience)
    return b"\n".join([_DOMAIN, *(f.encode("utf-8") for f in fields)])


def sign_request(
    key: PeerKey,
    method: str,
    path: str,
    body: bytes,
    now: datetime | None = None,
    *,
    audience: str,
) -> dict[str, str]:
    """The X-Fusenode-* headers proving that ``key``'s peer sends this request to
    ``audience``, once. ``path`` is the request target with its query, as on the wire.
    Costs one private-key operation: ~1 ms for RSA-2048, ~50 µs for Ed25519."""
    date = _format_date(now or datetime.now(UTC))
    nonce = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
    digest = body_digest(bytes(body))
    signature = key.sign(_request_message(method, path, date, nonce, digest, audience))
    return {
        HEADER_PEER: key.peer_id,
        HEADER_KEY: base64.b64encode(key.public_key_proto).decode(),
        HEADER_DATE: date,
        HEADER_NONCE: nonce,
        HEADER_BODY: digest,
        HEADER_SIGNATURE: base64.b64encode(signature).decode(),
    }


def _headers(headers: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """Our headers, looked up case-insensitively; each exactly once."""
    found: dict[str, str] = {}
    wanted = {h.lower(): h for h in names}
    for name, value in headers.items():
        canonical = wanted.get(name.lower())
        if canonical is None:
            continue
        if canonical in found:
            raise PeerAuthError(f"header {canonical} given more than once")
        found[canonical] = value
    for name in names:
        if not found.get(name):
            raise PeerAuthError(f"missing header {name}")
    return found


def _b64(value: str, name: str, limit: int) -> bytes:
    if len(value) > limit:
        raise PeerAuthError(f"header {name} is too long")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PeerAuthError(f"header {name} is not valid base64") from None


def _signer(found: dict[str, str]) -> tuple[str, bytes, object]:
    """(peer ID, signature, public key) from the headers; the ID must be the key's."""
    key = public_key(_b64(found[HEADER_KEY], HEADER_KEY, _MAX_KEY_HEADER))
    claimed = found[HEADER_PEER]
    if not hmac.compare_digest(key.peer_id.encode(), claimed.encode()):
        raise PeerAuthError(
            f"peer ID {claimed!r:.60} does not match the key sent (its ID is {key.peer_id})"
        )
    return key.peer_id, _b64(found[HEADER_SIGNATURE], HEADER_SIGNATURE, _MAX_SIG_HEADER), key


class NonceCache:
    """The (peer, nonce) pairs accepted within the window (twice the clock skew allowed):
    each is accepted once.

    Bounded two ways, so that no key can crowd out the others: at most ``per_peer`` pairs of
    one peer and ``capacity`` in all are remembered; past either, that peer's (or every)
    new request is refused until some expire. All entries live for the same window, so
    they expire in the order they came: forgetting them is O(1) each, never a scan.
    Held in memory only: after a restart a request captured in the last window could be
    replayed once (every request is idempotent; see docs/design.md section 11).
    """

    def __init__(
        self, window: float = 2 * MAX_SKEW, capacity: int = 200_000, per_peer: int = 20_000
    ) -> None:
        self.window = window
        self.capacity = capacity
        self.per_peer = per_peer
        self._order: collections.deque[tuple[float, str, str]] = collections.deque()
        self._seen: set[tuple[str, str]] = set()
        self._count: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def accept(self, peer: str, nonce: str) -> bool:
        """Remember the pair; False when it was seen before (a replay). Raises
        `PeerAuthError` when the peer (or everyone) has sent too many in the window."""
        now = time.monotonic()
        with self._lock:
            while self._order and self._order[0][0] <= now:
                _, old_peer, old_nonce = self._order.popleft()
                self._seen.discard((old_peer, old_nonce))
                self._count[old_peer] -= 1
                if self._count[old_peer] <= 0:
                    del self._count[old_peer]
            if (peer, nonce) in self._seen:
                return False
            if self._count[peer] >= self.per_peer or len(self._seen) >= self.capacity:
                raise PeerAuthError("too many requests in the replay window; try again later")
            self._seen.add((peer, nonce))
            self._count[peer] += 1
            self._order.append((now + self.window, peer, nonce))
            return True


@dataclass(frozen=True)
class SignedRequest:
    """What `verify_request_headers` established: who signed, the nonce, the body's hash."""

    peer_id: str
    nonce: str
    body_sha256: str


def verify_request_headers(
    headers: Mapping[str, str],
    method: str,
    path: str,
    *,
    audience: str,
    nonces: NonceCache | None = None,
    now: datetime | None = None,
    max_skew: float = MAX_SKEW,
) -> SignedRequest:
    """Check a request from its headers alone, before its body is read; raise
    `PeerAuthError` saying why it is refused.

    In order: every header present once; the date within ``max_skew`` seconds of ``now``;
    the nonce and body hash well-formed; the key a supported libp2p key whose peer ID is the
    one claimed; the signature over this method, target, date, nonce, body hash and our own
    peer ID; the nonce not seen before (``nonces``). The caller then checks the body it reads
    against ``body_sha256``.
    """
    found = _headers(headers, _REQUEST_HEADERS)
    date = found[HEADER_DATE]
    try:
        when = datetime.strptime(date, _DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise PeerAuthError(
            f"header {HEADER_DATE} {date!r:.40} is not an RFC 3339 UTC time "
            "like 2025-01-31T12:00:00Z"
        ) from None
    skew = (when - (now or datetime.now(UTC))).total_seconds()
    if abs(skew) > max_skew:
        raise PeerAuthError(
            f"request date {date} is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} "
            f"our clock (at most {max_skew:.0f} s allowed): check both clocks"
        )
    nonce, digest = found[HEADER_NONCE], found[HEADER_BODY]
    if len(nonce) != _NONCE_CHARS or not nonce.replace("-", "").replace("_", "").isalnum():
        raise PeerAuthError(f"header {HEADER_NONCE} is not 16 bytes of base64url")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise PeerAuthError(f"header {HEADER_BODY} is not a hex SHA-256")
    peer_id, signature, key = _signer(found)
    message = _request_message(method, path, date, nonce, digest, audience)
    if not key.verify(signature, message):  # type: ignore[attr-defined]
        raise PeerAuthError(
            f"bad signature from {peer_id}: the request was altered, or signed for another "
            "method, path, body, date or recipient"
        )
    if nonces is not None and not nonces.accept(peer_id, nonce):
        raise PeerAuthError(f"request {nonce} from {peer_id} was already received: a replay")
    return SignedRequest(peer_id, nonce, digest)


def verify_request(
    headers: Mapping[str, str], method: str, path: str, body: bytes, **checks: Any
) -> str:
    """`verify_request_headers` (``checks``: its keyword arguments, ``audience`` required)
    and the body's hash at once; the signer's peer ID."""
    signed = verify_request_headers(headers, method, path, **checks)
    if not hmac.compare_digest(signed.body_sha256, body_digest(bytes(body))):
        raise PeerAuthError("the body is not the one signed")
    return signed.peer_id


def _reply_message(requester: str, nonce: str, status: int, body: bytes) -> bytes:
    fields = (requester, nonce, str(status), body_digest(body))
    return b"\n".join([_REPLY_DOMAIN, *(f.encode() for f in fields)])


def sign_reply(
    key: PeerKey, requester: str, nonce: str, status: int, body: bytes
) -> dict[str, str]:
    """Headers proving that ``key``'s peer answers ``requester``'s request ``nonce`` with this
    status and body."""
    signature = key.sign(_reply_message(requester, nonce, status, bytes(body)))
    return {
        HEADER_PEER: key.peer_id,
        HEADER_KEY: base64.b64encode(key.public_key_proto).decode(),
        HEADER_SIGNATURE: base64.b64encode(signature).decode(),
    }


def verify_reply(
    headers: Mapping[str, str],
    peer_id: str,
    requester: str,
    nonce: str,
    status: int,
    body: bytes,
) -> None:
    """Raise `PeerAuthError` unless ``peer_id`` signed this reply to ``requester``'s request
    ``nonce``."""
    found = _headers(headers, _REPLY_HEADERS)
    signer, signature, key = _signer(found)
    if signer != peer_id:
        raise PeerAuthError(f"the reply is signed by {signer}, not by {peer_id}, whom we asked")
    if not key.verify(signature, _reply_message(requester, nonce, status, bytes(body))):  # type: ignore[attr-defined]
        raise PeerAuthError(f"bad reply signature from {peer_id}: the answer was altered")
