"""The age v1 file format (https://age-encryption.org/v1), built on ``cryptography``.

Why our own implementation: the storage pipeline needs the header and the payload apart. The
payload (16-byte nonce, then 64 KiB STREAM chunks) is segmented and stored on its own; a second
payload (the encrypted metadata) shares the header and file key under its own random nonce; and
access is granted later by writing a new header for the same file key without touching the
payload. ``header || payload`` is always a standard age file that ``age``/rage decrypt.

Recipient types: X25519 (``age1...`` / ``AGE-SECRET-KEY-1...``), the post-quantum hybrid
mlkem768x25519 (``age1pq1...`` / ``AGE-SECRET-KEY-PQ-1...``: X-Wing, i.e. ML-KEM-768 and
X25519, in HPKE, as C2SP age specifies it) and scrypt passphrases. `parse_recipient` and
`parse_identity` pick the type from the string's prefix. ASCII armor is refused.

A file looks like::

    age-encryption.org/v1
    -> X25519 <base64 ephemeral share>
    <base64 wrapped file key, 64 columns per line, last line shorter>
    --- <base64 HMAC-SHA256 of everything up to and including "---">
    <16-byte nonce><chunk 0><chunk 1>...<last chunk>

Every base64 string is standard-alphabet, unpadded and canonical; parsing is strict because
the header MAC only covers bytes, and two encodings of one header would be a malleability hole.
"""

from __future__ import annotations

import base64
import hmac
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fusenode.storage.errors import DecryptionError, HeaderError, InvalidArgument, NoIdentityMatch

__all__ = [
    "CHUNK_SIZE",
    "FILE_KEY_SIZE",
    "MAX_HEADER_SIZE",
    "PAYLOAD_NONCE_SIZE",
    "Header",
    "Identity",
    "KeyIdentity",
    "KeyRecipient",
    "MLKEM768X25519Identity",
    "MLKEM768X25519Recipient",
    "PayloadDecryptor",
    "PayloadEncryptor",
    "Recipient",
    "ScryptPassphrase",
    "Stanza",
    "X25519Identity",
    "X25519Recipient",
    "decode_header",
    "decrypt",
    "decrypt_stream",
    "encode_header",
    "encrypt",
    "encrypt_stream",
    "header_length",
    "is_post_quantum",
    "new_file_key",
    "parse_identities",
    "parse_identity",
    "parse_recipient",
    "read_header",
    "rewrap_header",
    "split_header",
    "unwrap_file_key",
]

FILE_KEY_SIZE = 16
CHUNK_SIZE = 65536
TAG_SIZE = 16
ENCRYPTED_CHUNK_SIZE = CHUNK_SIZE + TAG_SIZE
PAYLOAD_NONCE_SIZE = 16
# Bounds what a hostile header can make us buffer; ~7000 X25519 recipients fit.
MAX_HEADER_SIZE = 1 << 20
# Read size of the stream helpers: 16 chunks per update() keeps per-call overhead negligible.
_IO_BLOCK = 16 * CHUNK_SIZE

_VERSION_LINE = b"age-encryption.org/v1"
_BODY_COLUMNS = 64
_MAC_SIZE = 32
_MAC_LINE_TAIL = 45  # " " + 43 base64 characters + "\n" follow the "---"
_X25519_LABEL = b"age-encryption.org/v1/X25519"
_SCRYPT_LABEL = b"age-encryption.org/v1/scrypt"
_ZERO_NONCE = bytes(12)
# 11-byte big-endian chunk counter (top 3 bytes always zero here) || last-chunk flag.
_CHUNK_NONCE = struct.Struct(">3xQB")

_B64_CHARS = re.compile(rb"[A-Za-z0-9+/]*")
_VCHARS = re.compile(rb"[\x21-\x7e]+")
_VCHARS_STR = re.compile(r"[\x21-\x7e]+")
_MAC_LINE = re.compile(rb"--- ([A-Za-z0-9+/]{43})\n")
_LOG_N = re.compile(r"[1-9][0-9]?")


# --------------------------------------------------------------------------- helpers


def _b64encode(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _b64decode(text: bytes, what: str) -> bytes:
    """Decode unpadded base64 and insist on the one canonical encoding (no padding, zero bits)."""
    if not _B64_CHARS.fullmatch(text) or len(text) % 4 == 1:
        raise HeaderError(f"malformed age header: {what} is not unpadded base64")
    raw = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    if _b64encode(raw) != text:
        raise HeaderError(f"malformed age header: {what} is not canonical base64")
    return raw


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _check_file_key(file_key: bytes) -> None:
    if not isinstance(file_key, bytes) or len(file_key) != FILE_KEY_SIZE:
        raise InvalidArgument(f"an age file key is {FILE_KEY_SIZE} bytes")


def new_file_key() -> bytes:
    """A fresh random file key. Never derive one from content: no convergent encryption."""
    return os.urandom(FILE_KEY_SIZE)


# --------------------------------------------------------------------------- Bech32 (BIP 173)

_BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _bech32_polymod(values: Iterable[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = ((chk & 0x1FFFFFF) << 5) ^ v
        for i, gen in enumerate(_BECH32_GEN):
            if (top >> i) & 1:
                chk ^= gen
    return chk


def _bech32_hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: Iterable[int], frm: int, to: int, pad: bool) -> list[int] | None:
    acc = bits = 0
    out: list[int] = []
    maxv = (1 << to) - 1
    for value in data:
        acc = (acc << frm) | value
        bits += frm
        while bits >= to:
            bits -= to
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (to - bits)) & maxv)
    elif bits >= frm or (acc << (to - bits)) & maxv:
        return None
    return out


