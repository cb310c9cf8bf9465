"""The peer client believes only what the peer it called signed, and reads bounded replies.

The attack: a local process takes the loopback port of a tunnel to peer P (free while the
node's Kubo restarts) and answers in P's place. Here that process is a real HTTP server on
the port the client uses for P: unsigned answers, answers signed by another key, answers to
another request, oversized answers all count as no answer at all.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from fusenode.node.peer_client import PeerClient
from fusenode.node.peerauth import HEADER_NONCE, private_key_from_protobuf, sign_reply
from fusenode.node.protocol import PeerOverCapacity, PeerRefused, PeerUnreachable
from fusenode.system import free_loopback_port
from tests.support.keys import ed25519_protobuf

ME = private_key_from_protobuf(ed25519_protobuf())
PEER = private_key_from_protobuf(ed25519_protobuf())
IMPOSTOR = private_key_from_protobuf(ed25519_protobuf())
CID = "QmWKoWmuRfPJXSvLHoPdJn8iFsvyum4HsUeB1LUHdVRVKW"


class NoTransport:
    async def p2p_forward(self, protocol, listen, peer_id):  # the test server is the tunnel
        raise AssertionError("not called: the port is set up by the test")


async def _serving(handler) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_loopback_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def _client(port: int) -> PeerClient:
    client = PeerClient(NoTransport(), ME)  # type: ignore[arg-type]
    client._ports[PEER.peer_id] = port
    return client


def _answer(
    signer, body: bytes, *, status: int = 200, nonce: str | None = None, requester: str = ""
):
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        resp = web.Response(body=body, status=status, content_type="application/json")
        if signer is not None:
            signed_nonce = nonce if nonce is not None else request.headers[HEADER_NONCE]
            who = requester or ME.peer_id
            resp.headers.update(sign_reply(signer, who, signed_nonce, status, body))
        return resp

    return handler


HELD = json.dumps({"held": [CID]}).encode()


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (_answer(None, HELD), "missing header"),  # unsigned
        (_answer(IMPOSTOR, HELD), "not by"),  # signed, by someone else
        (_answer(PEER, HELD, nonce="A" * 22), "bad reply signature"),  # an old answer
        # The peer's real answer to a request someone else relayed under our nonce.
        (_answer(PEER, HELD, requester=IMPOSTOR.peer_id), "bad reply signature"),
    ],
    ids=["unsigned", "other-key", "other-request", "other-requester"],
)
def test_only_the_called_peer_can_answer(handler, reason):
    async def main() -> None:
        runner, port = await _serving(handler)
        client = _client(port)
        try:
            with pytest.raises(PeerUnreachable, match=reason):
                await client.has(PEER.peer_id, [CID])
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(main())


def test_the_real_peer_is_believed_and_its_refusals_are_refusals():
    async def main() -> None:
        runner, port = await _serving(_answer(PEER, HELD))
        client = _client(port)
        try:
            assert await client.has(PEER.peer_id, [CID]) == {CID}
        finally:
            await client.close()
            await runner.cleanup()
        error = json.dumps({"error": {"type": "OverCapacity", "message": "full"}}).encode()
        runner, port = await _serving(_answer(PEER, error, status=507))
        client = _client(port)
        try:
            with pytest.raises(PeerOverCapacity, match="full"):  # put and repair go elsewhere
                await client.store(PEER.peer_id, CID, b"data", 5.0)
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(main())


def test_a_reply_is_cut_off_at_the_bound_even_without_content_length():
    """The bytes are counted as they arrive: a chunked reply cannot pass the bound either."""
    huge = b'{"held": [' + b" " * (3 << 20) + b"]}"

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        resp.headers.update(sign_reply(PEER, ME.peer_id, request.headers[HEADER_NONCE], 200, huge))
        await resp.prepare(request)
        for i in range(0, len(huge), 1 << 16):
            await resp.write(huge[i : i + (1 << 16)])
        await resp.write_eof()
        return resp

    async def main() -> None:
        runner, port = await _serving(chunked)
        client = _client(port)
        try:
            with pytest.raises(PeerUnreachable, match=r"over the .* allowed"):
                await client.has(PEER.peer_id, [CID])
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(main())


def test_replies_are_read_up_to_a_bound():
    huge = json.dumps({"peers": [{"peer_id": "x" * 100, "addresses": []}] * 20_000}).encode()
    assert len(huge) > 2 << 20

    async def main() -> None:
        runner, port = await _serving(_answer(PEER, huge))
        client = _client(port)
        try:
            with pytest.raises(PeerUnreachable, match="allowed"):
                await client.peers(PEER.peer_id)
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(main())


def test_a_receipt_for_other_bytes_is_refused():
    receipt = json.dumps({"cid": CID, "size": 3, "time": "2025-06-01T12:00:00Z"}).encode()

    async def main() -> None:
        runner, port = await _serving(_answer(PEER, receipt))
        client = _client(port)
        try:
            with pytest.raises(PeerRefused, match="acknowledged"):
                await client.store(PEER.peer_id, CID, b"four", 5.0)
            signed = await client.store(PEER.peer_id, CID, b"abc", 5.0)
            assert signed.receipt.cid == CID and json.loads(signed.record())["signature"]
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(main())
