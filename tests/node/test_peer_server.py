"""The peer API's edge: signed headers checked before the body is read, bodies bounded by
bytes received, replays refused, every reply signed (node.peer_server). Real daemons are in
tests/node/test_hostile.py."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from fusenode.node import protocol
from fusenode.node.peer_server import create_peer_app
from fusenode.node.peerauth import (
    HEADER_NONCE,
    HEADER_PEER,
    NonceCache,
    PeerAuthError,
    private_key_from_protobuf,
    sign_request,
    verify_reply,
)
from fusenode.node.protocol import (
    BadPeerRequest,
    Health,
    NotOwner,
    OverCapacity,
    PeerList,
    Receipt,
)
from tests.support.fakes import fake_cid
from tests.support.keys import ed25519_protobuf

SERVER_KEY = private_key_from_protobuf(ed25519_protobuf())
SELF = SERVER_KEY.peer_id


class FakeHolder:
    """Stands in for the daemon's Holder: the peer app only calls these."""

    peer_id = SELF
    key = SERVER_KEY
    lease_seconds: float | None = None

    def __init__(self, room: int = 10**9) -> None:
        self.holds: set[tuple[str, str]] = set()
        self.room = room
        self.admitted: list[int] = []
        self.bytes_read = 0

    def health(self) -> Health:
        return Health(SELF, ())

    def known_peers(self, requester: str) -> PeerList:
        return PeerList(())

    def held(self, cids: list[str]) -> set[str]:
        return {c for c, _ in self.holds} & set(cids)

    def admit(self, owner: str, cid: str, size: int) -> None:
        if size > self.room:
            raise OverCapacity(f"{size} bytes do not fit")
        self.admitted.append(size)

    async def store_for(self, owner, expected, size, chunks) -> Receipt:
        data = b""
        async for chunk in chunks:
            self.bytes_read += len(chunk)
            data += chunk
        cid = fake_cid(data)
        if cid != expected:
            raise BadPeerRequest(f"fragment hashes to {cid}, not {expected}")
        self.holds.add((cid, owner))
        return Receipt(cid, size, "2025-06-01T12:00:00Z")

    async def unpin_for(self, owner: str, cids: list[str]) -> list[str]:
        return cids

    async def release_for(self, owner: str, cids: list[str]) -> list[str]:
        if any((c, owner) not in self.holds for c in self.held(cids)):
            raise NotOwner("not placed here by the requester")
        self.holds -= {(c, owner) for c in cids}
        return sorted(cids)

    def renew_for(self, owner: str, cids: list[str]) -> list[str]:
        return sorted(c for c in cids if (c, owner) in self.holds)

    async def block(self, cid: str) -> bytes | None:
        return b"block of " + cid.encode() if cid.endswith("A") else None


@pytest.fixture
def key():
    return private_key_from_protobuf(ed25519_protobuf())


def _signed(key, method, path, body=b"", content_type="application/octet-stream"):
    headers = sign_request(key, method, path, body, audience=SELF)
    if body:
        headers["Content-Type"] = content_type
    return headers


async def _post(client, key, path, body, content_type="application/octet-stream"):
    return await client.post(
        path, data=body, headers=_signed(key, "POST", path, body, content_type)
    )


async def _checked(resp, headers) -> bytes:
    """The reply's body, after checking the server signed it for this very request."""
    body = await resp.read()
    verify_reply(resp.headers, SELF, headers[HEADER_PEER], headers[HEADER_NONCE], resp.status, body)
    return body


@pytest.mark.asyncio
async def test_store_checks_the_cid_and_answers_with_a_signed_receipt(aiohttp_client, key):
    node = FakeHolder()
    client = await aiohttp_client(create_peer_app(node, ("*",)))
    data = b"fragment bytes" * 100
    good = fake_cid(data)
    path = f"/peer/v1/store?cid={good}"
    headers = _signed(key, "POST", path, data)
    resp = await client.post(path, data=data, headers=headers)
    body = await _checked(resp, headers)
    assert resp.status == 200
    assert Receipt.parse(body) == Receipt(good, len(data), "2025-06-01T12:00:00Z")
    assert (good, key.peer_id) in node.holds  # held for the peer that asked
    assert node.admitted == [len(data)]  # admitted from Content-Length, before reading
    # The receipt cannot be passed off as the answer to another request, or another peer's.
    with pytest.raises(PeerAuthError):
        other_nonce = _signed(key, "POST", path, data)[HEADER_NONCE]
        verify_reply(resp.headers, SELF, key.peer_id, other_nonce, 200, body)
    with pytest.raises(PeerAuthError):
        verify_reply(resp.headers, SELF, SELF, headers[HEADER_NONCE], 200, body)
    other = fake_cid(b"something else")
    resp = await _post(client, key, f"/peer/v1/store?cid={other}", data)
    assert resp.status == 400 and "hashes to" in (await resp.json())["error"]["message"]


