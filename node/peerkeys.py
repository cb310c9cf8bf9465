"""libp2p identity keys: the node's own (to sign with) and its peers' (to check with).

A peer ID is derived from a public key by libp2p's rule (`peer_id_from_public_key`), so a
signature made with the private key of a peer ID proves who made it. The node's private key
is the one Kubo generated for its repo (``Identity.PrivKey`` of ``REPO/kubo/config``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
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
    b58decode,
    b58encode,
    encode_multihash,
    encode_varint,
    read_multihash,
    read_varint,
)

__all__ = [
    "KEY_ED25519",
    "KEY_RSA",
    "PeerAuthError",
    "PeerKey",
    "PublicKey",
    "check_peer_id",
    "load_private_key",
    "peer_id_from_public_key",
    "private_key_from_protobuf",
    "public_key",
    "public_key_from_peer_id",
]

# libp2p's KeyType enum (crypto/pb/crypto.proto).
KEY_RSA: Final = 0
KEY_ED25519: Final = 1
_KEY_NAMES: Final = {0: "RSA", 1: "Ed25519", 2: "Secp256k1", 3: "ECDSA"}
# go-libp2p refuses RSA keys under 2048 bits and over 8192 bits; so do we (the upper bound
# also keeps a hostile peer from making us verify with a huge key).
_RSA_MIN_BITS: Final = 2048
_RSA_MAX_BITS: Final = 8192


class PeerAuthError(NodeError, http_status=401):
    """A peer's identity key could not be loaded, or a signature did not verify."""


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


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A peer's public key and the peer ID it proves."""

    peer_id: str
    key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this key's over ``message`` (as libp2p signs)."""
        try:
            if isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            else:
                self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@functools.lru_cache(maxsize=1024)
def public_key(proto: bytes) -> PublicKey:
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
    return PublicKey(peer_id_from_public_key(proto), public)


def check_peer_id(peer_id: str) -> str:
    """``peer_id`` when it is a peer ID: base58btc of a sha2-256 multihash (a key's hash,
    ``Qm...``) or an identity multihash of a supported public key (``12D3KooW...``), in its
    canonical spelling. Raises `PeerAuthError` with the reason otherwise (a typo in a trusted
    signer must not read as a stranger)."""
    public_key_from_peer_id(peer_id)
    return peer_id


def public_key_from_peer_id(peer_id: str) -> PublicKey | None:
    """The public key inlined in a peer ID (Ed25519: identity multihash), or None when the
    ID is a hash of its key (RSA: the key must come with the signature). Raises
    `PeerAuthError` for a string that is not a peer ID."""
    if not isinstance(peer_id, str) or not 1 <= len(peer_id) <= 128:
        raise PeerAuthError("a peer ID is a base58btc string of at most 128 characters")
    try:
        multihash = read_multihash(b58decode(peer_id), minimal=True)
    except ValueError as exc:
        raise PeerAuthError(f"{peer_id[:80]!r} is not a peer ID: {exc}") from None
    if multihash.code == SHA2_256 and len(multihash.digest) == 32:
        return None
    if multihash.code != IDENTITY:
        raise PeerAuthError(f"{peer_id[:80]!r} is not a peer ID: unknown multihash")
    key = public_key(multihash.digest)
    if key.peer_id != peer_id:
        raise PeerAuthError(f"{peer_id[:80]!r} is not the canonical spelling of its key")
    return key
