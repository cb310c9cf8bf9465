"""Tests of storage.age: the age v1 format, checked against pyrage (rage) as the oracle."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import random

import pyrage
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fusenode.storage import age
from fusenode.storage.errors import (
    CryptoError,
    DecryptionError,
    HeaderError,
    InvalidArgument,
    NoIdentityMatch,
)

CHUNK = age.CHUNK_SIZE
SIZES = [0, 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 1234]
FAST_LOG_N = 10  # scrypt work factor for tests: the spec's 18 costs ~0.6 s per wrap here


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _raw_header(file_key: bytes, stanza_text: bytes) -> bytes:
    """A header built by hand (not by age.encode_header), with a correct MAC."""
    mac_input = b"age-encryption.org/v1\n" + stanza_text + b"---"
    mac = hmac.digest(_hkdf(file_key, b"", b"header"), mac_input, "sha256")
    return mac_input + b" " + _b64(mac).encode() + b"\n"


def _stream(file_key: bytes, nonce: bytes, chunks: list[tuple[bytes, bool]]) -> bytes:
    """An independent STREAM encoder, to craft payloads the encryptor never produces."""
    aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
    out = [nonce]
    for counter, (plain, last) in enumerate(chunks):
        out.append(aead.encrypt(counter.to_bytes(11, "big") + bytes([last]), plain, None))
    return b"".join(out)


class FixedStanza:
    """A recipient that emits a given stanza: lets tests craft headers with a valid MAC."""

    def __init__(self, stanza: age.Stanza) -> None:
        self.stanza = stanza

    def wrap(self, file_key: bytes) -> age.Stanza:
        return self.stanza


@pytest.fixture(scope="module")
def ours() -> age.X25519Identity:
    return age.X25519Identity.generate()


@pytest.fixture(scope="module")
def theirs() -> pyrage.x25519.Identity:
    return pyrage.x25519.Identity.generate()


def _pyrage_recipient(identity: age.X25519Identity) -> pyrage.x25519.Recipient:
    return pyrage.x25519.Recipient.from_str(identity.recipient.to_string())


def _our_recipient(identity: pyrage.x25519.Identity) -> age.X25519Recipient:
    return age.X25519Recipient.from_string(str(identity.to_public()))


def _encrypt_file(plaintext: bytes, recipients: list) -> bytes:
    dst = io.BytesIO()
    written = age.encrypt_stream(io.BytesIO(plaintext), dst, recipients)
    assert written == len(dst.getvalue())
    return dst.getvalue()


def _decrypt_file(data: bytes, identities: list) -> bytes:
    dst = io.BytesIO()
    written = age.decrypt_stream(io.BytesIO(data), dst, identities)
    assert written == len(dst.getvalue())
    return dst.getvalue()


# --------------------------------------------------------------------------- interop


@pytest.mark.parametrize("size", SIZES)
def test_pyrage_decrypts_ours(size: int, ours, theirs) -> None:
    plaintext = _data(size, size)
    ct = _encrypt_file(plaintext, [ours.recipient, _our_recipient(theirs)])
    assert pyrage.decrypt(ct, [theirs]) == plaintext
    # pyrage also accepts our identity string, and our own identity opens the file.
    assert pyrage.decrypt(ct, [pyrage.x25519.Identity.from_str(ours.to_string())]) == plaintext
    assert _decrypt_file(ct, [ours]) == plaintext


@pytest.mark.parametrize("size", SIZES)
def test_we_decrypt_pyrage(size: int, ours, theirs) -> None:
    plaintext = _data(size, size + 1)
    ct = pyrage.encrypt(plaintext, [_pyrage_recipient(ours), theirs.to_public()])
    assert _decrypt_file(ct, [ours]) == plaintext
    assert age.decrypt(ct, [age.X25519Identity.from_string(str(theirs))]) == plaintext


def test_ciphertext_size_matches_the_format(ours) -> None:
    for size in SIZES:
        ct = age.encrypt(_data(size), [ours.recipient])
        chunks = max(1, -(-size // CHUNK))
        assert len(ct) - age.header_length(ct) == 16 + size + 16 * chunks


def test_passphrase_pyrage_decrypts_ours() -> None:
    plaintext = _data(CHUNK + 7)
    ct = age.encrypt(plaintext, [age.ScryptPassphrase("correct horse", log_n=FAST_LOG_N)])
    header = age.decode_header(ct[: age.header_length(ct)])
    assert [(s.type, s.args[1]) for s in header.stanzas] == [("scrypt", str(FAST_LOG_N))]
    assert pyrage.passphrase.decrypt(ct, "correct horse") == plaintext
    with pytest.raises(NoIdentityMatch):
        age.decrypt(ct, [age.ScryptPassphrase("wrong horse")])


def test_passphrase_we_decrypt_pyrage() -> None:
    # rage picks its own work factor (about 1 s of work), so this test costs ~2 s.
    ct = pyrage.passphrase.encrypt(b"secret model", "hunter2")
    assert age.decrypt(ct, [age.ScryptPassphrase("hunter2")]) == b"secret model"


# --------------------------------------------------------------------------- keys


def test_identity_string_round_trip() -> None:
    identity = age.X25519Identity.generate()
    text = identity.to_string()
    assert text.startswith("AGE-SECRET-KEY-1") and text == text.upper()
    again = age.X25519Identity.from_string(text)
    assert again.to_string() == text
    assert again.recipient == identity.recipient
    assert identity.recipient.to_string().startswith("age1")
    assert age.X25519Recipient.from_string(identity.recipient.to_string()) == identity.recipient
    # rage derives the same public key from our secret key.
    assert str(pyrage.x25519.Identity.from_str(text).to_public()) == str(identity.recipient)
    assert text not in repr(identity)


def test_pyrage_keys_parse(theirs) -> None:
    recipient = age.X25519Recipient.from_string(str(theirs.to_public()))
    assert recipient.to_string() == str(theirs.to_public())
    identity = age.X25519Identity.from_string(str(theirs))
    assert identity.to_string() == str(theirs)
    assert identity.recipient == recipient


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: "",
        lambda s: "age1",
        lambda s: s[:-1] + ("q" if s[-1] != "q" else "p"),  # checksum
        lambda s: s.upper(),  # recipients are lowercase
        lambda s: s[:10] + s[10:].upper(),  # mixed case
        lambda s: "agf" + s[3:],  # wrong prefix
        lambda s: s[:-8] + s[-7:],  # a character dropped
        lambda s: s + "b",  # wrong length / checksum
        lambda s: s.replace(s[5], "b" if s[5] != "b" else "o", 1),  # "o" is not Bech32
    ],
)
def test_invalid_recipient_strings(mutate, ours) -> None:
    with pytest.raises(HeaderError, match="invalid age recipient"):
        age.X25519Recipient.from_string(mutate(ours.recipient.to_string()))


def test_invalid_identity_strings_do_not_echo_the_secret(ours) -> None:
    text = ours.to_string()
    for bad in (text[:-1] + ("Q" if text[-1] != "Q" else "P"), text.lower(), text[:-3]):
        with pytest.raises(HeaderError) as err:
            age.X25519Identity.from_string(bad)
        assert text[16:40] not in str(err.value)


def test_parse_identities(theirs) -> None:
    one, two = age.X25519Identity.generate(), str(theirs)
    text = f"# created: today\n# public key: {one.recipient}\n{one.to_string()}\n\n  \n{two}\n"
    parsed = age.parse_identities(text)
    assert [p.to_string() for p in parsed] == [one.to_string(), two]
    with pytest.raises(HeaderError, match="no age identities"):
        age.parse_identities("# only a comment\n\n")
    with pytest.raises(HeaderError, match="line 2") as err:
        age.parse_identities(f"{two}\n{two[:-2]}\n")
    assert two[16:40] not in str(err.value)


def test_low_order_recipient_is_refused() -> None:
    with pytest.raises(HeaderError, match="low-order"):
        age.X25519Recipient(bytes(32)).wrap(age.new_file_key())


# --------------------------------------------------------------------------- wrong keys, tampering


def test_wrong_identity(ours, theirs) -> None:
    ct = age.encrypt(b"x" * 100, [ours.recipient])
    with pytest.raises(NoIdentityMatch, match="no identity matches"):
        age.decrypt(ct, [age.X25519Identity.generate(), age.ScryptPassphrase("pw")])
    with pytest.raises(NoIdentityMatch):
        age.decrypt(pyrage.encrypt(b"x", [theirs.to_public()]), [ours])


def _small_file(identity: age.X25519Identity) -> bytes:
    return age.encrypt(b"a small model, a few dozen bytes long", [identity.recipient])


@pytest.mark.parametrize(
    "where",
    ["version", "stanza-type", "share", "body", "mac-dashes", "mac", "nonce", "chunk", "tag"],
)
def test_flipped_byte_is_rejected(where: str, ours) -> None:
    ct = bytearray(_small_file(ours))
    hlen = age.header_length(ct)
    text = bytes(ct[:hlen])
    positions = {
        "version": 3,
        "stanza-type": text.index(b"X25519"),
        "share": text.index(b"X25519") + 12,
        "body": text.index(b"\n", text.index(b"X25519")) + 5,
        "mac-dashes": text.index(b"---") + 1,
        "mac": hlen - 2,
        "nonce": hlen + 3,
        "chunk": hlen + 20,
        "tag": len(ct) - 1,
    }
    ct[positions[where]] ^= 0x04
    with pytest.raises(CryptoError):
        age.decrypt(bytes(ct), [ours])
    with pytest.raises(CryptoError):
        _decrypt_file(bytes(ct), [ours])


def test_every_single_byte_flip_is_rejected(ours) -> None:
    ct = _small_file(ours)
    for pos in range(len(ct)):
        for bit in (0x01, 0x80):
            bad = bytearray(ct)
            bad[pos] ^= bit
            with pytest.raises(CryptoError):
                age.decrypt(bytes(bad), [ours])


def test_substituted_stanza_fails_the_header_mac(ours) -> None:
    key = age.new_file_key()
    header = age.decode_header(age.encode_header(key, [ours.recipient]))
    other = ours.recipient.wrap(age.new_file_key()).encode()  # same recipient, other key
    forged = header.raw.replace(header.stanzas[0].encode(), other)
    with pytest.raises(DecryptionError, match="MAC"):
        age.unwrap_file_key(forged, [ours])


def _multi_chunk_file(identity: age.X25519Identity, size: int) -> tuple[bytes, int]:
    ct = age.encrypt(_data(size), [identity.recipient])
    return ct, age.header_length(ct)


@pytest.mark.parametrize(
    ("size", "cut", "message"),
    [
        (2 * CHUNK + 100, lambda n, h: n - 116, "truncated"),  # last chunk dropped
        (2 * CHUNK + 100, lambda n, h: n - 50, "authentication"),  # cut mid-chunk
        (2 * CHUNK, lambda n, h: n - CHUNK - 16, "truncated"),  # full last chunk dropped
        (2 * CHUNK, lambda n, h: n - 1, "authentication"),
        (100, lambda n, h: h + 16, "final chunk is missing"),  # nonce only
        (100, lambda n, h: h + 20, "shorter than its tag"),
        # age (and its CCTV vectors) count the payload nonce with the header.
        (100, lambda n, h: h + 8, "nonce"),
        (100, lambda n, h: h, "nonce"),
    ],
)
def test_truncated_payload(size: int, cut, message: str, ours) -> None:
    ct, hlen = _multi_chunk_file(ours, size)
    short = ct[: cut(len(ct), hlen)]
    error = HeaderError if message == "nonce" else DecryptionError
    with pytest.raises(error, match=message):
        age.decrypt(short, [ours])
    with pytest.raises(error):
        _decrypt_file(short, [ours])


@pytest.mark.parametrize("size", [0, 100, 2 * CHUNK])
@pytest.mark.parametrize("extra", [b"\x00", b"garbage" * 50, bytes(CHUNK + 16)])
def test_trailing_garbage(size: int, extra: bytes, ours) -> None:
    ct, _ = _multi_chunk_file(ours, size)
    with pytest.raises(DecryptionError):
        age.decrypt(ct + extra, [ours])
    with pytest.raises(DecryptionError):
        _decrypt_file(ct + extra, [ours])


def test_trailing_full_chunk_after_a_full_last_chunk_is_named(ours) -> None:
    key, nonce = age.new_file_key(), bytes(16)
    payload = _stream(key, nonce, [(bytes(CHUNK), True), (b"more", True)])
    dec = age.PayloadDecryptor(key)
    with pytest.raises(DecryptionError, match="trailing data"):
        dec.update(payload)
        dec.finalize()


def test_empty_final_chunk_after_data_is_rejected() -> None:
    key, nonce = age.new_file_key(), bytes(range(16))
    good = _stream(key, nonce, [(b"A" * CHUNK, True)])
    dec = age.PayloadDecryptor(key)
    assert dec.update(good) + dec.finalize() == b"A" * CHUNK
    bad = _stream(key, nonce, [(b"A" * CHUNK, False), (b"", True)])
    dec = age.PayloadDecryptor(key)
    with pytest.raises(DecryptionError, match="empty final chunk"):
        dec.update(bad)
        dec.finalize()


def test_reordered_chunks_are_rejected() -> None:
    key = age.new_file_key()
    payload = _stream(key, bytes(16), [(b"A" * CHUNK, False), (b"B" * CHUNK, False), (b"C", True)])
    first, second = payload[16 : 16 + CHUNK + 16], payload[16 + CHUNK + 16 : 16 + 2 * (CHUNK + 16)]
    swapped = payload[:16] + second + first + payload[16 + 2 * (CHUNK + 16) :]
    dec = age.PayloadDecryptor(key)
    with pytest.raises(DecryptionError, match="chunk 0"):
        dec.update(swapped)
    with pytest.raises(InvalidArgument):
        dec.update(b"")  # a failed decryptor stays failed


# --------------------------------------------------------------------------- header format


def test_header_split_and_stream_position(ours) -> None:
    ct = age.encrypt(b"payload bytes", [ours.recipient, age.X25519Identity.generate().recipient])
    header, length = age.split_header(ct)
    assert header.raw == ct[:length] and header.length == length
    assert header.raw.endswith(b"\n") and header.mac_input.endswith(b"\n---")
    assert len(header.stanzas) == 2 and all(s.type == "X25519" for s in header.stanzas)
    assert age.decode_header(ct[:length]) == header
    src = io.BytesIO(ct)
    assert age.read_header(src) == header and src.tell() == length
    with pytest.raises(HeaderError, match="split_header"):
        age.decode_header(ct)


def test_stanza_encoding_wraps_at_64_columns() -> None:
    for size, lines in [(0, [""]), (47, [64 - 1]), (48, [64, 0]), (49, [64, 2]), (96, [64, 64, 0])]:
        encoded = age.Stanza("grease", ("a", "b"), bytes(size)).encode().split(b"\n")
        assert encoded[0] == b"-> grease a b" and encoded[-1] == b""
        body = encoded[1:-1]
        assert [len(x) for x in body] == (lines if lines != [""] else [0])


@pytest.mark.parametrize("body_size", [0, 48, 100])
def test_unknown_stanzas_are_ignored_by_us_and_pyrage(body_size: int, ours, theirs) -> None:
    key = age.new_file_key()
    grease = FixedStanza(age.Stanza("fusenode-grease", ("x", "&y"), _data(body_size)))
    header = age.encode_header(key, [grease, _our_recipient(theirs), ours.recipient])
    assert age.decode_header(header).stanzas[0].body == _data(body_size)
    enc = age.PayloadEncryptor(key)
    ct = header + enc.update(b"hello") + enc.finalize()
    assert pyrage.decrypt(ct, [theirs]) == b"hello"
    assert age.decrypt(ct, [ours]) == b"hello"


def _valid_header_text(identity: age.X25519Identity) -> bytes:
    return age.encode_header(age.new_file_key(), [identity.recipient])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h: h.replace(b"v1", b"v2", 1), "unsupported age version"),
        (lambda h: b"-----BEGIN AGE ENCRYPTED FILE-----\n" + h, "armored"),
        (lambda h: b"hello" + h, "not an age file"),
        (lambda h: h.replace(b"\n", b"\r\n"), "CRLF"),
        (lambda h: h[:-1], "truncated"),
        (lambda h: h[: h.index(b"---")], "truncated"),
        (lambda h: h.replace(b"-> X25519 ", b"-> X25519  "), "argument"),
        (lambda h: h.replace(b"-> X25519 ", b"->  X25519 "), "argument"),
        (lambda h: h.replace(b"-> X25519 ", b"-> X25519\xff "), "argument"),
        (lambda h: h.replace(b"-> ", b"-}"), "unexpected line"),
        (lambda h: h.replace(b"--- ", b"---"), "MAC line"),
        (lambda h: h[:-1] + b"=\n", "MAC line"),
        (lambda h: h.replace(b"X25519 ", b"X25519 " + b"A" * 43 + b" "), "1 argument"),
    ],
)
def test_malformed_headers(mutate, message: str, ours) -> None:
    bad = mutate(_valid_header_text(ours))
    with pytest.raises(HeaderError, match=message):
        age.unwrap_file_key(bad, [ours])
    with pytest.raises(HeaderError):
        _decrypt_file(bad + bytes(40), [ours])


def _header_with(stanza_text: bytes) -> bytes:
    return _raw_header(age.new_file_key(), stanza_text)


@pytest.mark.parametrize(
    ("stanza_text", "message"),
    [
        (
            b"-> X25519 " + _b64(bytes(32)).encode() + b"=\n" + _b64(bytes(32)).encode() + b"\n",
            "base64",
        ),
        (b"-> X25519 " + b"A" * 43 + b"\n" + b"A" * 43 + b"=\n", "base64"),
        (b"-> X25519 " + b"A" * 42 + b"B\n" + b"A" * 43 + b"\n", "canonical"),
        (b"-> X25519 " + b"A" * 40 + b"\n" + b"A" * 43 + b"\n", "share is not 32 bytes"),
        (b"-> X25519 " + b"A" * 43 + b"\n" + b"A" * 40 + b"\n", "body is not 32 bytes"),
        (b"-> X25519 " + b"A" * 43 + b"\n" + b"A" * 43 + b"\n", "low-order"),
        (b"-> grease\n" + b"A" * 65 + b"\n", "over 64 columns"),
        (b"-> grease\n" + b"A" * 64 + b"\n", "shorter than 64"),  # no short final line
        (b"-> grease\n" + b"A" * 64 + b"\n-> X25519 " + b"A" * 43 + b"\n", "shorter than 64"),
        (b"-> grease\n-> X25519 " + b"A" * 43 + b"\n" + b"A" * 43 + b"\n", "empty line"),
        (b"-> grease\n\n", "no identity"),
        (b"", "no recipient stanzas"),
    ],
)
def test_malformed_stanzas(stanza_text: bytes, message: str, ours) -> None:
    header = _header_with(stanza_text)
    with pytest.raises(CryptoError, match=message):
        age.unwrap_file_key(header, [ours])


def test_48_byte_body_needs_its_empty_final_line() -> None:
    body = _b64(bytes(48)).encode()
    assert len(body) == 64
    good = age.decode_header(_header_with(b"-> grease\n" + body + b"\n\n"))
    assert good.stanzas[0].body == bytes(48)
    with pytest.raises(HeaderError):
        age.decode_header(_header_with(b"-> grease\n" + body + b"\n"))


def test_hand_built_header_matches_our_encoder(ours) -> None:
    """Independent check of the MAC construction and the canonical stanza encoding."""
    key = age.new_file_key()
    stanza = ours.recipient.wrap(key)
    assert age.encode_header(key, [FixedStanza(stanza)]) == _raw_header(key, stanza.encode())
    assert age.unwrap_file_key(_raw_header(key, stanza.encode()), [ours]) == key


# --------------------------------------------------------------------------- scrypt rules


def test_scrypt_must_be_alone(ours) -> None:
    key = age.new_file_key()
    passphrase = age.ScryptPassphrase("pw", log_n=FAST_LOG_N)
    with pytest.raises(InvalidArgument, match="only recipient"):
        age.encode_header(key, [passphrase, ours.recipient])
    mixed = _raw_header(key, passphrase.wrap(key).encode() + ours.recipient.wrap(key).encode())
    for identity in (ours, passphrase):
        with pytest.raises(HeaderError, match="only stanza"):
            age.unwrap_file_key(mixed, [identity])
    header = age.encode_header(key, [passphrase])
    with pytest.raises(InvalidArgument, match="only recipient"):
        age.rewrap_header(header, [passphrase], [ours.recipient])


@pytest.mark.parametrize(
    ("log_n", "message"),
    [("23", "exceeds"), ("40", "exceeds"), ("018", "decimal"), ("0", "decimal")],
)
def test_scrypt_work_factor_is_bounded(log_n: str, message: str) -> None:
    stanza = age.Stanza("scrypt", (_b64(bytes(16)), log_n), bytes(32))
    header = age.encode_header(age.new_file_key(), [FixedStanza(stanza)])
    with pytest.raises(HeaderError, match=message):
        age.unwrap_file_key(header, [age.ScryptPassphrase("pw")])


def test_scrypt_parameters() -> None:
    with pytest.raises(InvalidArgument):
        age.ScryptPassphrase("")
    with pytest.raises(InvalidArgument):
        age.ScryptPassphrase("pw", log_n=23)
    assert age.ScryptPassphrase("pw", log_n=23, max_log_n=23).log_n == 23
    assert "pw" not in repr(age.ScryptPassphrase("pw"))


# --------------------------------------------------------------------------- rewrap, shared header


def test_rewrap_grants_access_without_touching_the_payload(ours, theirs) -> None:
    plaintext = _data(3 * CHUNK + 5)
    ct = age.encrypt(plaintext, [ours.recipient])
    header, length = age.split_header(ct)
    payload = ct[length:]
    newcomer = age.X25519Identity.generate()
    new_header = age.rewrap_header(header.raw, [ours], [newcomer.recipient, _our_recipient(theirs)])
    parsed = age.decode_header(new_header)
    assert parsed.stanzas[:1] == header.stanzas and len(parsed.stanzas) == 3
    assert parsed.mac != header.mac
    assert age.decrypt(new_header + payload, [newcomer]) == plaintext
    assert age.decrypt(new_header + payload, [ours]) == plaintext
    assert pyrage.decrypt(new_header + payload, [theirs]) == plaintext
    # The old header still works, and it never named the newcomer.
    assert age.decrypt(ct, [ours]) == plaintext
    with pytest.raises(NoIdentityMatch):
        age.decrypt(ct, [newcomer])
    with pytest.raises(NoIdentityMatch):
        age.rewrap_header(header, [newcomer], [newcomer.recipient])
    with pytest.raises(InvalidArgument):
        age.rewrap_header(header, [ours], [])


def test_metadata_payload_shares_the_header(ours, theirs) -> None:
    key = age.new_file_key()
    header = age.encode_header(key, [ours.recipient, _our_recipient(theirs)])
    model, meta = _data(CHUNK + 99), b'{"sha256": "...", "name": "model.onnx"}'
    enc1, enc2 = age.PayloadEncryptor(key), age.PayloadEncryptor(key)
    assert enc1.nonce != enc2.nonce
    payload1 = enc1.update(model) + enc1.finalize()
    payload2 = enc2.update(meta) + enc2.finalize()
    assert payload1[:16] == enc1.nonce and payload2[:16] == enc2.nonce
    file_key = age.unwrap_file_key(header, [ours])
    for payload, plain in ((payload1, model), (payload2, meta)):
        dec = age.PayloadDecryptor(file_key)
        assert dec.update(payload) + dec.finalize() == plain
        assert pyrage.decrypt(header + payload, [theirs]) == plain
    # A payload is bound to its file key.
    dec = age.PayloadDecryptor(age.new_file_key())
    with pytest.raises(DecryptionError):
        dec.update(payload2)
        dec.finalize()


# --------------------------------------------------------------------------- streaming


def test_any_split_gives_the_same_ciphertext() -> None:
    key, nonce = age.new_file_key(), bytes(range(16))
    plaintext = _data(4 * CHUNK + 321)
    one = age.PayloadEncryptor(key, nonce)
    reference = one.update(plaintext) + one.finalize()
    rng = random.Random(7)
    for trial in range(6):
        enc = age.PayloadEncryptor(key, nonce)
        out, pos = [], 0
        while pos < len(plaintext):
            step = rng.choice([0, 1, 15, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK])
            piece = plaintext[pos : pos + step]
            out.append(enc.update(memoryview(piece) if trial % 2 else bytearray(piece)))
            pos += step
        out.append(enc.finalize())
        assert out[0].startswith(nonce)  # the first update() always leads with the nonce
        assert b"".join(out) == reference
        dec = age.PayloadDecryptor(key)
        plain, pos = [], 0
        while pos < len(reference):
            step = rng.choice([1, 16, 17, CHUNK + 15, CHUNK + 16, CHUNK + 17, 2 * CHUNK])
            plain.append(dec.update(memoryview(reference)[pos : pos + step]))
            pos += step
        plain.append(dec.finalize())
        assert b"".join(plain) == plaintext


def test_first_update_emits_the_nonce() -> None:
    enc = age.PayloadEncryptor(age.new_file_key())
    assert enc.update(b"abc") == enc.nonce
    assert enc.update(b"def") == b""
    assert len(enc.finalize()) == 6 + 16
    empty = age.PayloadEncryptor(age.new_file_key())
    assert len(empty.finalize()) == 16 + 16  # nonce + one empty last chunk


def test_misuse_is_reported() -> None:
    with pytest.raises(InvalidArgument):
        age.PayloadEncryptor(b"short")
    with pytest.raises(InvalidArgument):
        age.PayloadEncryptor(age.new_file_key(), nonce=b"x" * 12)
    with pytest.raises(InvalidArgument):
        age.PayloadDecryptor(bytes(32))
    with pytest.raises(InvalidArgument):
        age.encode_header(age.new_file_key(), [])
    with pytest.raises(InvalidArgument):
        age.encode_header(b"k" * 32, [age.X25519Identity.generate().recipient])
    with pytest.raises(InvalidArgument):
        age.unwrap_file_key(_valid_header_text(age.X25519Identity.generate()), [])
    enc = age.PayloadEncryptor(age.new_file_key())
    enc.finalize()
    with pytest.raises(InvalidArgument):
        enc.update(b"late")
    with pytest.raises(InvalidArgument):
        enc.finalize()


def test_file_keys_are_random() -> None:
    keys = {age.new_file_key() for _ in range(32)}
    assert len(keys) == 32 and all(len(k) == age.FILE_KEY_SIZE for k in keys)
    identity = age.X25519Identity.generate()
    assert age.encrypt(b"same", [identity.recipient]) != age.encrypt(b"same", [identity.recipient])


# --------------------------------------------------------------------------- golden vectors

GOLDEN_KEY = bytes(range(16))
GOLDEN_NONCE = bytes(range(16, 32))
GOLDEN_PLAINTEXT = (b"fusenode golden vector " + bytes(range(256))) * 600  # ~167 KB, 3 chunks
# These digests pin the on-disk format. If they change, stored models stop decrypting:
# never update them without a format-version decision.
GOLDEN_PAYLOAD_SHA256 = "87989e37d84fd21099b4cd02c23e6dc6120a5873e6cb33a2abe0de338b449784"
GOLDEN_HEADER_SHA256 = "20f04842b0182f17c69edaad871a758c857567ce0ae7b63fefe440cc7de6abde"


def test_golden_payload() -> None:
    enc = age.PayloadEncryptor(GOLDEN_KEY, GOLDEN_NONCE)
    payload = enc.update(GOLDEN_PLAINTEXT) + enc.finalize()
    assert len(payload) == 16 + len(GOLDEN_PLAINTEXT) + 16 * 3
    assert hashlib.sha256(payload).hexdigest() == GOLDEN_PAYLOAD_SHA256
    # The independent STREAM encoder in this file agrees byte for byte.
    chunks = [GOLDEN_PLAINTEXT[i : i + CHUNK] for i in range(0, len(GOLDEN_PLAINTEXT), CHUNK)]
    crafted = [(c, i == len(chunks) - 1) for i, c in enumerate(chunks)]
    assert _stream(GOLDEN_KEY, GOLDEN_NONCE, crafted) == payload
    dec = age.PayloadDecryptor(GOLDEN_KEY)
    assert dec.update(payload) + dec.finalize() == GOLDEN_PLAINTEXT
    assert dec.nonce == GOLDEN_NONCE


def test_golden_header() -> None:
    stanza = age.Stanza("X25519", (_b64(bytes(range(32))),), bytes(range(100, 132)))
    header = age.encode_header(GOLDEN_KEY, [FixedStanza(stanza)])
    assert hashlib.sha256(header).hexdigest() == GOLDEN_HEADER_SHA256