def _bech32_encode(hrp: str, data: bytes) -> str:
    """Lowercase Bech32 (the checksum is defined over the lowercase form)."""
    words = _convert_bits(data, 8, 5, pad=True)
    assert words is not None
    poly = _bech32_polymod([*_bech32_hrp_expand(hrp), *words, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(poly >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_BECH32_CHARSET[w] for w in words + checksum)


def _bech32_decode(text: str) -> tuple[str, bytes]:
    """Return (hrp in its original case, data). age drops BIP 173's 90-character limit."""
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed case")
    lower = text.lower()
    pos = lower.rfind("1")
    if pos < 1 or pos + 7 > len(lower):
        raise ValueError("no separator or checksum")
    hrp = lower[:pos]
    if any(not 33 <= ord(c) <= 126 for c in hrp):
        raise ValueError("bad human-readable part")
    try:
        words = [_BECH32_CHARSET.index(c) for c in lower[pos + 1 :]]
    except ValueError:
        raise ValueError("character outside the Bech32 alphabet") from None
    if _bech32_polymod([*_bech32_hrp_expand(hrp), *words]) != 1:
        raise ValueError("bad checksum")
    data = _convert_bits(words[:-6], 5, 8, pad=False)
    if data is None:
        raise ValueError("bad padding")
    return text[:pos], bytes(data)


# --------------------------------------------------------------------------- header model


@dataclass(frozen=True)
class Stanza:
    """One recipient stanza: ``-> type args...`` plus a binary body."""

    type: str
    args: tuple[str, ...]
    body: bytes

    def __post_init__(self) -> None:
        for arg in (self.type, *self.args):
            if not isinstance(arg, str) or not _VCHARS_STR.fullmatch(arg):
                raise InvalidArgument(f"stanza argument {arg!r} is not printable ASCII")

    def encode(self) -> bytes:
        """Canonical form: body base64 wrapped at 64 columns, last line always shorter."""
        line = b"-> " + " ".join((self.type, *self.args)).encode("ascii") + b"\n"
        b64 = _b64encode(self.body)
        rows = [b64[i : i + _BODY_COLUMNS] for i in range(0, len(b64), _BODY_COLUMNS)]
        if not rows or len(rows[-1]) == _BODY_COLUMNS:
            rows.append(b"")
        return line + b"\n".join(rows) + b"\n"


@dataclass(frozen=True)
class Header:
    """A parsed header. ``raw`` is its exact bytes, MAC line included."""

    stanzas: tuple[Stanza, ...]
    mac: bytes
    raw: bytes

    @property
    def length(self) -> int:
        return len(self.raw)

    @property
    def mac_input(self) -> bytes:
        """The bytes the MAC covers: everything up to and including ``---``."""
        return self.raw[:-_MAC_LINE_TAIL]


class Recipient(Protocol):
    """Something that can wrap a file key into a stanza."""

    def wrap(self, file_key: bytes) -> Stanza: ...


class Identity(Protocol):
    """Something that may unwrap a file key; None means 'not for me'."""

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None: ...


# --------------------------------------------------------------------------- X25519


class X25519Recipient:
    """An ``age1...`` public key."""

    __slots__ = ("_key", "_public")

    post_quantum = False

    def __init__(self, public_key: bytes) -> None:
        if len(public_key) != 32:
            raise InvalidArgument("an X25519 public key is 32 bytes")
        self._public = bytes(public_key)
        self._key = X25519PublicKey.from_public_bytes(self._public)

    @classmethod
    def from_string(cls, text: str) -> X25519Recipient:
        text = text.strip()
        try:
            hrp, data = _bech32_decode(text)
        except ValueError as exc:
            raise HeaderError(f"invalid age recipient {text!r}: {exc}") from None
        if hrp != "age":
            raise HeaderError(f"invalid age recipient {text!r}: expected a lowercase age1... key")
        if len(data) != 32:
            raise HeaderError(f"invalid age recipient {text!r}: wrong key length")
        return cls(data)

    def to_string(self) -> str:
        return _bech32_encode("age", self._public)

    @property
    def public_bytes(self) -> bytes:
        return self._public

    def wrap(self, file_key: bytes) -> Stanza:
        _check_file_key(file_key)
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes_raw()
        try:
            shared = ephemeral.exchange(self._key)
        except ValueError:
            raise HeaderError(f"invalid age recipient {self.to_string()}: low-order key") from None
        wrap_key = _hkdf(shared, share + self._public, _X25519_LABEL)
        body = ChaCha20Poly1305(wrap_key).encrypt(_ZERO_NONCE, file_key, None)
        return Stanza("X25519", (_b64encode(share).decode("ascii"),), body)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, X25519Recipient) and other._public == self._public

    def __hash__(self) -> int:
        return hash(self._public)

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"X25519Recipient({self.to_string()!r})"


class X25519Identity:
    """An ``AGE-SECRET-KEY-1...`` secret key. Its repr never shows the secret."""

    __slots__ = ("_key", "_recipient", "_secret")

    post_quantum = False

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise InvalidArgument("an X25519 secret key is 32 bytes")
        self._secret = bytes(secret)
        self._key = X25519PrivateKey.from_private_bytes(self._secret)
        self._recipient = X25519Recipient(self._key.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> X25519Identity:
        return cls(os.urandom(32))

    @classmethod
    def from_string(cls, text: str) -> X25519Identity:
        # Error messages never echo the text: it is a secret.
        try:
            hrp, data = _bech32_decode(text.strip())
        except ValueError as exc:
            raise HeaderError(f"invalid age identity: {exc}") from None
        if hrp != "AGE-SECRET-KEY-":
            raise HeaderError("invalid age identity: expected an uppercase AGE-SECRET-KEY-1... key")
        if len(data) != 32:
            raise HeaderError("invalid age identity: wrong key length")
        return cls(data)

    def to_string(self) -> str:
        return _bech32_encode("age-secret-key-", self._secret).upper()

    @property
    def recipient(self) -> X25519Recipient:
        return self._recipient

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None:
        """The file key from the first X25519 stanza addressed to us, else None."""
        for stanza in stanzas:
            if stanza.type != "X25519":
                continue
            if len(stanza.args) != 1:
                raise HeaderError("malformed age header: X25519 stanza needs exactly 1 argument")
            share = _b64decode(stanza.args[0].encode("ascii"), "X25519 ephemeral share")
            if len(share) != 32:
                raise HeaderError("malformed age header: X25519 share is not 32 bytes")
            if len(stanza.body) != FILE_KEY_SIZE + TAG_SIZE:
                raise HeaderError("malformed age header: X25519 stanza body is not 32 bytes")
            try:
                shared = self._key.exchange(X25519PublicKey.from_public_bytes(share))
            except ValueError:
                raise HeaderError(
                    "malformed age header: X25519 share is a low-order point"
                ) from None
            wrap_key = _hkdf(shared, share + self._recipient.public_bytes, _X25519_LABEL)
            try:
                return ChaCha20Poly1305(wrap_key).decrypt(_ZERO_NONCE, stanza.body, None)
            except InvalidTag:
                continue
        return None

    def __repr__(self) -> str:
        return f"X25519Identity(recipient={self._recipient.to_string()!r})"


# --------------------------------------------------------------------------- mlkem768x25519

# The hybrid KEM MLKEM768-X25519 (X-Wing) in HPKE base mode with HKDF-SHA-256 and
# ChaCha20-Poly1305 (RFC 9180; the KEM as filippo.io/hpke-pq and draft-ietf-hpke-pq define
# it), as C2SP age's mlkem768x25519 recipient type uses it.
_PQ_STANZA = "mlkem768x25519"
_PQ_INFO = b"age-encryption.org/mlkem768x25519"
_XWING_LABEL = b"\\.//^\\"  # 5c2e2f2f5e5c
_MLKEM_EK = 1184
_MLKEM_CT = 1088
_PQ_ENC_SIZE = _MLKEM_CT + 32  # 1120
_PQ_PUBLIC_SIZE = _MLKEM_EK + 32  # 1216
_HPKE_SUITE = b"HPKE" + struct.pack(">HHH", 0x647A, 0x0001, 0x0003)
_HPKE_VERSION = b"HPKE-v1"


def _labeled_extract(salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt, _HPKE_VERSION + _HPKE_SUITE + label + ikm, "sha256")


def _labeled_expand(prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled = struct.pack(">H", length) + _HPKE_VERSION + _HPKE_SUITE + label + info
    return HKDFExpand(hashes.SHA256(), length, labeled).derive(prk)


def _hpke_context(shared_secret: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    """RFC 9180 KeySchedule, mode_base, no PSK, info = the age label: (AEAD, base nonce)."""
    context = (
        b"\x00"
        + _labeled_extract(b"", b"psk_id_hash", b"")
        + _labeled_extract(b"", b"info_hash", _PQ_INFO)
    )
    secret = _labeled_extract(shared_secret, b"secret", b"")
    key = _labeled_expand(secret, b"key", context, 32)
    nonce = _labeled_expand(secret, b"base_nonce", context, 12)
    return ChaCha20Poly1305(key), nonce  # the first (only) message uses the base nonce


def _xwing_combine(ss_pq: bytes, ss_t: bytes, ct_t: bytes, ek_t: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA3_256())
    digest.update(ss_pq + ss_t + ct_t + ek_t + _XWING_LABEL)
    return digest.finalize()


def _xwing_expand(seed: bytes) -> tuple[MLKEM768PrivateKey, X25519PrivateKey, bytes]:
    """expandKey: SHAKE256(seed, 96) = ML-KEM-768 seed (d || z) || X25519 scalar."""
    shake = hashes.Hash(hashes.SHAKE256(96))
    shake.update(seed)
    full = shake.finalize()
    mlkem = MLKEM768PrivateKey.from_seed_bytes(full[:64])
    x25519 = X25519PrivateKey.from_private_bytes(full[64:])
    public = mlkem.public_key().public_bytes_raw() + x25519.public_key().public_bytes_raw()
    return mlkem, x25519, public


class MLKEM768X25519Recipient:
    """An ``age1pq1...`` post-quantum hybrid public key (ML-KEM-768 key || X25519 key)."""

    __slots__ = ("_mlkem", "_public", "_x25519")

    post_quantum = True

    def __init__(self, public_key: bytes) -> None:
        if len(public_key) != _PQ_PUBLIC_SIZE:
            raise InvalidArgument(f"an mlkem768x25519 public key is {_PQ_PUBLIC_SIZE} bytes")
        self._public = bytes(public_key)
        try:
            self._mlkem = MLKEM768PublicKey.from_public_bytes(self._public[:_MLKEM_EK])
        except ValueError:
            raise HeaderError("invalid age1pq recipient: not an ML-KEM-768 public key") from None
        self._x25519 = X25519PublicKey.from_public_bytes(self._public[_MLKEM_EK:])

    @classmethod
    def from_string(cls, text: str) -> MLKEM768X25519Recipient:
        text = text.strip()
        short = f"{text[:20]}...{text[-6:]}" if len(text) > 40 else text
        try:
            hrp, data = _bech32_decode(text)
        except ValueError as exc:
            raise HeaderError(f"invalid age recipient {short!r}: {exc}") from None
        if hrp != "age1pq":
            raise HeaderError(
                f"invalid age recipient {short!r}: expected a lowercase age1pq1... key"
            )
        if len(data) != _PQ_PUBLIC_SIZE:
            raise HeaderError(f"invalid age recipient {short!r}: wrong key length")
        return cls(data)

    def to_string(self) -> str:
        return _bech32_encode("age1pq", self._public)

    @property
    def public_bytes(self) -> bytes:
        return self._public

    def wrap(self, file_key: bytes) -> Stanza:
        _check_file_key(file_key)
        ss_pq, ct_pq = self._mlkem.encapsulate()
        ephemeral = X25519PrivateKey.generate()
        ct_t = ephemeral.public_key().public_bytes_raw()
        try:
            ss_t = ephemeral.exchange(self._x25519)
        except ValueError:
            raise HeaderError("invalid age1pq recipient: low-order X25519 key") from None
        shared = _xwing_combine(ss_pq, ss_t, ct_t, self._public[_MLKEM_EK:])
        aead, nonce = _hpke_context(shared)
        body = aead.encrypt(nonce, file_key, None)
        return Stanza(_PQ_STANZA, (_b64encode(ct_pq + ct_t).decode("ascii"),), body)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MLKEM768X25519Recipient) and other._public == self._public

    def __hash__(self) -> int:
        return hash(self._public)

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        text = self.to_string()
        return f"MLKEM768X25519Recipient({text[:24]}...{text[-8:]})"


class MLKEM768X25519Identity:
    """An ``AGE-SECRET-KEY-PQ-1...`` 32-byte seed. Its repr never shows the secret."""

    __slots__ = ("_mlkem", "_recipient", "_secret", "_x25519")

    post_quantum = True

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise InvalidArgument("an mlkem768x25519 secret key is a 32-byte seed")
        self._secret = bytes(secret)
        self._mlkem, self._x25519, public = _xwing_expand(self._secret)
        self._recipient = MLKEM768X25519Recipient(public)

    @classmethod
    def generate(cls) -> MLKEM768X25519Identity:
        return cls(os.urandom(32))

    @classmethod
    def from_string(cls, text: str) -> MLKEM768X25519Identity:
        try:
            hrp, data = _bech32_decode(text.strip())
        except ValueError as exc:
            raise HeaderError(f"invalid age identity: {exc}") from None
        if hrp != "AGE-SECRET-KEY-PQ-":
            raise HeaderError(
                "invalid age identity: expected an uppercase AGE-SECRET-KEY-PQ-1... key"
            )
        if len(data) != 32:
            raise HeaderError("invalid age identity: wrong key length")
        return cls(data)

    def to_string(self) -> str:
        return _bech32_encode("age-secret-key-pq-", self._secret).upper()

    @property
    def recipient(self) -> MLKEM768X25519Recipient:
        return self._recipient

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None:
        """The file key from the first mlkem768x25519 stanza addressed to us, else None."""
        for stanza in stanzas:
            if stanza.type != _PQ_STANZA:
                continue
            if len(stanza.args) != 1:
                raise HeaderError(
                    "malformed age header: mlkem768x25519 stanza needs exactly 1 argument"
                )
            enc = _b64decode(stanza.args[0].encode("ascii"), "mlkem768x25519 enc")
            if len(enc) != _PQ_ENC_SIZE:
                raise HeaderError(
                    f"malformed age header: mlkem768x25519 enc is not {_PQ_ENC_SIZE} bytes"
                )
            if len(stanza.body) != FILE_KEY_SIZE + TAG_SIZE:
                raise HeaderError("malformed age header: mlkem768x25519 body is not 32 bytes")
            ct_t = enc[_MLKEM_CT:]
            ss_pq = self._mlkem.decapsulate(enc[:_MLKEM_CT])  # implicit rejection: no error
            try:
                ss_t = self._x25519.exchange(X25519PublicKey.from_public_bytes(ct_t))
            except ValueError:
                raise HeaderError(
                    "malformed age header: the X25519 part of an mlkem768x25519 enc is a "
                    "low-order point"
                ) from None
            shared = _xwing_combine(ss_pq, ss_t, ct_t, self._recipient.public_bytes[_MLKEM_EK:])
            aead, nonce = _hpke_context(shared)
            try:
                return aead.decrypt(nonce, stanza.body, None)
            except InvalidTag:
                continue
        return None

    def __repr__(self) -> str:
        return f"MLKEM768X25519Identity(recipient={self._recipient!r})"


# --------------------------------------------------------------------------- key strings

#: A recipient or identity with a textual form (``age1...``, ``AGE-SECRET-KEY-...``).
KeyRecipient = X25519Recipient | MLKEM768X25519Recipient
KeyIdentity = X25519Identity | MLKEM768X25519Identity


def parse_recipient(text: str) -> KeyRecipient:
    """An ``age1pq1...`` (post-quantum hybrid) or ``age1...`` (X25519) recipient."""
    text = text.strip()
    if text.lower().startswith("age1pq1"):
        return MLKEM768X25519Recipient.from_string(text)
    return X25519Recipient.from_string(text)


def parse_identity(text: str) -> KeyIdentity:
    """An ``AGE-SECRET-KEY-PQ-1...`` or ``AGE-SECRET-KEY-1...`` identity."""
    text = text.strip()
    if text.upper().startswith("AGE-SECRET-KEY-PQ-1"):
        return MLKEM768X25519Identity.from_string(text)
    return X25519Identity.from_string(text)


def is_post_quantum(recipient: object) -> bool:
    """Whether ``recipient`` (or identity) is of a quantum-resistant type."""
    return bool(getattr(recipient, "post_quantum", False))


def parse_identities(text: str) -> list[KeyIdentity]:
    """Parse an identity file: one key per line, ``#`` comments and blank lines ignored.

    A line that is neither is an error (as in age): a typo must not silently drop a key.
    """
    identities: list[KeyIdentity] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(parse_identity(line))
        except HeaderError as exc:
            raise HeaderError(f"identity file line {number}: {exc}") from None
    if not identities:
        raise HeaderError(
            "no age identities (AGE-SECRET-KEY-1... or AGE-SECRET-KEY-PQ-1...) found in the "
            "identity file"
        )
    return identities


# --------------------------------------------------------------------------- scrypt


class ScryptPassphrase:
    """A passphrase: recipient (wrap) and identity (unwrap) at once.

    ``log_n`` is the work factor used when encrypting (2**18 per the spec, ~256 MiB of RAM).
    ``max_log_n`` caps what a header may ask of us when decrypting (each +1 doubles time and
    memory), so a hostile file cannot burn minutes and gigabytes.
    """

    __slots__ = ("_passphrase", "log_n", "max_log_n")

    def __init__(self, passphrase: str | bytes, *, log_n: int = 18, max_log_n: int = 22) -> None:
        if isinstance(passphrase, str):
            passphrase = passphrase.encode("utf-8")
        if not passphrase:
            raise InvalidArgument("the passphrase is empty")
        if not 1 <= log_n <= max_log_n:
            raise InvalidArgument(f"scrypt log_n must be in 1..{max_log_n}, got {log_n}")
        self._passphrase = bytes(passphrase)
        self.log_n = log_n
        self.max_log_n = max_log_n

    def _derive(self, salt: bytes, log_n: int) -> bytes:
        kdf = Scrypt(salt=_SCRYPT_LABEL + salt, length=32, n=1 << log_n, r=8, p=1)
        return kdf.derive(self._passphrase)

    def wrap(self, file_key: bytes) -> Stanza:
        _check_file_key(file_key)
        salt = os.urandom(16)
        body = ChaCha20Poly1305(self._derive(salt, self.log_n)).encrypt(_ZERO_NONCE, file_key, None)
        return Stanza("scrypt", (_b64encode(salt).decode("ascii"), str(self.log_n)), body)

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None:
        scrypt = [s for s in stanzas if s.type == "scrypt"]
        if not scrypt:
            return None
        if len(stanzas) != 1:
            raise HeaderError("malformed age header: an scrypt stanza must be the only stanza")
        stanza = scrypt[0]
        if len(stanza.args) != 2:
            raise HeaderError("malformed age header: scrypt stanza needs exactly 2 arguments")
        salt = _b64decode(stanza.args[0].encode("ascii"), "scrypt salt")
        if len(salt) != 16:
            raise HeaderError("malformed age header: scrypt salt is not 16 bytes")
        if not _LOG_N.fullmatch(stanza.args[1]):
            raise HeaderError("malformed age header: scrypt work factor is not a decimal number")
        log_n = int(stanza.args[1])
        if log_n > self.max_log_n:
            raise HeaderError(
                f"scrypt work factor 2^{log_n} exceeds the allowed maximum 2^{self.max_log_n}"
            )
        if len(stanza.body) != FILE_KEY_SIZE + TAG_SIZE:
            raise HeaderError("malformed age header: scrypt stanza body is not 32 bytes")
        try:
            return ChaCha20Poly1305(self._derive(salt, log_n)).decrypt(
                _ZERO_NONCE, stanza.body, None
            )
        except InvalidTag:
            return None

    def __repr__(self) -> str:
        return f"ScryptPassphrase(log_n={self.log_n})"


# --------------------------------------------------------------------------- header codec


def _header_mac(file_key: bytes, mac_input: bytes) -> bytes:
    return hmac.digest(_hkdf(file_key, b"", b"header"), mac_input, "sha256")


def _build_header(file_key: bytes, stanzas: Sequence[Stanza]) -> bytes:
    if not stanzas:
        raise InvalidArgument("an age header needs at least one recipient")
    if len(stanzas) > 1 and any(s.type == "scrypt" for s in stanzas):
        raise InvalidArgument("a passphrase (scrypt) must be the only recipient of a file")
    mac_input = _VERSION_LINE + b"\n" + b"".join(s.encode() for s in stanzas) + b"---"
    header = mac_input + b" " + _b64encode(_header_mac(file_key, mac_input)) + b"\n"
    if len(header) > MAX_HEADER_SIZE:
        raise InvalidArgument(f"the header would exceed {MAX_HEADER_SIZE} bytes")
    return header


def encode_header(file_key: bytes, recipients: Iterable[Recipient]) -> bytes:
    """The full header, MAC line included, wrapping ``file_key`` to every recipient."""
    _check_file_key(file_key)
    return _build_header(file_key, [r.wrap(file_key) for r in recipients])


def _armored_next(read_line: Callable[[int], bytes]) -> bool:
    """After a blank first line: whether the next non-blank line opens an armor block."""
    for _ in range(8):
        line = read_line(256).strip()
        if line:
            return line.startswith(b"-----")
    return False


def _parse_header(read_line: Callable[[int], bytes]) -> Header:
    """Parse one header from ``read_line(limit)``, which returns the next line with its
    ``\\n`` (or fewer bytes at end of input / at the limit)."""
    lines: list[bytes] = []
    size = 0

    def next_line(what: str) -> bytes:
        nonlocal size
        line = read_line(MAX_HEADER_SIZE - size)
        size += len(line)
        if not line.endswith(b"\n"):
            if size >= MAX_HEADER_SIZE:
                raise HeaderError(f"age header exceeds {MAX_HEADER_SIZE} bytes")
            raise HeaderError(f"truncated age header: missing {what}")
        lines.append(line)
        return line[:-1]

    first = next_line("version line")
    if first != _VERSION_LINE:
        if first.strip().startswith(b"-----") or (not first.strip() and _armored_next(read_line)):
            raise HeaderError(
                "ASCII-armored (PEM, -----BEGIN AGE ENCRYPTED FILE-----) age files are not "
                "supported; use the binary form (age without -a)"
            )
        if first.endswith(b"\r"):
            raise HeaderError("malformed age header: CRLF line endings are not allowed")
        if first.startswith(b"age-encryption.org/"):
            raise HeaderError(f"unsupported age version {first[:40]!r}")
        raise HeaderError("not an age file (no age-encryption.org/v1 line)")

    stanzas: list[Stanza] = []
    while True:
        line = next_line("header MAC line")
        if line.startswith(b"-> "):
            parts = line[3:].split(b" ")
            if not all(_VCHARS.fullmatch(p) for p in parts):
                raise HeaderError("malformed age header: bad stanza argument")
            rows: list[bytes] = []
            while True:
                row = next_line("stanza body")
                if row.startswith((b"-> ", b"---")):
                    raise HeaderError(
                        "malformed age header: a stanza body must end with a line shorter than "
                        "64 columns (an empty body is an empty line)"
                    )
                if len(row) > _BODY_COLUMNS:
                    raise HeaderError("malformed age header: stanza body line over 64 columns")
                rows.append(row)
                if len(row) < _BODY_COLUMNS:
                    break
            body = _b64decode(b"".join(rows), "stanza body")
            args = tuple(p.decode("ascii") for p in parts)
            stanzas.append(Stanza(args[0], args[1:], body))
        elif line.startswith(b"---"):
            match = _MAC_LINE.fullmatch(lines[-1])
            if not match:
                raise HeaderError("malformed age header: bad MAC line")
            mac = _b64decode(match.group(1), "header MAC")
            break
        else:
            raise HeaderError("malformed age header: unexpected line")
    if not stanzas:
        raise HeaderError("malformed age header: no recipient stanzas")
    return Header(tuple(stanzas), mac, b"".join(lines))


def split_header(buf: bytes | bytearray | memoryview) -> tuple[Header, int]:
    """Parse the header at the start of ``buf`` (a header, or a whole age file).

    Returns the header and its length: the payload starts at that offset.
    """
    data = bytes(buf[:MAX_HEADER_SIZE])
    pos = 0

    def read_line(limit: int) -> bytes:
        nonlocal pos
        end = data.find(b"\n", pos, pos + limit)
        stop = pos + limit if end < 0 else end + 1
        line = data[pos:stop]
        pos += len(line)
        return line

    header = _parse_header(read_line)
    return header, header.length


def header_length(buf: bytes | bytearray | memoryview) -> int:
    """How many bytes of ``buf`` the header takes (where the payload starts)."""
    return split_header(buf)[1]


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse exactly one header; ``data`` must hold nothing after the MAC line.

    Use :func:`split_header` on a whole age file.
    """
    header, length = split_header(data)
    if length != len(data):
        raise HeaderError(
            f"{len(data) - length} bytes after the age header MAC line "
            "(use split_header() on a whole age file)"
        )
    return header


def read_header(src: BinaryIO) -> Header:
    """Read one header from a stream, leaving it positioned at the first payload byte."""
    return _parse_header(src.readline)


def _as_header(header: Header | bytes | bytearray | memoryview) -> Header:
    return header if isinstance(header, Header) else decode_header(header)


def unwrap_file_key(
    header: Header | bytes | bytearray | memoryview, identities: Iterable[Identity]
) -> bytes:
    """Open the file key with the first identity that can, and verify the header MAC."""
    header = _as_header(header)
    identities = list(identities)
    if not identities:
        raise InvalidArgument("no identities given to decrypt with")
    if len(header.stanzas) > 1 and any(s.type == "scrypt" for s in header.stanzas):
        raise HeaderError("malformed age header: an scrypt stanza must be the only stanza")
    for identity in identities:
        file_key = identity.unwrap(header.stanzas)
        if file_key is None:
            continue
        if not hmac.compare_digest(_header_mac(file_key, header.mac_input), header.mac):
            raise DecryptionError("age header MAC mismatch: the header is corrupt or was altered")
        return file_key
    raise NoIdentityMatch(
        f"no identity matches any of the {len(header.stanzas)} recipient stanza(s) of this file"
    )


def rewrap_header(
    header: Header | bytes | bytearray | memoryview,
    identities: Iterable[Identity],
    new_recipients: Iterable[Recipient],
) -> bytes:
    """A new header for the same file key: the old stanzas plus one per new recipient.

    The payload is untouched, so access is granted without re-encrypting. (Revocation cannot
    work this way: whoever once held the file key keeps it.)
    """
    header = _as_header(header)
    file_key = unwrap_file_key(header, identities)
    added = [r.wrap(file_key) for r in new_recipients]
    if not added:
        raise InvalidArgument("rewrap_header needs at least one new recipient")
    return _build_header(file_key, [*header.stanzas, *added])


# --------------------------------------------------------------------------- payload (STREAM)


def _payload_aead(file_key: bytes, nonce: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))


def _as_byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


class PayloadEncryptor:
    """Incremental payload encryption: constant memory, any split of the input.

    One full chunk is held back until more input arrives, because only then is it known not
    to be the last one (the last chunk carries a flag in its nonce).

    ``nonce`` exists for test vectors: reusing one with the same file key reuses the payload
    key and nonces, which breaks ChaCha20-Poly1305. Leave it None.
    """

    def __init__(self, file_key: bytes, nonce: bytes | None = None) -> None:
        _check_file_key(file_key)
        if nonce is None:
            nonce = os.urandom(PAYLOAD_NONCE_SIZE)
        elif len(nonce) != PAYLOAD_NONCE_SIZE:
            raise InvalidArgument(f"the payload nonce is {PAYLOAD_NONCE_SIZE} bytes")
        self._nonce = bytes(nonce)
        self._aead = _payload_aead(file_key, self._nonce)
        self._counter = 0
        self._pending = bytearray()  # 0..CHUNK_SIZE bytes, possibly the last chunk
        self._prefix = self._nonce  # emitted before the first ciphertext byte
        self._scratch = bytearray()  # reused output buffer: fresh big buffers cost page faults
        self._finished = False

    @property
    def nonce(self) -> bytes:
        return self._nonce

    def _seal(self, chunk: bytes | bytearray | memoryview, out: memoryview, last: int) -> None:
        self._aead.encrypt_into(_CHUNK_NONCE.pack(self._counter, last), chunk, None, out)
        self._counter += 1

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Encrypt more plaintext; return the ciphertext completed so far.

        The first call's output starts with the 16-byte payload nonce.
        """
        if self._finished:
            raise InvalidArgument("PayloadEncryptor.update() after finalize()")
        view = _as_byte_view(data)
        pending = self._pending
        total = len(pending) + len(view)
        prefix = self._prefix
        self._prefix = b""
        if total <= CHUNK_SIZE:
            pending += view
            return prefix
        keep = total % CHUNK_SIZE or CHUNK_SIZE  # the tail that may still be the last chunk
        count = (total - keep) // CHUNK_SIZE
        size = len(prefix) + count * ENCRYPTED_CHUNK_SIZE
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        outv = memoryview(self._scratch)[:size]
        outv[: len(prefix)] = prefix
        o = len(prefix)
        pos = 0
        if pending:
            pos = CHUNK_SIZE - len(pending)
            pending += view[:pos]
            self._seal(pending, outv[o : o + ENCRYPTED_CHUNK_SIZE], 0)
            o += ENCRYPTED_CHUNK_SIZE
            count -= 1
        for _ in range(count):
            self._seal(view[pos : pos + CHUNK_SIZE], outv[o : o + ENCRYPTED_CHUNK_SIZE], 0)
            pos += CHUNK_SIZE
            o += ENCRYPTED_CHUNK_SIZE
        pending[:] = view[pos:]
        return bytes(outv)

    def finalize(self) -> bytes:
        """Seal the last chunk (empty only when the whole plaintext is empty)."""
        if self._finished:
            raise InvalidArgument("PayloadEncryptor.finalize() called twice")
        self._finished = True
        prefix = self._prefix
        out = bytearray(len(prefix) + len(self._pending) + TAG_SIZE)
        outv = memoryview(out)
        outv[: len(prefix)] = prefix
        self._seal(self._pending, outv[len(prefix) :], 1)
        self._pending = bytearray()
        return bytes(out)


class PayloadDecryptor:
    """Incremental payload decryption: constant memory, any split of the input.

    Each chunk is authenticated before its plaintext is returned, but the stream as a whole is
    only known complete when finalize() returns: until then, treat output as provisional
    (write it to a temporary file, rename on success).
    """

    def __init__(self, file_key: bytes) -> None:
        _check_file_key(file_key)
        self._file_key = file_key
        self._aead: ChaCha20Poly1305 | None = None
        self._nonce = bytearray()
        self._counter = 0
        self._pending = bytearray()  # 0..ENCRYPTED_CHUNK_SIZE bytes, possibly the last chunk
        self._scratch = bytearray()  # reused output buffer: fresh big buffers cost page faults
        self._finished = False
        self._deferred: str | None = None  # an error the next call raises

    @property
    def nonce(self) -> bytes | None:
        return bytes(self._nonce) if self._aead is not None else None

    def _open(self, chunk: bytes | bytearray | memoryview, out: memoryview, last: int) -> None:
        assert self._aead is not None
        self._aead.decrypt_into(_CHUNK_NONCE.pack(self._counter, last), chunk, None, out)
        self._counter += 1

    def _fail(self, message: str) -> DecryptionError:
        self._finished = True
        self._pending = bytearray()
        return DecryptionError(message)

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Decrypt more ciphertext; return the plaintext of the chunks completed so far."""
        if self._finished:
            if self._deferred is not None:
                message, self._deferred = self._deferred, None
                raise DecryptionError(message)
            raise InvalidArgument("PayloadDecryptor.update() after finalize() or a failure")
        view = _as_byte_view(data)
        if self._aead is None:
            take = PAYLOAD_NONCE_SIZE - len(self._nonce)
            self._nonce += view[:take]
            view = view[take:]
            if len(self._nonce) < PAYLOAD_NONCE_SIZE:
                return b""
            self._aead = _payload_aead(self._file_key, bytes(self._nonce))
        pending = self._pending
        total = len(pending) + len(view)
        if total <= ENCRYPTED_CHUNK_SIZE:
            pending += view
            if len(pending) < ENCRYPTED_CHUNK_SIZE:
                return b""
            return self._release_full(memoryview(bytearray(CHUNK_SIZE)), 0)
        keep = total % ENCRYPTED_CHUNK_SIZE or ENCRYPTED_CHUNK_SIZE
        count = (total - keep) // ENCRYPTED_CHUNK_SIZE
        size = (count + 1) * CHUNK_SIZE  # room for the chunk _release_full may open
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        outv = memoryview(self._scratch)[:size]
        o = pos = 0
        try:
            if pending:
                pos = ENCRYPTED_CHUNK_SIZE - len(pending)
                pending += view[:pos]
                self._open(pending, outv[:CHUNK_SIZE], 0)
                o = CHUNK_SIZE
                count -= 1
            for _ in range(count):
                self._open(view[pos : pos + ENCRYPTED_CHUNK_SIZE], outv[o : o + CHUNK_SIZE], 0)
                pos += ENCRYPTED_CHUNK_SIZE
                o += CHUNK_SIZE
        except InvalidTag:
            failed = (
                pending
                if len(pending) == ENCRYPTED_CHUNK_SIZE and o == 0
                else view[pos : pos + ENCRYPTED_CHUNK_SIZE]
            )
            # A full chunk with data after it that opens only as the *final* chunk: its
            # plaintext is authentic and released (as age does), the trailing data is the
            # error, raised by the next call. Anything else fails here.
            try:
                self._aead.decrypt_into(
                    _CHUNK_NONCE.pack(self._counter, 1), failed, None, outv[o : o + CHUNK_SIZE]
                )
            except InvalidTag:
                raise self._fail(
                    f"age payload authentication failed at chunk {self._counter}"
                ) from None
            self._deferred = f"trailing data after the final age payload chunk {self._counter}"
            self._finished = True
            self._pending = bytearray()
            return bytes(outv[: o + CHUNK_SIZE])
        pending[:] = view[pos:]
        return self._release_full(outv, o)

    def _release_full(self, outv: memoryview, o: int) -> bytes:
        """``outv[:o]``, plus the pending chunk's plaintext when it is a full chunk that opens
        as a non-final one (so it cannot be the last: release it now, as age does, rather
        than at the next update). A full chunk that does not may be the final one, and stays
        for finalize() to judge."""
        pending = self._pending
        if len(pending) == ENCRYPTED_CHUNK_SIZE:
            try:
                self._open(pending, outv[o : o + CHUNK_SIZE], 0)
            except InvalidTag:
                pass
            else:
                pending.clear()
                o += CHUNK_SIZE
        return bytes(outv[:o])

    def finalize(self) -> bytes:
        """Open the last chunk; raise if the stream is truncated or was never complete."""
        if self._finished:
            if self._deferred is not None:
                message, self._deferred = self._deferred, None
                raise DecryptionError(message)
            raise InvalidArgument("PayloadDecryptor.finalize() after finalize() or a failure")
        if self._aead is None:
            self._fail("")
            # age counts the nonce with the header: a file that ends before it is malformed.
            raise HeaderError("truncated age file: the 16-byte payload nonce is missing")
        chunk = self._pending
        if not chunk:
            raise self._fail("truncated age payload: the final chunk is missing")
        if len(chunk) < TAG_SIZE:
            raise self._fail("truncated age payload: final chunk shorter than its tag")
        if len(chunk) == TAG_SIZE and self._counter > 0:
            raise self._fail("invalid age payload: empty final chunk after data chunks")
        out = bytearray(len(chunk) - TAG_SIZE)
        try:
            self._open(chunk, memoryview(out), 1)
        except InvalidTag:
            if len(chunk) == ENCRYPTED_CHUNK_SIZE:
                try:
                    self._open(chunk, memoryview(out), 0)
                except InvalidTag:
                    pass
                else:
                    raise self._fail("truncated age payload: the final chunk is missing") from None
            raise self._fail(
                f"age payload authentication failed at chunk {self._counter}"
            ) from None
        self._finished = True
        self._pending = bytearray()
        return bytes(out)


# --------------------------------------------------------------------------- whole files


def encrypt_stream(src: BinaryIO, dst: BinaryIO, recipients: Iterable[Recipient]) -> int:
    """Write a complete age file of ``src`` to ``dst`` in constant memory; return bytes written."""
    file_key = new_file_key()
    header = encode_header(file_key, recipients)
    dst.write(header)
    return len(header) + _pump(src, dst, PayloadEncryptor(file_key))


def decrypt_stream(src: BinaryIO, dst: BinaryIO, identities: Iterable[Identity]) -> int:
    """Decrypt a complete age file in constant memory; return plaintext bytes written.

    On error, ``dst`` may already hold authenticated but incomplete plaintext: write to a
    temporary file and rename it only when this returns.
    """
    header = read_header(src)
    return _pump(src, dst, PayloadDecryptor(unwrap_file_key(header, identities)))


def _pump(src: BinaryIO, dst: BinaryIO, cipher: PayloadEncryptor | PayloadDecryptor) -> int:
    """Stream the rest of ``src`` through ``cipher`` into ``dst``; return bytes written."""
    written = 0
    while block := src.read(_IO_BLOCK):
        out = cipher.update(block)
        dst.write(out)
        written += len(out)
    out = cipher.finalize()
    dst.write(out)
    return written + len(out)


def encrypt(plaintext: bytes, recipients: Iterable[Recipient]) -> bytes:
    """A whole age file in memory (small data, e.g. metadata and tests)."""
    file_key = new_file_key()
    enc = PayloadEncryptor(file_key)
    return encode_header(file_key, recipients) + enc.update(plaintext) + enc.finalize()


def decrypt(data: bytes, identities: Iterable[Identity]) -> bytes:
    """Decrypt a whole age file held in memory."""
    header, length = split_header(data)
    dec = PayloadDecryptor(unwrap_file_key(header, identities))
    return dec.update(memoryview(data)[length:]) + dec.finalize()
