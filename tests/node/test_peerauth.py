"""Request and reply signing with libp2p identity keys (node.peerauth), keys checked against
real Kubo repos.

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
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from multidict import CIMultiDict

from fusenode.node.errors import NodeError
from fusenode.node.peerauth import (
    HEADER_BODY,
    HEADER_DATE,
    HEADER_KEY,
    HEADER_NONCE,
    HEADER_PEER,
    HEADER_SIGNATURE,
    KEY_ED25519,
    KEY_RSA,
    NonceCache,
    PeerAuthError,
    PeerKey,
    load_private_key,
    peer_id_from_public_key,
    private_key_from_protobuf,
    sign_reply,
    sign_request,
    verify_reply,
    verify_request,
    verify_request_headers,
)
from fusenode.storage.kubo import KuboNode, create_repo
from tests.support.keys import ed25519_protobuf, rsa_protobuf

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
BODY = b'{"fragment": "QmWKoWmuRfPJXSvLHoPdJn8iFsvyum4HsUeB1LUHdVRVKW"}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Kubo repo (fusenode layout: REPO/kubo/config) holding an RSA identity, as repos
    made before fusenode gave new repos Ed25519 keys do (and as Kubo's own init makes)."""
    root = tmp_path_factory.mktemp("peerauth") / "repo"
    create_repo(root, free_port())
    proto = rsa_protobuf()
    peer_id = private_key_from_protobuf(proto).peer_id
    config_path = root / "kubo" / "config"
    config = json.loads(config_path.read_text())
    config["Identity"] = {"PeerID": peer_id, "PrivKey": base64.b64encode(proto).decode()}
    config_path.write_text(json.dumps(config))
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
    with KuboNode(repo) as node:  # Kubo checks PeerID against PrivKey when it starts
        assert node.identity().peer_id == rsa_key.peer_id
    # Either folder works, and the parsed key is cached while the file is unchanged.
    assert load_private_key(repo) is rsa_key


def test_new_repos_get_an_ed25519_identity_that_kubo_runs_with(tmp_path: Path) -> None:
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        create_repo(root, free_port())
    keys = [load_private_key(root) for root in roots]
    assert all(key.key_type == KEY_ED25519 for key in keys)
    assert keys[0].peer_id != keys[1].peer_id  # a fresh key each time
    for root, key in zip(roots, keys, strict=True):
        assert key.peer_id.startswith("12D3KooW")
        assert peer_id_from_public_key(key.public_key_proto) == key.peer_id
        with KuboNode(root) as node:
            assert node.identity().peer_id == key.peer_id


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

ME = "QmRecipientA"
TARGET = "/peer/v1/store?cid=Qm1"


def _signed(key: PeerKey, method: str = "POST", path: str = TARGET, body: bytes = BODY) -> dict:
    return sign_request(key, method, path, body, now=NOW, audience=ME)


def test_round_trip(key: PeerKey) -> None:
    headers = _signed(key)
    assert set(headers) == {
        HEADER_PEER,
        HEADER_KEY,
        HEADER_DATE,
        HEADER_NONCE,
        HEADER_BODY,
        HEADER_SIGNATURE,
    }
    assert headers[HEADER_PEER] == key.peer_id
    assert headers[HEADER_DATE] == "2025-06-01T12:00:00Z"
    assert headers[HEADER_BODY] == hashlib.sha256(BODY).hexdigest()
    assert verify_request(headers, "POST", TARGET, BODY, now=NOW, audience=ME) == key.peer_id
    # Header names are case-insensitive (HTTP), as in aiohttp's CIMultiDict.
    lowered = {k.lower(): v for k, v in headers.items()}
    assert verify_request(lowered, "post", TARGET, BODY, now=NOW, audience=ME) == key.peer_id
    # The headers alone are checked before the body is read; the body's hash is handed back.
    signed = verify_request_headers(headers, "POST", TARGET, audience=ME, now=NOW)
    assert (signed.peer_id, signed.body_sha256) == (key.peer_id, headers[HEADER_BODY])


def test_signature_covers_exactly_the_documented_string(key: PeerKey) -> None:
    """Interoperability: anyone can verify with the spelled-out string and plain crypto."""
    headers = sign_request(key, "GET", "/a?b=c", b"", now=NOW, audience=ME)
    signed = (
        b"fusenode-peer-v2\nGET\n/a?b=c\n2025-06-01T12:00:00Z\n"
        + headers[HEADER_NONCE].encode()
        + b"\n"
        + hashlib.sha256(b"").hexdigest().encode()
        + b"\n"
        + ME.encode()
    )
    _verify_plainly(key, base64.b64decode(headers[HEADER_SIGNATURE]), signed)


