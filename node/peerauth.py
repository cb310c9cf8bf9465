"""Who sent this request: daemon-to-daemon HTTP signed with the node's libp2p identity key.

Daemons talk HTTP through libp2p stream tunnels (`storage.kubo.KuboNode.p2p_forward`). The
requester knows who answers (it dialled that peer ID and libp2p authenticated it), but the
answering daemon only sees a TCP connection from its own Kubo: it cannot tell which peer
opened the stream. So every request carries a signature made with the requester's libp2p
private key (the one in its Kubo repo's config) and the public key itself; the peer ID is
derived from that key with libp2p's own rule, so a valid signature proves the peer ID.

Headers (`sign_request` makes them, `verify_request` checks them)::

    X-Fusenode-Peer       the requester's peer ID (Qm... for RSA, 12D3KooW... for Ed25519)
    X-Fusenode-Key        base64 of its libp2p PublicKey protobuf
    X-Fusenode-Date       RFC 3339 UTC, whole seconds: 2025-01-31T12:00:00Z
    X-Fusenode-Signature  base64 signature over the string below

Signed string (bytes)::

    fusenode-peer-v1 \\n METHOD \\n PATH?QUERY \\n DATE \\n hex(sha256(body)) [\\n AUDIENCE]

PATH?QUERY is the request target exactly as sent on the wire (percent-encoding untouched:
aiohttp's ``request.raw_path`` on the server; on the client, pass the URL pre-encoded, e.g.
``yarl.URL(..., encoded=True)``, so the library does not re-quote what was signed). RSA keys
sign with PKCS#1 v1.5 and SHA-256 (as libp2p does), Ed25519 keys plainly.

AUDIENCE (optional on both sides, must match) is the peer ID the request is meant for.
Without it a signed request can be replayed, within the allowed clock skew, by whoever
received it to ANY other daemon; with it, only to the same daemon. There is no nonce: a
request can be replayed to its own recipient within the skew window, so non-idempotent
endpoints need their own replay check.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from fusenode.node.errors import NodeError
from fusenode.storage.multiformats import (
    IDENTITY,
    MAX_UINT64_VARINT_BYTES,
    SHA2_256,
    b58encode,
    encode_multihash,
    encode_varint,
    read_varint,
)

__all__ = [
    "HEADER_DATE",
    "HEADER_KEY",
    "HEADER_PEER",
    "HEADER_SIGNATURE",
    "KEY_ED25519",
    "KEY_RSA",
    "PeerAuthError",
    "PeerKey",
    "load_private_key",
    "peer_id_from_public_key",
    "private_key_from_protobuf",
    "sign_request",
    "verify_request",
]

HEADER_PEER: Final = "X-Fusenode-Peer"
HEADER_KEY: Final = "X-Fusenode-Key"
HEADER_DATE: Final = "X-Fusenode-Date"
HEADER_SIGNATURE: Final = "X-Fusenode-Signature"
_HEADERS: Final = (HEADER_PEER, HEADER_KEY, HEADER_DATE, HEADER_SIGNATURE)
_DOMAIN: Final = b"fusenode-peer-v1"
_DATE_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"

# libp2p's KeyType enum (crypto/pb/crypto.proto).
KEY_RSA: Final = 0
KEY_ED25519: Final = 1
_KEY_NAMES: Final = {0: "RSA", 1: "Ed25519", 2: "Secp256k1", 3: "ECDSA"}
# go-libp2p refuses RSA keys under 2048 bits and over 8192 bits; so do we (the upper bound
# also keeps a hostile peer from making us verify with a huge key).
_RSA_MIN_BITS: Final = 2048
_RSA_MAX_BITS: Final = 8192
_MAX_KEY_HEADER: Final = 4096  # base64 chars: an 8192-bit RSA key is ~1.4 KB of DER
_MAX_SIG_HEADER: Final = 2048


class PeerAuthError(NodeError, http_status=401):
    """A peer's identity key could not be loaded, or a request's signature did not verify."""


# --------------------------------------------------------------------- libp2p key encoding


def _key_proto(key_type: int, data: bytes) -> bytes:
    """Serialize a libp2p PublicKey/PrivateKey message as go-libp2p does: field 1 (Type, a
    proto2 ``required`` enum, so written even when 0) then field 2 (Data)."""
    return b"\x08" + encode_varint(key_type) + b"\x12" + encode_varint(len(data)) + data


def _parse_key_proto(buf: bytes) -> tuple[int, bytes]:
    """(type, data) of a libp2p key message; only the canonical encoding is accepted, so
    the peer ID a verifier derives is the one the signer's libp2p derives."""
    try:
        if buf[:1] != b"\x08":
            raise ValueError("field 1 (key type) must come first")
        key_type, pos = read_varint(buf, 1, max_bytes=MAX_UINT64_VARINT_BYTES)
        if buf[pos : pos + 1] != b"\x12":
            raise ValueError("field 2 (key data) must follow the key type")
        length, pos = read_varint(buf, pos + 1, max_bytes=MAX_UINT64_VARINT_BYTES)
        data = buf[pos : pos + length]
        if len(data) != length or pos + length != len(buf):
            raise ValueError("length of the key data does not match the message")
    except (ValueError, IndexError) as exc:
        raise PeerAuthError(f"not a libp2p key protobuf: {exc}") from None
    if _key_proto(key_type, data) != buf:
        raise PeerAuthError("not a libp2p key protobuf: non-canonical encoding")
    return key_type, data


