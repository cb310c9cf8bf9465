"""Request signing with libp2p identity keys (node.peerauth), checked against real Kubo repos.

The peer ID rule is checked against Kubo itself both ways: for RSA, the ID derived from a
fresh repo's key must equal the repo's Identity.PeerID; for Ed25519, a node started on a
repo given our generated key and our derived ID must report that ID (Kubo refuses to start
when the two do not match).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from multidict import CIMultiDict

from fusenode.node.errors import NodeError
from fusenode.node.peerauth import (
    HEADER_DATE,
    HEADER_KEY,
    HEADER_PEER,
    HEADER_SIGNATURE,
    KEY_ED25519,
    KEY_RSA,
    PeerAuthError,
    PeerKey,
    load_private_key,
    peer_id_from_public_key,
    private_key_from_protobuf,
    sign_request,
    verify_request,
)
from fusenode.storage.kubo import KuboNode, create_repo
from tests.support.keys import ed25519_protobuf

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
BODY = b'{"fragment": "QmWKoWmuRfPJXSvLHoPdJn8iFsvyum4HsUeB1LUHdVRVKW"}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Kubo repo (fusenode layout: REPO/kubo/config) with the RSA key Kubo made."""
    root = tmp_path_factory.mktemp("peerauth") / "repo"
    create_repo(root, free_port())
    return root


@pytest.fixture(scope="module")
def rsa_key(repo: Path) -> PeerKey:
    return load_private_key(repo / "kubo")


@pytest.fixture(scope="module", params=["rsa", "ed25519"])
def key(request: pytest.FixtureRequest, rsa_key: PeerKey) -> PeerKey:
    return rsa_key if request.param == "rsa" else private_key_from_protobuf(ed25519_protobuf())


# ------------------------------------------------------------------ keys and peer IDs


def test_rsa_peer_id_equals_kubos_own(repo: Path, rsa_key: PeerKey) -> None:
    identity = json.loads((repo / "kubo" / "config").read_text())["Identity"]
    assert rsa_key.key_type == KEY_RSA
    assert rsa_key.peer_id == identity["PeerID"]
    assert rsa_key.peer_id.startswith("Qm")
    assert peer_id_from_public_key(rsa_key.public_key_proto) == identity["PeerID"]
    # Either folder works, and the parsed key is cached while the file is unchanged.
    assert load_private_key(repo) is rsa_key


def test_ed25519_peer_id_is_accepted_by_kubo(tmp_path: Path) -> None:
    proto = ed25519_protobuf()
    key = private_key_from_protobuf(proto)
    assert key.key_type == KEY_ED25519
    assert key.peer_id.startswith("12D3KooW")
    assert key.public_key_proto == b"\x08\x01\x12\x20" + proto[-32:]
    # Identity multihash: the 36-byte key itself is inside the ID.
    assert peer_id_from_public_key(key.public_key_proto) == key.peer_id

    root = tmp_path / "ed"
    create_repo(root, free_port())
    config_path = root / "kubo" / "config"
    config = json.loads(config_path.read_text())
    config["Identity"] = {"PeerID": key.peer_id, "PrivKey": base64.b64encode(proto).decode()}
    config_path.write_text(json.dumps(config))
    with KuboNode(root) as node:  # Kubo checks PeerID against PrivKey when it starts
        assert node.identity().peer_id == key.peer_id
    assert load_private_key(root).peer_id == key.peer_id


def test_unsupported_and_damaged_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PeerAuthError, match="Secp256k1 identity keys are not supported"):
        private_key_from_protobuf(b"\x08\x02\x12\x21" + b"\x02" * 33)
    with pytest.raises(PeerAuthError, match="ECDSA identity keys are not supported"):
        private_key_from_protobuf(b"\x08\x03\x12\x01\x00")
    with pytest.raises(PeerAuthError, match="public half does not match"):
        private_key_from_protobuf(ed25519_protobuf()[:-1] + b"\x00")
    with pytest.raises(PeerAuthError, match="not a libp2p key protobuf"):
        private_key_from_protobuf(b"\x12\x00\x08\x01")
    with pytest.raises(PeerAuthError, match="no Kubo config"):
        load_private_key(tmp_path)
    assert issubclass(PeerAuthError, NodeError)


