"""The multiformats primitives fusenode needs: varints, base58btc, base32, multihashes, CIDs.

One implementation of each, shared by the backend's argument checks
(`storage.backend.validate_cid`), the manifest parser (`storage.manifest.is_valid_cid`) and
libp2p peer IDs (`node.peerauth`). Everything is pure and raises `ValueError` with a short
message; callers wrap it in their own error type. Only the forms Kubo prints are handled:
CIDv0 (``Qm...``, base58btc) and CIDv1 in lowercase base32 without padding (``b...``).

Specs: https://github.com/multiformats/unsigned-varint, .../multihash, .../cid and
RFC 4648 (base32).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DAG_PB",
    "IDENTITY",
    "MAX_CID_CHARS",
    "MAX_UINT64_VARINT_BYTES",
    "MAX_VARINT_BYTES",
    "RAW",
    "SHA2_256",
    "Cid",
    "Multihash",
    "b32decode",
    "b32encode",
    "b58decode",
    "b58encode",
    "encode_multihash",
    "encode_varint",
    "parse_cid",
    "read_multihash",
    "read_varint",
]

# multicodec table entries used here
IDENTITY: Final = 0x00
SHA2_256: Final = 0x12
RAW: Final = 0x55
DAG_PB: Final = 0x70

MAX_VARINT_BYTES: Final = 9
"""multiformats unsigned-varint: at most 9 bytes (63 bits of value), by spec."""
MAX_UINT64_VARINT_BYTES: Final = 10
"""protobuf (u)int64 varint: ceil(64 / 7) = 10 bytes; libp2p key protobufs use this."""
MAX_CID_CHARS: Final = 200
"""CIDs are short; anything longer is an attack or a mistake, not a CID."""

_B58_ALPHABET: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX: Final = {c: i for i, c in enumerate(_B58_ALPHABET)}
_B32_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"
_B32_INDEX: Final = {c: i for i, c in enumerate(_B32_ALPHABET)}
_CIDV0_RE: Final = re.compile(r"Qm[1-9A-HJ-NP-Za-km-z]{44}")
_CIDV1_BASE32_RE: Final = re.compile(r"b[a-z2-7]+")


# ------------------------------------------------------------------------------- varints


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128, minimally encoded (as multiformats and protobuf write it)."""
    if value < 0:
        raise ValueError("a varint cannot be negative")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(
    buf: bytes, pos: int = 0, *, max_bytes: int = MAX_VARINT_BYTES, minimal: bool = False
) -> tuple[int, int]:
    """Decode the unsigned varint at ``buf[pos]``; return (value, position after it).

    ``max_bytes`` is 9 for multiformats fields (`MAX_VARINT_BYTES`) and 10 for protobuf
    uint64 fields (`MAX_UINT64_VARINT_BYTES`). With ``minimal`` a varint padded with
    trailing zero groups (``0x81 0x00`` for 1) is refused, as the multiformats spec says.
    """
    value = 0
    for i in range(max_bytes):
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if minimal and byte == 0 and i:
                raise ValueError("varint is not minimally encoded")
            return value, pos
    raise ValueError("varint too long")


# ----------------------------------------------------------------------------- multibase


def b58encode(data: bytes) -> str:
    """Base58btc (the Bitcoin alphabet); each leading zero byte becomes a ``1``."""
    num = int.from_bytes(data, "big")
    out = []
    while num:
        num, rem = divmod(num, 58)
        out.append(_B58_ALPHABET[rem])
    pad = len(data) - len(data.lstrip(b"\x00"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Inverse of `b58encode`; raises ValueError on a character outside the alphabet."""
    num = 0
    for ch in text:
        digit = _B58_INDEX.get(ch)
        if digit is None:
            raise ValueError(f"{ch!r} is not a base58btc character")
        num = num * 58 + digit
    body = num.to_bytes((num.bit_length() + 7) // 8, "big")
    pad = len(text) - len(text.lstrip("1"))
    return b"\x00" * pad + body


def b32encode(data: bytes) -> str:
    """RFC 4648 base32, lowercase, no padding (multibase ``b`` without its prefix)."""
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def b32decode(text: str) -> bytes:
    """Inverse of `b32encode`, strict: only the canonical spelling of some bytes decodes.

    Refuses uppercase, padding, a length no byte string encodes to (1, 3 or 6 characters
    past a multiple of 8) and non-zero unused bits in the last character.
    """
    bits = 0
    acc = 0
    out = bytearray()
    for ch in text:
        digit = _B32_INDEX.get(ch)
        if digit is None:
            raise ValueError(f"{ch!r} is not a lowercase base32 character")
        acc = (acc << 5) | digit
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
            acc &= (1 << bits) - 1
    if bits >= 5 or acc:  # acc holds just the `bits` unused low bits here
        raise ValueError("non-canonical base32 tail")
    return bytes(out)


# ----------------------------------------------------------------------------- multihash


@dataclass(frozen=True, slots=True)
class Multihash:
    """A parsed multihash: hash function code (multicodec) and digest."""

    code: int
    digest: bytes


def encode_multihash(code: int, digest: bytes) -> bytes:
    """``varint(code) varint(len(digest)) digest``."""
    return encode_varint(code) + encode_varint(len(digest)) + bytes(digest)


def read_multihash(buf: bytes, pos: int = 0, *, minimal: bool = False) -> Multihash:
    """Parse the multihash that fills ``buf[pos:]`` exactly, with a non-empty digest."""
    code, pos = read_varint(buf, pos, minimal=minimal)
    length, pos = read_varint(buf, pos, minimal=minimal)
    if length == 0 or len(buf) - pos != length:
        raise ValueError("multihash length does not match its digest")
    return Multihash(code, bytes(buf[pos:]))


# ---------------------------------------------------------------------------------- CIDs


@dataclass(frozen=True, slots=True)
class Cid:
    """A parsed CID. A CIDv0 reads as version 0, codec dag-pb, a sha2-256 multihash."""

    version: int
    codec: int
    multihash: Multihash


def parse_cid(text: str, *, minimal: bool = False) -> Cid:
    """Parse a CIDv0 (``Qm`` + 44 base58btc) or a lowercase base32 CIDv1 (``b...``).

    Syntax only: any codec and hash function are accepted; callers add their own policy.
    ``minimal`` refuses non-minimally encoded varints. Raises ValueError saying what is
    wrong (the message is meant to follow "malformed CID 'x': ").
    """
    if len(text) > MAX_CID_CHARS:
        raise ValueError("too long")
    if _CIDV0_RE.fullmatch(text):
        raw = b58decode(text)
        if len(raw) != 34 or raw[:2] != b"\x12\x20":
            raise ValueError("not a sha2-256 multihash")
        return Cid(0, DAG_PB, Multihash(SHA2_256, raw[2:]))
    if _CIDV1_BASE32_RE.fullmatch(text):
        raw = b32decode(text[1:])
        version, pos = read_varint(raw, 0, minimal=minimal)
        if version != 1:
            raise ValueError(f"unsupported CID version {version}")
        codec, pos = read_varint(raw, pos, minimal=minimal)
        return Cid(1, codec, read_multihash(raw, pos, minimal=minimal))
    raise ValueError("not CIDv0 (Qm...) or base32 CIDv1 (b...)")