def peer_id_from_public_key(pub_proto_bytes: bytes) -> str:
    """The libp2p peer ID of a serialized PublicKey protobuf.

    libp2p's rule: keys whose serialization is at most 42 bytes (Ed25519) are inlined with
    the identity multihash (0x00, length), longer ones (RSA) are hashed with sha2-256 (0x12,
    0x20, digest); the multihash is written in base58btc. Only the type and length of the
    data are checked here, not that it is a valid key.
    """
    key_type, data = _parse_key_proto(bytes(pub_proto_bytes))
    if key_type not in _KEY_NAMES:
        raise PeerAuthError(f"unknown libp2p key type {key_type}")
    if key_type == KEY_ED25519 and len(data) != 32:
        raise PeerAuthError(f"an Ed25519 public key is 32 bytes, not {len(data)}")
    serialized = _key_proto(key_type, data)
    if len(serialized) <= 42:
        multihash = encode_multihash(IDENTITY, serialized)
    else:
        multihash = encode_multihash(SHA2_256, hashlib.sha256(serialized).digest())
    return b58encode(multihash)


# --------------------------------------------------------------------------- private keys


@dataclass(frozen=True, slots=True)
class PeerKey:
    """A node's libp2p identity: what `sign_request` needs, loaded once and reused."""

    peer_id: str
    key_type: int
    public_key_proto: bytes  # serialized libp2p PublicKey (what X-Fusenode-Key carries)
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = field(repr=False)

    def sign(self, message: bytes) -> bytes:
        """Sign as libp2p does: RSA PKCS#1 v1.5 with SHA-256, or plain Ed25519."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return self.private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        return self.private_key.sign(message)


def private_key_from_protobuf(data: bytes) -> PeerKey:
    """Load a serialized libp2p PrivateKey (the decoded Identity.PrivKey of a Kubo config).

    RSA: Data is a PKCS#1 DER private key (what Kubo generates: peer IDs "Qm..."). Ed25519:
    Data is the 32-byte seed then the 32-byte public key (64 bytes; old keys repeat the
    public key once more, 96 bytes). Secp256k1 and ECDSA are refused.
    """
    key_type, raw = _parse_key_proto(bytes(data))
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if key_type == KEY_RSA:
        try:
            loaded = serialization.load_der_private_key(raw, password=None)
        except (ValueError, TypeError) as exc:
            raise PeerAuthError(f"the RSA identity key does not load: {exc}") from None
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise PeerAuthError("the identity key says RSA but holds another kind of key")
        if not _RSA_MIN_BITS <= loaded.key_size <= _RSA_MAX_BITS:
            raise PeerAuthError(f"RSA identity key of {loaded.key_size} bits is not allowed")
        private_key = loaded
        public_data = loaded.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif key_type == KEY_ED25519:
        if len(raw) not in (64, 96):
            raise PeerAuthError(f"an Ed25519 identity key is 64 bytes, not {len(raw)}")
        private_key = ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
        public_data = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if raw[32:64] != public_data or (len(raw) == 96 and raw[64:] != public_data):
            raise PeerAuthError("the Ed25519 identity key's public half does not match its seed")
    else:
        name = _KEY_NAMES.get(key_type, f"type {key_type}")
        raise PeerAuthError(
            f"{name} identity keys are not supported (only RSA and Ed25519): "
            "create the node with a Kubo that generates one of those"
        )
    public_proto = _key_proto(key_type, public_data)
    return PeerKey(peer_id_from_public_key(public_proto), key_type, public_proto, private_key)


def _config_path(kubo_repo_dir: Path) -> Path:
    """Accept Kubo's repo folder (holding ``config``) or fusenode's repo (holding kubo/)."""
    kubo_repo_dir = Path(kubo_repo_dir)
    for candidate in (kubo_repo_dir / "config", kubo_repo_dir / "kubo" / "config"):
        if candidate.is_file():
            return candidate
    raise PeerAuthError(f"no Kubo config in {kubo_repo_dir} (nor in {kubo_repo_dir / 'kubo'})")


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, _stamp: tuple[int, int]) -> PeerKey:
    try:
        with open(path, encoding="utf-8") as f:
            identity = json.load(f)["Identity"]
        encoded, claimed = identity["PrivKey"], identity["PeerID"]
        raw = base64.b64decode(encoded, validate=True)
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise PeerAuthError(f"cannot read Identity.PrivKey/PeerID from {path}: {exc}") from None
    key = private_key_from_protobuf(raw)
    if key.peer_id != claimed:
        raise PeerAuthError(
            f"{path}: Identity.PeerID {claimed} does not match its private key ({key.peer_id})"
        )
    return key


def load_private_key(kubo_repo_dir: Path) -> PeerKey:
    """The node's identity key from ``Identity.PrivKey`` of its Kubo config.

    ``kubo_repo_dir`` is Kubo's repo folder (``REPO/kubo``) or the fusenode repo above it.
    The derived peer ID must equal ``Identity.PeerID``, so a damaged or hand-edited config
    is caught here rather than by every peer refusing our signatures. Cached per file
    version: calling this for every request costs a stat, not a key parse.
    """
    path = _config_path(kubo_repo_dir)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PeerAuthError(f"cannot read {path}: {exc}") from None
    return _load_cached(str(path.resolve()), (st.st_mtime_ns, st.st_size))


# ------------------------------------------------------------------------ request signing


def _format_date(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return when.astimezone(UTC).strftime(_DATE_FORMAT)


def _message(method: str, path: str, date: str, body: bytes, audience: str | None) -> bytes:
    for name, value in (("method", method), ("path", path)):
        if not value or any(c in value for c in "\r\n"):
            raise PeerAuthError(f"request {name} {value!r:.80} cannot be signed")
    lines = [
        _DOMAIN,
        method.upper().encode(),
        path.encode("utf-8"),
        date.encode(),
        hashlib.sha256(body).hexdigest().encode(),
    ]
    if audience is not None:
        lines.append(audience.encode())
    return b"\n".join(lines)


def sign_request(
    key: PeerKey,
    method: str,
    path: str,
    body: bytes,
    now: datetime | None = None,
    *,
    audience: str | None = None,
) -> dict[str, str]:
    """The four X-Fusenode-* headers proving that ``key``'s peer sends this request.

    ``path`` is the request target with its query, exactly as it goes on the wire;
    ``audience`` the recipient's peer ID if the verifier checks it (see the module doc).
    Costs one private-key operation: ~1 ms for RSA-2048, ~50 µs for Ed25519.
    """
    date = _format_date(now or datetime.now(UTC))
    signature = key.sign(_message(method, path, date, bytes(body), audience))
    return {
        HEADER_PEER: key.peer_id,
        HEADER_KEY: base64.b64encode(key.public_key_proto).decode(),
        HEADER_DATE: date,
        HEADER_SIGNATURE: base64.b64encode(signature).decode(),
    }


@dataclass(frozen=True, slots=True)
class _PublicKey:
    peer_id: str
    key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey


@functools.lru_cache(maxsize=1024)
def _public_key(proto: bytes) -> _PublicKey:
    """Parse and check a peer's PublicKey protobuf (cached: peers sign many requests)."""
    key_type, data = _parse_key_proto(proto)
    public: rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    if key_type == KEY_RSA:
        try:
            loaded = serialization.load_der_public_key(data)
        except (ValueError, TypeError):
            raise PeerAuthError("X-Fusenode-Key holds a malformed RSA key") from None
        if not isinstance(loaded, rsa.RSAPublicKey):
            raise PeerAuthError("X-Fusenode-Key says RSA but holds another kind of key")
        if not _RSA_MIN_BITS <= loaded.key_size <= _RSA_MAX_BITS:
            raise PeerAuthError(f"RSA key of {loaded.key_size} bits is not allowed")
        public = loaded
    elif key_type == KEY_ED25519:
        if len(data) != 32:
            raise PeerAuthError("X-Fusenode-Key holds a malformed Ed25519 key")
        public = ed25519.Ed25519PublicKey.from_public_bytes(data)
    else:
        name = _KEY_NAMES.get(key_type, f"type {key_type}")
        raise PeerAuthError(f"{name} keys are not supported (only RSA and Ed25519)")
    return _PublicKey(peer_id_from_public_key(proto), public)


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Our four headers, looked up case-insensitively; each exactly once."""
    found: dict[str, str] = {}
    wanted = {h.lower(): h for h in _HEADERS}
    for name, value in headers.items():
        canonical = wanted.get(name.lower())
        if canonical is None:
            continue
        if canonical in found:
            raise PeerAuthError(f"header {canonical} given more than once")
        found[canonical] = value
    for name in _HEADERS:
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


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    now: datetime | None = None,
    max_skew: float = 300,
    *,
    audience: str | None = None,
) -> str:
    """Return the peer ID that signed this request, or raise `PeerAuthError` saying why.

    Checks, in order: all four headers present once; the date parses and is within
    ``max_skew`` seconds of ``now`` (either way); the key is a supported libp2p key whose
    peer ID is the one claimed; the signature covers this method, path, date, body (and
    ``audience``, our own peer ID, if given: the signer must have named us).
    """
    found = _headers(headers)
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
    public = _public_key(_b64(found[HEADER_KEY], HEADER_KEY, _MAX_KEY_HEADER))
    claimed = found[HEADER_PEER]
    if not hmac.compare_digest(public.peer_id.encode(), claimed.encode()):
        raise PeerAuthError(
            f"peer ID {claimed!r:.60} does not match the key sent (its ID is {public.peer_id})"
        )
    signature = _b64(found[HEADER_SIGNATURE], HEADER_SIGNATURE, _MAX_SIG_HEADER)
    message = _message(method, path, date, bytes(body), audience)
    try:
        if isinstance(public.key, rsa.RSAPublicKey):
            public.key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            public.key.verify(signature, message)
    except InvalidSignature:
        raise PeerAuthError(
            f"bad signature from {claimed}: the request was altered, or signed for another "
            "method, path, body, date or recipient"
        ) from None
    return public.peer_id