def test_config_whose_peer_id_does_not_match_its_key_is_refused(repo: Path, tmp_path: Path) -> None:
    config = json.loads((repo / "kubo" / "config").read_text())
    config["Identity"]["PeerID"] = private_key_from_protobuf(ed25519_protobuf()).peer_id
    (tmp_path / "config").write_text(json.dumps(config))
    with pytest.raises(PeerAuthError, match="does not match its private key"):
        load_private_key(tmp_path)


# ------------------------------------------------------------------ signing


def test_round_trip(key: PeerKey) -> None:
    headers = sign_request(key, "POST", "/peer/v1/fragments?cid=Qm1", BODY, now=NOW)
    assert set(headers) == {HEADER_PEER, HEADER_KEY, HEADER_DATE, HEADER_SIGNATURE}
    assert headers[HEADER_PEER] == key.peer_id
    assert headers[HEADER_DATE] == "2025-06-01T12:00:00Z"
    peer = verify_request(headers, "POST", "/peer/v1/fragments?cid=Qm1", BODY, now=NOW)
    assert peer == key.peer_id
    # Header names are case-insensitive (HTTP), as in aiohttp's CIMultiDict.
    lowered = {k.lower(): v for k, v in headers.items()}
    assert verify_request(lowered, "post", "/peer/v1/fragments?cid=Qm1", BODY, now=NOW) == peer


def test_signature_covers_exactly_the_documented_string(key: PeerKey) -> None:
    """Interoperability: anyone can verify with the spelled-out string and plain crypto."""
    headers = sign_request(key, "GET", "/a?b=c", b"", now=NOW)
    signed = b"fusenode-peer-v1\nGET\n/a?b=c\n2025-06-01T12:00:00Z\n" + (
        hashlib.sha256(b"").hexdigest().encode()
    )
    signature = base64.b64decode(headers[HEADER_SIGNATURE])
    public = key.private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
    else:
        public.verify(signature, signed)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda r: r | {"method": "PUT"}, "bad signature"),
        (lambda r: r | {"path": "/peer/v1/fragments?cid=Qm2"}, "bad signature"),
        (lambda r: r | {"path": "/peer/v1/fragments"}, "bad signature"),
        (lambda r: r | {"body": BODY + b" "}, "bad signature"),
        (lambda r: r | {"body": b""}, "bad signature"),
        (lambda r: _header(r, HEADER_DATE, "2025-06-01T12:00:01Z"), "bad signature"),
        (lambda r: _header(r, HEADER_DATE, "2025-06-01 12:00:00"), "not an RFC 3339"),
        (lambda r: _header(r, HEADER_PEER, "QmOther"), "does not match the key"),
        (lambda r: _header(r, HEADER_KEY, "not base64!"), "not valid base64"),
        (lambda r: _header(r, HEADER_SIGNATURE, base64.b64encode(b"x" * 64).decode()), "bad"),
        (lambda r: _header(r, HEADER_SIGNATURE, None), f"missing header {HEADER_SIGNATURE}"),
        (lambda r: _header(r, HEADER_PEER, None), f"missing header {HEADER_PEER}"),
        (lambda r: _header(r, HEADER_KEY, ""), f"missing header {HEADER_KEY}"),
        (lambda r: _header(r, HEADER_DATE, None), f"missing header {HEADER_DATE}"),
    ],
    ids=[
        "method",
        "path",
        "query-dropped",
        "body",
        "body-empty",
        "date",
        "date-format",
        "peer-header",
        "key-garbage",
        "signature",
        "no-signature",
        "no-peer",
        "empty-key",
        "no-date",
    ],
)
def test_tampering_is_rejected(key: PeerKey, change: object, reason: str) -> None:
    req = {
        "headers": sign_request(key, "POST", "/peer/v1/fragments?cid=Qm1", BODY, now=NOW),
        "method": "POST",
        "path": "/peer/v1/fragments?cid=Qm1",
        "body": BODY,
    }
    req = change(req)  # type: ignore[operator]
    with pytest.raises(PeerAuthError, match=reason):
        verify_request(req["headers"], req["method"], req["path"], req["body"], now=NOW)


