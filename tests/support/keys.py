"""libp2p keys for tests of request signing."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


def ed25519_protobuf() -> bytes:
    """A libp2p PrivateKey protobuf for a new Ed25519 key, built by hand:
    field 1 (type) = 1, field 2 (data) = 64 bytes, seed then public key."""
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return b"\x08\x01\x12\x40" + seed + public


def rsa_protobuf() -> bytes:
    """A libp2p PrivateKey protobuf for a new 2048-bit RSA key (what Kubo's own init makes, and
    what repos created before fusenode switched to Ed25519 hold): type 0, PKCS#1 DER data."""
    der = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    length = len(der)
    varint = bytes([(length & 0x7F) | 0x80, length >> 7])  # 2 bytes: 128 <= length < 16384
    return b"\x08\x00\x12" + varint + der
