"""storage.age against every C2SP CCTV age test vector (tests/data/cctv-age, see its README).

Each vector says what decrypting it must do: succeed with a given payload hash, or fail in
one named way (header, no match, HMAC, payload). The kinds map onto our error classes:
header failure -> HeaderError, no match -> NoIdentityMatch, HMAC failure -> DecryptionError
from the header MAC, payload failure -> DecryptionError from the STREAM, after releasing
exactly the plaintext whose hash the vector gives. Armor is not implemented: armored vectors
must be refused with a HeaderError.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from pathlib import Path

import pytest

from fusenode.storage import age
from fusenode.storage.errors import DecryptionError, HeaderError, NoIdentityMatch

VECTORS = Path(__file__).resolve().parents[1] / "data" / "cctv-age"
NAMES = sorted(p.name for p in VECTORS.iterdir() if p.name != "README.md")


def _load(name: str) -> tuple[dict[str, list[str]], bytes]:
    raw = (VECTORS / name).read_bytes()
    head, body = raw.split(b"\n\n", 1)
    fields: dict[str, list[str]] = {}
    for line in head.decode("utf-8").splitlines():
        key, value = line.split(": ", 1)
        fields.setdefault(key, []).append(value)
    if fields.get("compressed") == ["zlib"]:
        body = zlib.decompress(body)
    return fields, body


def _identities(fields: dict[str, list[str]]) -> list[age.Identity]:
    found: list[age.Identity] = [age.parse_identity(t) for t in fields.get("identity", [])]
    found += [age.ScryptPassphrase(p) for p in fields.get("passphrase", [])]
    return found


def _decrypt(data: bytes, identities: list[age.Identity], released: list[bytes]) -> None:
    """Decrypt chunk by chunk, appending to ``released`` what the API hands out."""
    header, length = age.split_header(data)
    dec = age.PayloadDecryptor(age.unwrap_file_key(header, identities))
    view = memoryview(data)[length:]
    step = age.ENCRYPTED_CHUNK_SIZE
    for start in range(0, len(view), step):
        released.append(dec.update(view[start : start + step]))
    released.append(dec.finalize())


def test_every_vector_is_here() -> None:
    # 143 files at the vendored commit: a lost file must not silently shrink the suite.
    assert len(NAMES) == 143
    kinds = {n.split("_")[0] for n in NAMES}
    assert {"x25519", "scrypt", "stream", "hmac", "stanza", "hybrid", "armor"} <= kinds


@pytest.mark.parametrize("name", NAMES)
def test_vector(name: str) -> None:
    fields, data = _load(name)
    expect = fields["expect"][0]
    if fields.get("armored") == ["yes"]:
        with pytest.raises(HeaderError) as err:
            age.split_header(data)
        if data.lstrip().startswith(b"-----"):
            assert "armor" in str(err.value)
        return
    identities = _identities(fields)
    released: list[bytes] = []
    if expect == "success":
        _decrypt(data, identities, released)
        assert hashlib.sha256(b"".join(released)).hexdigest() == fields["payload"][0]
        # The stream helper agrees with the chunked path.
        out = io.BytesIO()
        age.decrypt_stream(io.BytesIO(data), out, identities)
        assert out.getvalue() == b"".join(released)
    elif expect == "header failure":
        with pytest.raises(HeaderError):
            _decrypt(data, identities, released)
    elif expect == "no match":
        with pytest.raises(NoIdentityMatch):
            _decrypt(data, identities, released)
    elif expect == "HMAC failure":
        with pytest.raises(DecryptionError, match="MAC"):
            _decrypt(data, identities, released)
    elif expect == "payload failure":
        with pytest.raises(DecryptionError):
            _decrypt(data, identities, released)
        assert hashlib.sha256(b"".join(released)).hexdigest() == fields["payload"][0]
    else:
        pytest.fail(f"unknown expectation {expect!r}")


def test_hybrid_identity_string_round_trips() -> None:
    fields, _ = _load("hybrid")
    text = fields["identity"][0]
    identity = age.parse_identity(text)
    assert isinstance(identity, age.MLKEM768X25519Identity)
    assert identity.to_string() == text
    recipient = identity.recipient.to_string()
    assert recipient.startswith("age1pq1")
    assert age.parse_recipient(recipient) == identity.recipient