@pytest.mark.asyncio
async def test_unsigned_tampered_replayed_and_unaccepted_requests_are_refused(aiohttp_client, key):
    node = FakeHolder()
    client = await aiohttp_client(create_peer_app(node, ("*",)))
    body = b'{"cids": []}'
    resp = await client.post("/peer/v1/has", data=body)
    assert resp.status == 401
    headers = _signed(key, "POST", "/peer/v1/has", body, "application/json")
    resp = await client.post("/peer/v1/has", data=body + b" ", headers=headers)
    assert resp.status == 400 and "not the one signed" in (await resp.json())["error"]["message"]
    headers = sign_request(key, "POST", "/peer/v1/has", body, audience="QmSomeoneElse")
    resp = await client.post("/peer/v1/has", data=body, headers=headers)
    assert resp.status == 401  # signed for another node: no replay here
    headers = _signed(key, "POST", "/peer/v1/has", body, "application/json")
    resp = await client.post("/peer/v1/has", data=body, headers=headers)
    assert resp.status == 200
    resp = await client.post("/peer/v1/has", data=body, headers=headers)
    assert resp.status == 401 and "replay" in (await resp.json())["error"]["message"]
    strict = await aiohttp_client(create_peer_app(FakeHolder(), ("QmOnlyThisPeer",)))
    resp = await _post(strict, key, "/peer/v1/has", body, "application/json")
    assert resp.status == 403


@pytest.mark.asyncio
async def test_every_answer_is_signed_even_a_refusal(aiohttp_client, key):
    client = await aiohttp_client(create_peer_app(FakeHolder(), ("*",)))
    for method, path in [
        ("GET", "/peer/v1/health"),
        ("GET", "/peer/v1/nowhere"),
        ("GET", "/peer/v1/block?cid=QmNope"),
    ]:
        headers = _signed(key, method, path)
        resp = await client.request(method, path, headers=headers)
        await _checked(resp, headers)  # raises unless signed by the server for this request
    # A request that fails authentication gets an unsigned 401: signing is a private-key
    # operation, and an unauthenticated flood must not be able to buy them.
    resp = await client.get("/peer/v1/health")
    assert resp.status == 401 and "X-Fusenode-Signature" not in resp.headers


@pytest.mark.asyncio
async def test_bodies_are_bounded_before_they_are_read(aiohttp_client, key):
    node = FakeHolder(room=1000)
    client = await aiohttp_client(create_peer_app(node, ("*",)))
    # Over the node's room: 507 from Content-Length alone.
    big = b"x" * 5000
    resp = await _post(client, key, f"/peer/v1/store?cid={fake_cid(big)}", big)
    assert resp.status == 507 and node.admitted == []
    # Over a route's limit: 413 (a CID list is at most 1 MiB).
    huge = b'{"cids": [' + b" " * (2 << 20) + b"]}"
    headers = _signed(key, "POST", "/peer/v1/has", huge, "application/json")
    resp = await client.post("/peer/v1/has", data=io.BytesIO(huge), headers=headers)
    assert resp.status == 413
    # A GET carries no body.
    path = "/peer/v1/health"
    headers = _signed(key, "GET", path, b"xx")
    resp = await client.request("GET", path, data=b"xx", headers=headers)
    assert resp.status == 413

    # Chunked (no Content-Length): its size is unknown up front, so it is refused.
    async def chunks():
        yield b'{"cids": []}'

    headers = _signed(key, "POST", "/peer/v1/has", b'{"cids": []}', "application/json")
    resp = await client.post("/peer/v1/has", data=chunks(), headers=headers)
    assert resp.status == 411


@pytest.mark.asyncio
async def test_block_route(aiohttp_client, key):
    client = await aiohttp_client(create_peer_app(FakeHolder(), ("*",)))
    cid = "QmWKoWmuRfPJXSvLHoPdJn8iFsvyum4HsUeB1LUHdVRVKA"
    headers = _signed(key, "GET", f"/peer/v1/block?cid={cid}")
    resp = await client.get(f"/peer/v1/block?cid={cid}", headers=headers)
    assert resp.status == 200 and await _checked(resp, headers) == b"block of " + cid.encode()
    missing = cid[:-1] + "B"
    headers = _signed(key, "GET", f"/peer/v1/block?cid={missing}")
    resp = await client.get(f"/peer/v1/block?cid={missing}", headers=headers)
    assert resp.status == 404


