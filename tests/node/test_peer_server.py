"""The peer API: only signed requests from accepted peers; /store checks the bytes' CID."""

from __future__ import annotations

import pytest

from fusenode.node.peer_server import create_peer_app
from fusenode.node.peerauth import private_key_from_protobuf, sign_request
from fusenode.node.protocol import BadPeerRequest, Health
from tests.support.fakes import fake_cid
from tests.support.keys import ed25519_protobuf

SELF = "QmSelfSelfSelfSelfSelfSelfSelfSelfSelfSelfSelfS"


class FakeHolder:
    """Stands in for the daemon's Holder: the peer app only calls these."""

    peer_id = SELF

    def __init__(self) -> None:
        self.holds: set[tuple[str, str]] = set()

    def health(self, requester: str) -> Health:
        return Health(SELF, ())

    def held(self, cids: list[str]) -> set[str]:
        return {c for c, _ in self.holds} & set(cids)

    async def store_for(self, owner: str, expected: str, data: bytes) -> str:
        cid = fake_cid(data)
        if cid != expected:
            raise BadPeerRequest(f"fragment hashes to {cid}, not {expected}")
        self.holds.add((cid, owner))
        return cid

    async def pin_for(self, owner: str, cids: list[str]) -> list[str]:
        self.holds |= {(c, owner) for c in cids}
        return cids

    async def unpin_for(self, owner: str, cids: list[str]) -> list[str]:
        return cids


@pytest.fixture
def key():
    return private_key_from_protobuf(ed25519_protobuf())


async def _post(client, key, path, body, content_type="application/octet-stream"):
    headers = sign_request(key, "POST", path, body, audience=SELF)
    headers["Content-Type"] = content_type
    return await client.post(path, data=body, headers=headers)


@pytest.mark.asyncio
async def test_store_checks_the_cid(aiohttp_client, key):
    node = FakeHolder()
    client = await aiohttp_client(create_peer_app(node, ("*",)))
    data = b"fragment bytes" * 100
    good = fake_cid(data)
    resp = await _post(client, key, f"/peer/v1/store?cid={good}", data)
    assert resp.status == 200 and (await resp.json())["cid"] == good
    assert (good, key.peer_id) in node.holds  # held for the peer that asked
    other = fake_cid(b"something else")
    resp = await _post(client, key, f"/peer/v1/store?cid={other}", data)
    assert resp.status == 400 and "hashes to" in (await resp.json())["error"]["message"]


@pytest.mark.asyncio
async def test_unsigned_tampered_and_unaccepted_requests_are_refused(aiohttp_client, key):
    node = FakeHolder()
    client = await aiohttp_client(create_peer_app(node, ("*",)))
    body = b'{"cids": []}'
    resp = await client.post("/peer/v1/pin", data=body)
    assert resp.status == 401
    headers = sign_request(key, "POST", "/peer/v1/pin", body, audience=SELF)
    resp = await client.post("/peer/v1/pin", data=body + b" ", headers=headers)
    assert resp.status == 401  # the body hash no longer matches the signature
    headers = sign_request(key, "POST", "/peer/v1/pin", body, audience="QmSomeoneElse")
    resp = await client.post("/peer/v1/pin", data=body, headers=headers)
    assert resp.status == 401  # signed for another node: no replay here
    strict = await aiohttp_client(create_peer_app(FakeHolder(), ("QmOnlyThisPeer",)))
    resp = await _post(strict, key, "/peer/v1/pin", body, "application/json")
    assert resp.status == 403


@pytest.mark.asyncio
async def test_malformed_and_failing_requests(aiohttp_client, key):
    class Failing(FakeHolder):
        async def pin_for(self, owner, cids):
            raise KeyError("a bug with a secret inside")

    client = await aiohttp_client(create_peer_app(Failing(), ("*",)))
    for body, message in [
        (b"[1]", "expected a JSON object"),
        (b'{"cids": "Qm"}', 'body must be {"cids": [...]}'),
        (b'{"cids": ["QmNope"]}', "malformed CID"),
        (b"{", "invalid JSON"),
    ]:
        resp = await _post(client, key, "/peer/v1/pin", body, "application/json")
        error = (await resp.json())["error"]
        assert resp.status == 400 and error["type"] == "BadPeerRequest", error
        assert message in error["message"]
    good = b'{"cids": ["QmWKoWmuRfPJXSvLHoPdJn8iFsvyum4HsUeB1LUHdVRVKW"]}'
    resp = await _post(client, key, "/peer/v1/pin", good, "application/json")
    error = (await resp.json())["error"]
    # A bug is a 500 that tells the peer nothing of this node's insides.
    assert resp.status == 500 and "secret" not in error["message"]
