"""Direct tests of storage.multiformats (varints, base58btc, base32, multihashes, CIDs)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from fusenode.node.peerauth import peer_id_from_public_key
from fusenode.storage.backend import validate_cid
from fusenode.storage.errors import InvalidArgument
from fusenode.storage.manifest import is_valid_cid
from fusenode.storage.multiformats import (
    DAG_PB,
    IDENTITY,
    MAX_UINT64_VARINT_BYTES,
    RAW,
    SHA2_256,
    Cid,
    Multihash,
    b32decode,
    b32encode,
    b58decode,
    b58encode,
    encode_multihash,
    encode_varint,
    parse_cid,
    read_multihash,
    read_varint,
)

# The same dag-pb node as CIDv0 and CIDv1 (the example of the CID spec and IPFS docs).
CIDV0 = "QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR"
CIDV1 = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
# The raw-codec CIDv1 of the empty byte string.
CIDV1_RAW_EMPTY = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
# libp2p peer-ids spec test vector: an Ed25519 PublicKey protobuf and its peer ID.
ED25519_PUBLIC_PROTO = bytes.fromhex(
    "080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
ED25519_PEER_ID = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"


# ------------------------------------------------------------------------------- varints


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "8001"),
        (255, "ff01"),
        (300, "ac02"),
        (16384, "808001"),
        (2**63 - 1, "ff" * 8 + "7f"),
        (2**64 - 1, "ff" * 9 + "01"),
    ],
)
def test_varint_known_vectors(value: int, encoded: str) -> None:
    raw = bytes.fromhex(encoded)
    assert encode_varint(value) == raw
    assert read_varint(raw + b"tail", max_bytes=MAX_UINT64_VARINT_BYTES) == (value, len(raw))


def test_varint_round_trip_at_an_offset() -> None:
    for value in [*range(300), 2**32, 2**56 - 1, 2**56, 2**63 - 1]:
        buf = b"\xff\xff" + encode_varint(value)
        assert read_varint(buf, 2, minimal=True) == (value, len(buf))


def test_varint_refuses_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        encode_varint(-1)


@pytest.mark.parametrize("buf", [b"", b"\x80", b"\xff\xff", b"\x81\x80\x80"])
def test_truncated_varint(buf: bytes) -> None:
    with pytest.raises(ValueError, match="truncated varint"):
        read_varint(buf)


def test_varint_length_bounds() -> None:
    # multiformats caps varints at 9 bytes (63 bits); a protobuf uint64 may take 10.
    nine = encode_varint(2**63 - 1)
    ten = encode_varint(2**63)
    assert (len(nine), len(ten)) == (9, 10)
    assert read_varint(nine) == (2**63 - 1, 9)
    with pytest.raises(ValueError, match="varint too long"):
        read_varint(ten)
    assert read_varint(ten, max_bytes=MAX_UINT64_VARINT_BYTES) == (2**63, 10)
    with pytest.raises(ValueError, match="varint too long"):
        read_varint(b"\x80" * 10 + b"\x01", max_bytes=MAX_UINT64_VARINT_BYTES)


def test_non_minimal_varint() -> None:
    assert read_varint(b"\x81\x00") == (1, 2)  # accepted unless asked to be strict
    assert read_varint(b"\x00", minimal=True) == (0, 1)  # a single zero byte is minimal
    for buf in (b"\x81\x00", b"\x80\x00", b"\xff\x80\x00"):
        with pytest.raises(ValueError, match="not minimally encoded"):
            read_varint(buf, minimal=True)


# ------------------------------------------------------------------------------ base58btc


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"", ""),
        (b"\x00", "1"),
        (b"\x00\x00\x00", "111"),
        (b"hello world", "StV1DL6CwTryKyV"),
        (b"\x00\x00\x00hello world", "111StV1DL6CwTryKyV"),
    ],
)
def test_base58_known_vectors(data: bytes, text: str) -> None:
    assert b58encode(data) == text
    assert b58decode(text) == data


def test_base58_round_trip() -> None:
    for n in range(64):
        data = b"\x00" * (n % 3) + hashlib.sha256(bytes([n])).digest()[: n % 33]
        assert b58decode(b58encode(data)) == data


@pytest.mark.parametrize("bad", ["0", "O", "I", "l", "Qm+", "Qm "])
def test_base58_refuses_characters_outside_the_alphabet(bad: str) -> None:
    with pytest.raises(ValueError, match="not a base58btc character"):
        b58decode(bad)


# --------------------------------------------------------------------------------- base32


@pytest.mark.parametrize(
    ("data", "text"),
    [  # RFC 4648 section 10, lowercase and without padding
        (b"", ""),
        (b"f", "my"),
        (b"fo", "mzxq"),
        (b"foo", "mzxw6"),
        (b"foob", "mzxw6yq"),
        (b"fooba", "mzxw6ytb"),
        (b"foobar", "mzxw6ytboi"),
    ],
)
def test_base32_known_vectors(data: bytes, text: str) -> None:
    assert b32encode(data) == text
    assert b32decode(text) == data


def test_base32_round_trip_matches_the_stdlib() -> None:
    for n in range(80):
        data = hashlib.sha512(bytes([n])).digest()[: n % 65]
        text = b32encode(data)
        assert text == base64.b32encode(data).decode().rstrip("=").lower()
        assert b32decode(text) == data


@pytest.mark.parametrize(
    "bad",
    [
        "mz",  # "f" is "my": the unused low bit of the last character is set
        "mzxr",  # "fo" is "mzxq"
        "mzxw7",  # "foo" is "mzxw6"
        "m",  # 1, 3 or 6 characters past a multiple of 8 spell no byte string
        "mzx",
        "mzxw6y",
        "mzxw6ytbo",
    ],
)
def test_base32_refuses_non_canonical_tails(bad: str) -> None:
    with pytest.raises(ValueError, match="non-canonical base32 tail"):
        b32decode(bad)


@pytest.mark.parametrize("bad", ["MY", "my======", "m1", "m8"])
def test_base32_refuses_uppercase_padding_and_other_characters(bad: str) -> None:
    with pytest.raises(ValueError, match="not a lowercase base32 character"):
        b32decode(bad)


# ------------------------------------------------------------------------------ multihash


def test_multihash_known_vector() -> None:
    # The multihash spec's example: sha2-256 of "multihash".
    digest = hashlib.sha256(b"multihash").digest()
    assert digest.hex() == "9cbc07c3f991725836a3aa2a581ca2029198aa420b9d99bc0e131d9f3e2cbe47"
    encoded = encode_multihash(SHA2_256, digest)
    assert encoded == b"\x12\x20" + digest
    assert b58encode(encoded) == "QmYtUc4iTCbbfVSDNKvtQqrfyezPPnFvE33wFmutw9PBBk"
    assert read_multihash(encoded) == Multihash(SHA2_256, digest)
    assert read_multihash(b"xy" + encoded, 2) == Multihash(SHA2_256, digest)


@pytest.mark.parametrize(
    "bad",
    [
        b"\x12\x20" + bytes(31),  # digest shorter than declared
        b"\x12\x20" + bytes(33),  # longer
        b"\x12\x00",  # empty digest
    ],
)
def test_multihash_length_must_match(bad: bytes) -> None:
    with pytest.raises(ValueError, match="multihash length does not match its digest"):
        read_multihash(bad)


def test_multihash_truncated_header() -> None:
    with pytest.raises(ValueError, match="truncated varint"):
        read_multihash(b"\x12")


def test_real_peer_id_is_an_identity_multihash() -> None:
    encoded = encode_multihash(IDENTITY, ED25519_PUBLIC_PROTO)
    assert b58encode(encoded) == ED25519_PEER_ID
    assert read_multihash(b58decode(ED25519_PEER_ID)) == Multihash(IDENTITY, ED25519_PUBLIC_PROTO)
    assert peer_id_from_public_key(ED25519_PUBLIC_PROTO) == ED25519_PEER_ID


# ----------------------------------------------------------------------------------- CIDs


def test_cid_v0_and_v1_of_the_same_node() -> None:
    v0, v1 = parse_cid(CIDV0), parse_cid(CIDV1)
    assert v0 == Cid(0, DAG_PB, v0.multihash)
    assert v1 == Cid(1, DAG_PB, v0.multihash)
    assert v0.multihash.code == SHA2_256 and len(v0.multihash.digest) == 32
    raw = encode_varint(1) + encode_varint(DAG_PB) + encode_multihash(SHA2_256, v0.multihash.digest)
    assert "b" + b32encode(raw) == CIDV1
    assert b58encode(encode_multihash(SHA2_256, v0.multihash.digest)) == CIDV0


def test_raw_cid_of_known_sha256() -> None:
    digest = hashlib.sha256(b"").digest()
    assert parse_cid(CIDV1_RAW_EMPTY) == Cid(1, RAW, Multihash(SHA2_256, digest))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not CIDv0"),
        ("Qm123", "not CIDv0"),
        (CIDV0[:-1] + "0", "not CIDv0"),  # '0' is not base58
        ("Qm" + "1" * 44, "not a sha2-256 multihash"),
        (CIDV1.upper(), "not CIDv0"),
        (CIDV1[:-1], "non-canonical base32 tail"),  # 57 characters: no byte string
        ("b" + b32encode(b"\x01\x70\x12\x20" + bytes(31)), "multihash length does not"),
        (CIDV1[:-1] + "j", "non-canonical base32 tail"),
        ("b" + b32encode(b"\x02\x70\x12\x20" + bytes(32)), "unsupported CID version 2"),
        ("b" + b32encode(b"\x01\x70\x12"), "truncated varint"),
        ("b" + b32encode(b"\x01" + b"\xff" * 9), "varint too long"),
        ("b" + "a" * 300, "too long"),
    ],
)
def test_parse_cid_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cid(text)


def test_parse_cid_non_minimal_varint() -> None:
    text = "b" + b32encode(b"\x81\x00\x70\x12\x20" + bytes(32))  # version 1 in two bytes
    assert parse_cid(text).version == 1
    with pytest.raises(ValueError, match="not minimally encoded"):
        parse_cid(text, minimal=True)


def test_callers_keep_their_policy_and_messages() -> None:
    # validate_cid: syntax only, any codec; InvalidArgument with the parser's reason.
    other_codec = "b" + b32encode(b"\x01\x71\x00\x04abcd")  # dag-cbor, identity hash
    assert validate_cid(other_codec) == other_codec
    with pytest.raises(InvalidArgument, match=r"malformed CID 'Qm1+': not a sha2-256 multihash"):
        validate_cid("Qm" + "1" * 44)
    # is_valid_cid: dag-pb or raw, no identity hash, 16..64-byte digest, minimal varints.
    assert not is_valid_cid(other_codec)
    assert is_valid_cid(CIDV0) and is_valid_cid(CIDV1) and is_valid_cid(CIDV1_RAW_EMPTY)
    assert not is_valid_cid("b" + b32encode(b"\x01\x55\x12\x0f" + bytes(15)))
    assert not is_valid_cid("b" + b32encode(b"\x81\x00\x70\x12\x20" + bytes(32)))