def _verify_plainly(key: PeerKey, signature: bytes, message: bytes) -> None:
    public = key.private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    else:
        public.verify(signature, message)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda r: r | {"method": "PUT"}, "bad signature"),
        (lambda r: r | {"path": "/peer/v1/store?cid=Qm2"}, "bad signature"),
        (lambda r: r | {"path": "/peer/v1/store"}, "bad signature"),
        (lambda r: r | {"body": BODY + b" "}, "not the one signed"),
        (lambda r: r | {"body": b""}, "not the one signed"),
        (lambda r: _header(r, HEADER_BODY, hashlib.sha256(b"").hexdigest()), "bad signature"),
        (lambda r: _header(r, HEADER_BODY, "XYZ"), "not a hex SHA-256"),
        (lambda r: _header(r, HEADER_NONCE, "A" * 22), "bad signature"),
        (lambda r: _header(r, HEADER_NONCE, "short"), "not 16 bytes"),
        (lambda r: _header(r, HEADER_DATE, "2025-06-01T12:00:01Z"), "bad signature"),
        (lambda r: _header(r, HEADER_DATE, "2025-06-01 12:00:00"), "not an RFC 3339"),
        (lambda r: _header(r, HEADER_PEER, "QmOther"), "does not match the key"),
        (lambda r: _header(r, HEADER_KEY, "not base64!"), "not valid base64"),
        (lambda r: _header(r, HEADER_SIGNATURE, base64.b64encode(b"x" * 64).decode()), "bad"),
        (lambda r: _header(r, HEADER_SIGNATURE, None), f"missing header {HEADER_SIGNATURE}"),
        (lambda r: _header(r, HEADER_PEER, None), f"missing header {HEADER_PEER}"),
        (lambda r: _header(r, HEADER_KEY, ""), f"missing header {HEADER_KEY}"),
        (lambda r: _header(r, HEADER_DATE, None), f"missing header {HEADER_DATE}"),
        (lambda r: _header(r, HEADER_NONCE, None), f"missing header {HEADER_NONCE}"),
        (lambda r: r | {"audience": "QmRecipientB"}, "bad signature"),
    ],
    ids=[
        "method",
        "path",
        "query-dropped",
        "body",
        "body-empty",
        "body-hash",
        "body-hash-format",
        "nonce",
        "nonce-format",
        "date",
        "date-format",
        "peer-header",
        "key-garbage",
        "signature",
        "no-signature",
        "no-peer",
        "empty-key",
        "no-date",
        "no-nonce",
        "other-recipient",
    ],
)
def test_tampering_is_rejected(key: PeerKey, change: object, reason: str) -> None:
    req = {"headers": _signed(key), "method": "POST", "path": TARGET, "body": BODY, "audience": ME}
    req = change(req)  # type: ignore[operator]
    with pytest.raises(PeerAuthError, match=reason):
        verify_request(
            req["headers"],
            req["method"],
            req["path"],
            req["body"],
            now=NOW,
            audience=req["audience"],
        )


def _header(req: dict, name: str, value: str | None) -> dict:  # type: ignore[type-arg]
    headers = dict(req["headers"])
    if value is None:
        del headers[name]
    else:
        headers[name] = value
    return req | {"headers": headers}


def test_key_of_another_peer_is_rejected(key: PeerKey) -> None:
    other = private_key_from_protobuf(ed25519_protobuf())
    headers = _signed(key, "GET", "/x", b"")
    # The signer's peer ID with someone else's key: the ID does not belong to that key.
    swapped = headers | {HEADER_KEY: base64.b64encode(other.public_key_proto).decode()}
    with pytest.raises(PeerAuthError, match="does not match the key"):
        verify_request(swapped, "GET", "/x", b"", now=NOW, audience=ME)
    # Claiming to be the other peer altogether (its ID and key): the signature gives it away.
    impostor = headers | {
        HEADER_PEER: other.peer_id,
        HEADER_KEY: base64.b64encode(other.public_key_proto).decode(),
    }
    with pytest.raises(PeerAuthError, match="bad signature"):
        verify_request(impostor, "GET", "/x", b"", now=NOW, audience=ME)


def test_date_outside_the_allowed_skew_is_rejected(key: PeerKey) -> None:
    headers = _signed(key, "GET", "/x", b"")
    for offset in (-299, 0, 299):
        at = NOW + timedelta(seconds=offset)
        assert verify_request(headers, "GET", "/x", b"", now=at, audience=ME) == key.peer_id
    with pytest.raises(PeerAuthError, match="301 s behind our clock"):
        verify_request(headers, "GET", "/x", b"", now=NOW + timedelta(seconds=301), audience=ME)
    with pytest.raises(PeerAuthError, match="301 s ahead of our clock"):
        verify_request(headers, "GET", "/x", b"", now=NOW - timedelta(seconds=301), audience=ME)
    with pytest.raises(PeerAuthError, match="at most 10 s"):
        verify_request(
            headers, "GET", "/x", b"", now=NOW + timedelta(seconds=11), max_skew=10, audience=ME
        )
    # Default now: the real clock.
    fresh = sign_request(key, "GET", "/x", b"", audience=ME)
    assert verify_request(fresh, "GET", "/x", b"", audience=ME) == key.peer_id


