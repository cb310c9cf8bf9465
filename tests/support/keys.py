"""libp2p keys for tests of request signing."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


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