def _header(req: dict, name: str, value: str | None) -> dict:  # type: ignore[type-arg]
    headers = dict(req["headers"])
    if value is None:
        del headers[name]
    else:
        headers[name] = value
    return req | {"headers": headers}


def test_key_of_another_peer_is_rejected(key: PeerKey) -> None:
    other = private_key_from_protobuf(ed25519_protobuf())
    headers = sign_request(key, "GET", "/x", b"", now=NOW)
    # The signer's peer ID with someone else's key: the ID does not belong to that key.
    swapped = headers | {HEADER_KEY: base64.b64encode(other.public_key_proto).decode()}
    with pytest.raises(PeerAuthError, match="does not match the key"):
        verify_request(swapped, "GET", "/x", b"", now=NOW)
    # Claiming to be the other peer altogether (its ID and key): the signature gives it away.
    impostor = headers | {
        HEADER_PEER: other.peer_id,
        HEADER_KEY: base64.b64encode(other.public_key_proto).decode(),
    }
    with pytest.raises(PeerAuthError, match="bad signature"):
        verify_request(impostor, "GET", "/x", b"", now=NOW)


def test_date_outside_the_allowed_skew_is_rejected(key: PeerKey) -> None:
    headers = sign_request(key, "GET", "/x", b"", now=NOW)
    for offset in (-299, 0, 299):
        at = NOW + timedelta(seconds=offset)
        assert verify_request(headers, "GET", "/x", b"", now=at) == key.peer_id
    with pytest.raises(PeerAuthError, match="301 s behind our clock"):
        verify_request(headers, "GET", "/x", b"", now=NOW + timedelta(seconds=301))
    with pytest.raises(PeerAuthError, match="301 s ahead of our clock"):
        verify_request(headers, "GET", "/x", b"", now=NOW - timedelta(seconds=301))
    with pytest.raises(PeerAuthError, match="at most 10 s"):
        verify_request(headers, "GET", "/x", b"", now=NOW + timedelta(seconds=11), max_skew=10)
    # Default now: the real clock.
    fresh = sign_request(key, "GET", "/x", b"")
    assert verify_request(fresh, "GET", "/x", b"") == key.peer_id


def test_audience_binds_the_request_to_its_recipient(key: PeerKey) -> None:
    me, them = "QmRecipientA", "QmRecipientB"
    headers = sign_request(key, "GET", "/x", b"", now=NOW, audience=me)
    assert verify_request(headers, "GET", "/x", b"", now=NOW, audience=me) == key.peer_id
    for audience in (them, None):  # replayed to another daemon, or checked without one
        with pytest.raises(PeerAuthError, match="bad signature"):
            verify_request(headers, "GET", "/x", b"", now=NOW, audience=audience)


def test_duplicated_header_is_rejected(key: PeerKey) -> None:
    headers = CIMultiDict(sign_request(key, "GET", "/x", b"", now=NOW))
    assert verify_request(headers, "GET", "/x", b"", now=NOW) == key.peer_id
    headers.add(HEADER_PEER.lower(), key.peer_id)
    with pytest.raises(PeerAuthError, match="given more than once"):
        verify_request(headers, "GET", "/x", b"", now=NOW)


def test_newlines_cannot_smuggle_fields(key: PeerKey) -> None:
    with pytest.raises(PeerAuthError, match="cannot be signed"):
        sign_request(key, "GET", "/x\n2025-06-01T12:00:00Z", b"", now=NOW)


def test_signing_and_verifying_are_fast(rsa_key: PeerKey) -> None:
    start = time.perf_counter()
    for i in range(50):
        headers = sign_request(rsa_key, "POST", f"/p/{i}", BODY)
        verify_request(headers, "POST", f"/p/{i}", BODY)
    per_request = (time.perf_counter() - start) / 50
    assert per_request < 0.02  # ~1.2 ms here for RSA-2048 (sign ~1.2 ms, verify ~0.07 ms)