@pytest.mark.asyncio
async def test_malformed_and_failing_requests(aiohttp_client, key):
    class Failing(FakeHolder):
        def held(self, cids):
            raise KeyError("a bug with a secret inside")

    client = await aiohttp_client(create_peer_app(Failing(), ("*",)))
    for body, message in [
        (b"[1]", "expected a JSON object"),
        (b'{"cids": "Qm"}', 'body must be {"cids": [...]}'),
        (b'{"cids": ["QmNope"]}', "malformed CID"),
        (b"{", "invalid JSON"),
        (json.dumps({"cids": ["Qm" + "1" * 44] * 5000}).encode(), "at most 4096"),
    ]:
        resp = await _post(client, key, "/peer/v1/has", body, "application/json")
        error = (await resp.json())["error"]
        assert resp.status == 400 and error["type"] == "BadPeerRequest", error
        assert message in error["message"]
    good = b'{"cids": ["QmWKoWmuRfPJXSvLHoPdJn8iFsvyum4HsUeB1LUHdVRVKW"]}'
    resp = await _post(client, key, "/peer/v1/has", good, "application/json")
    error = (await resp.json())["error"]
    # A bug is a 500 that tells the peer nothing of this node's insides.
    assert resp.status == 500 and "secret" not in error["message"]


@pytest.mark.asyncio
async def test_peers_not_accepted_cannot_fill_the_replay_cache(aiohttp_client, key):
    nonces = NonceCache(capacity=2, per_peer=2)
    client = await aiohttp_client(create_peer_app(FakeHolder(), ("QmOnlyThisPeer",), nonces))
    for _ in range(5):
        headers = _signed(key, "GET", "/peer/v1/health")
        resp = await client.get("/peer/v1/health", headers=headers)
        assert resp.status == 403  # refused before its nonce is remembered
    accepted = await aiohttp_client(create_peer_app(FakeHolder(), (key.peer_id,), nonces))
    headers = _signed(key, "GET", "/peer/v1/health")
    assert (await accepted.get("/peer/v1/health", headers=headers)).status == 200


@pytest.mark.asyncio
async def test_compressed_bodies_are_refused(aiohttp_client, key):
    client = await aiohttp_client(create_peer_app(FakeHolder(), ("*",)))
    body = b'{"cids": []}'
    headers = _signed(key, "POST", "/peer/v1/has", body, "application/json")
    headers["Content-Encoding"] = "gzip"
    resp = await client.post("/peer/v1/has", data=body, headers=headers)
    assert resp.status == 415  # Content-Length would bound only the compressed size


@pytest.mark.asyncio
async def test_a_store_that_trickles_in_is_cut_off(aiohttp_client, key, monkeypatch):
    monkeypatch.setattr(protocol, "STORE_GRACE", 0.3)
    node = FakeHolder()
    client = await aiohttp_client(create_peer_app(node, ("*",)))
    data = b"y" * 1000
    path = f"/peer/v1/store?cid={fake_cid(data)}"
    headers = _signed(key, "POST", path, data)

    async def slowly():
        yield data[:10]
        await asyncio.sleep(2)
        yield data[10:]

    headers["Content-Length"] = str(len(data))
    resp = await client.post(path, data=slowly(), headers=headers)
    error = (await resp.json())["error"]
    assert resp.status == 408 and "did not arrive" in error["message"]
    assert node.holds == set()


@pytest.mark.asyncio
async def test_release_and_renew_act_for_the_signed_requester_only(aiohttp_client, key):
    from fusenode.node.gc import Gate

    holder = FakeHolder()
    gate = Gate()
    client = await aiohttp_client(create_peer_app(holder, ("*",), gate=gate))
    a, b = fake_cid(b"a"), fake_cid(b"b")
    holder.holds = {(a, key.peer_id), (b, "someone else")}
    body = json.dumps({"cids": [a, b]}).encode()

    headers = _signed(key, "POST", protocol.RENEW, body, "application/json")
    resp = await client.post(protocol.RENEW, data=body, headers=headers)
    assert json.loads(await _checked(resp, headers)) == {"renewed": [a]}
    holder.lease_seconds = 86400.0  # a holder tells owners how long its leases last
    headers = _signed(key, "POST", protocol.RENEW, body, "application/json")
    resp = await client.post(protocol.RENEW, data=body, headers=headers)
    assert json.loads(await _checked(resp, headers)) == {"renewed": [a], "lease_seconds": 86400.0}

    headers = _signed(key, "POST", protocol.RELEASE, body, "application/json")
    resp = await client.post(protocol.RELEASE, data=body, headers=headers)
    assert resp.status == 403
    assert json.loads(await _checked(resp, headers))["error"]["type"] == "NotOwner"
    assert (a, key.peer_id) in holder.holds  # refused whole

    # While a garbage collection runs, a request waits for it.
    only_a = json.dumps({"cids": [a]}).encode()
    async with gate.exclusive(1.0):
        headers = _signed(key, "POST", protocol.RELEASE, only_a, "application/json")
        pending = asyncio.ensure_future(client.post(protocol.RELEASE, data=only_a, headers=headers))
        await asyncio.sleep(0.2)
        assert not pending.done() and (a, key.peer_id) in holder.holds
    resp = await pending
    assert json.loads(await _checked(resp, headers)) == {"released": [a]}
    assert holder.holds == {(b, "someone else")}