def test_a_replayed_request_is_refused_within_the_window(key: PeerKey) -> None:
    nonces = NonceCache()
    headers = _signed(key)
    assert verify_request(headers, "POST", TARGET, BODY, now=NOW, audience=ME, nonces=nonces)
    with pytest.raises(PeerAuthError, match="already received: a replay"):
        verify_request(headers, "POST", TARGET, BODY, now=NOW, audience=ME, nonces=nonces)
    # A retry is signed anew: a fresh nonce, accepted.
    again = _signed(key)
    assert again[HEADER_NONCE] != headers[HEADER_NONCE]
    assert verify_request(again, "POST", TARGET, BODY, now=NOW, audience=ME, nonces=nonces)
    # A request whose signature fails does not use up its nonce.
    forged = _signed(key) | {HEADER_SIGNATURE: base64.b64encode(b"x" * 64).decode()}
    with pytest.raises(PeerAuthError, match="bad signature"):
        verify_request(forged, "POST", TARGET, BODY, now=NOW, audience=ME, nonces=nonces)


def test_the_nonce_cache_is_bounded_per_peer_and_in_all() -> None:
    nonces = NonceCache(window=600, capacity=5, per_peer=3)
    for i in range(3):
        assert nonces.accept("QmFlood", f"n{i}")
    with pytest.raises(PeerAuthError, match="too many requests"):
        nonces.accept("QmFlood", "n3")  # one peer cannot take more than its share...
    assert nonces.accept("QmOther", "n0")  # ...and others are still heard
    assert nonces.accept("QmThird", "n0")
    with pytest.raises(PeerAuthError, match="too many requests"):
        nonces.accept("QmFourth", "n0")  # the cache as a whole is bounded too
    expired = NonceCache(window=-1, capacity=3, per_peer=2)  # every entry past its window
    for i in range(10):
        assert expired.accept("QmPeer", f"n{i}")


def test_duplicated_header_is_rejected(key: PeerKey) -> None:
    headers = CIMultiDict(_signed(key, "GET", "/x", b""))
    assert verify_request(headers, "GET", "/x", b"", now=NOW, audience=ME) == key.peer_id
    headers.add(HEADER_PEER.lower(), key.peer_id)
    with pytest.raises(PeerAuthError, match="given more than once"):
        verify_request(headers, "GET", "/x", b"", now=NOW, audience=ME)


def test_newlines_cannot_smuggle_fields(key: PeerKey) -> None:
    with pytest.raises(PeerAuthError, match="cannot be signed"):
        sign_request(key, "GET", "/x\n2025-06-01T12:00:00Z", b"", now=NOW, audience=ME)
    with pytest.raises(PeerAuthError, match="cannot be signed"):
        sign_request(key, "GET", "/x", b"", now=NOW, audience="")


# ------------------------------------------------------------------ replies


def test_reply_signature_binds_the_peer_the_requester_the_request_and_the_answer(
    key: PeerKey,
) -> None:
    me = private_key_from_protobuf(ed25519_protobuf()).peer_id
    nonce = _signed(key)[HEADER_NONCE]
    body = b'{"cid": "Qm1", "size": 3, "time": "2025-06-01T12:00:00Z"}'
    headers = sign_reply(key, me, nonce, 200, body)
    verify_reply(headers, key.peer_id, me, nonce, 200, body)
    message = b"fusenode-reply-v2\n" + me.encode() + b"\n" + nonce.encode() + b"\n200\n"
    _verify_plainly(
        key,
        base64.b64decode(headers[HEADER_SIGNATURE]),
        message + hashlib.sha256(body).hexdigest().encode(),
    )
    other = private_key_from_protobuf(ed25519_protobuf())
    for args, reason in [
        ((headers, key.peer_id, me, nonce, 200, body + b" "), "bad reply signature"),
        ((headers, key.peer_id, me, nonce, 500, body), "bad reply signature"),
        ((headers, key.peer_id, me, "B" * 22, 200, body), "bad reply signature"),
        # The answer to someone else's request relayed under our nonce: refused.
        ((headers, key.peer_id, other.peer_id, nonce, 200, body), "bad reply signature"),
        ((headers, other.peer_id, me, nonce, 200, body), f"signed by {key.peer_id}, not"),
        ((sign_reply(other, me, nonce, 200, body), key.peer_id, me, nonce, 200, body), "not by"),
        (({}, key.peer_id, me, nonce, 200, body), "missing header"),
    ]:
        with pytest.raises(PeerAuthError, match=reason):
            verify_reply(*args)
