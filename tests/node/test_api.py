"""The daemon's HTTP API (node.api) on the real factory with a fake service, and the CLI's
client (node.client) against a real server on 127.0.0.1 run in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from fusenode.node.api import create_app
from fusenode.node.client import DaemonClient, find_daemon
from fusenode.node.errors import (
    BadRequest,
    ConfigError,
    DaemonError,
    NodeError,
    PlacementError,
    RepoError,
)
from fusenode.node.operations import OPERATIONS, openapi
from fusenode.passes.errors import ModelFileError, PassError, VerificationError
from fusenode.storage.errors import (
    BackendError,
    BackendTimeout,
    DecryptionError,
    HeaderError,
    IntegrityError,
    InvalidArgument,
    ManifestError,
    NoIdentityMatch,
    NotEnoughFragments,
    StorageError,
)
from tests.support.fakes import fake_cid

TOKEN = "s3cret-token-for-tests-only-0123456789"
MAX_BODY = 4096
CID = fake_cid(b"a stored model")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
P = "/api/v1"


class FakeService:
    """A NodeService that records its calls, answers canned values, or raises ``error``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.error: BaseException | None = None
        self.delay = 0.0

    async def _record(self, name: str, **kwargs: Any) -> None:
        self.calls.append((name, kwargs))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    async def identity(self) -> dict[str, Any]:
        await self._record("identity")
        return {
            "peer_id": "12D3KooWPeer",
            "addresses": ["/ip4/127.0.0.1/tcp/4001"],
            "recipient": "age1xyz",
        }

    async def peers(self) -> list[dict[str, Any]]:
        await self._record("peers")
        return [{"peer_id": "12D3KooWOther", "connected": True, "last_seen": None}]

    async def put(
        self, path: str, k: int | None, n: int | None, recipients: list[str], public: bool
    ) -> dict[str, Any]:
        await self._record("put", path=path, k=k, n=n, recipients=recipients, public=public)
        return {
            "cid": CID,
            "segments": 1,
            "k": k or 4,
            "n": n or 6,
            "placement": "local",
            "holders": {"12D3KooWPeer": 6},
        }

    async def get(self, cid: str, output: str, identity_path: str | None) -> dict[str, Any]:
        await self._record("get", cid=cid, output=output, identity_path=identity_path)
        return {"path": output, "size": 3, "name": "m.onnx", "sha256": "ab" * 32}

    async def status(self, cid: str) -> dict[str, Any]:
        await self._record("status", cid=cid)
        fragment = {"index": 0, "cid": CID, "peer": "12D3KooWPeer", "answered": True}
        return {
            "cid": cid,
            "k": 1,
            "n": 2,
            "healthy": True,
            "segments": [{"index": 0, "fragments": [fragment]}],
        }

    async def repair(self) -> dict[str, Any]:
        await self._record("repair")
        return {"checked": 0, "repaired": 0}


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest_asyncio.fixture
async def client(aiohttp_client: Any, service: FakeService) -> Any:
    """A client that sends the token with every request, as the CLI does."""
    app = create_app(service, token=TOKEN, max_body_bytes=MAX_BODY)
    return await aiohttp_client(app, headers=AUTH)


@pytest_asyncio.fixture
async def bare(aiohttp_client: Any, service: FakeService) -> Any:
    """A client without the token: any local process that cannot read REPO/api.token."""
    return await aiohttp_client(create_app(service, token=TOKEN, max_body_bytes=MAX_BODY))


async def error_of(response: Any, status: int) -> dict[str, str]:
    """Assert ``response`` is a JSON error with ``status``; return its ``error`` object."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["message"]
    return body["error"]


RECIPIENT = "age1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq"
PUT_BODY = {"path": "/models/m.onnx", "k": 2, "n": 3, "recipients": [RECIPIENT], "public": False}
GET_BODY = {"cid": CID, "output": "/tmp/out.onnx", "identity_path": None}
POSTS = [("/put", PUT_BODY), ("/get", GET_BODY), ("/repair", {})]


# -- happy paths ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_reads(client: Any, service: FakeService) -> None:
    r = await client.get(f"{P}/health")
    assert r.status == 200 and await r.json() == {"ok": True}
    r = await client.get(f"{P}/id")
    assert (await r.json())["recipient"] == "age1xyz"
    r = await client.get(f"{P}/peers")
    assert (await r.json())[0]["connected"] is True
    r = await client.get(f"{P}/status/{CID}")
    assert (await r.json())["segments"][0]["fragments"][0]["answered"] is True
    assert [c[0] for c in service.calls] == ["identity", "peers", "status"]
    assert service.calls[-1][1] == {"cid": CID}


@pytest.mark.asyncio
async def test_put_passes_every_key(client: Any, service: FakeService) -> None:
    r = await client.post(f"{P}/put", json=PUT_BODY, headers=AUTH)
    assert r.status == 200
    assert (await r.json())["cid"] == CID
    assert service.calls == [("put", PUT_BODY)]


@pytest.mark.asyncio
async def test_put_defaults(client: Any, service: FakeService) -> None:
    r = await client.post(f"{P}/put", json={"path": "/m.onnx"}, headers=AUTH)
    assert r.status == 200
    assert service.calls == [
        ("put", {"path": "/m.onnx", "k": None, "n": None, "recipients": [], "public": False})
    ]


@pytest.mark.asyncio
async def test_get(client: Any, service: FakeService) -> None:
    r = await client.post(
        f"{P}/get", json={"cid": CID, "output": "/o", "identity_path": "/k"}, headers=AUTH
    )
    assert (await r.json())["path"] == "/o"
    assert service.calls == [("get", {"cid": CID, "output": "/o", "identity_path": "/k"})]


@pytest.mark.asyncio
@pytest.mark.parametrize("body", [None, {}])
async def test_repair_with_or_without_body(client: Any, service: FakeService, body: Any) -> None:
    kwargs = {} if body is None else {"json": body}
    r = await client.post(f"{P}/repair", headers=AUTH, **kwargs)
    assert r.status == 200 and await r.json() == {"checked": 0, "repaired": 0}
    assert service.calls == [("repair", {})]


@pytest.mark.asyncio
async def test_openapi_is_served(client: Any) -> None:
    r = await client.get(f"{P}/openapi.json")
    assert r.status == 200 and r.content_type == "application/json"
    assert await r.json() == openapi()


# -- authorization ----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("route,body", POSTS)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        "Bearer ",
        TOKEN,
        "Bearer t\u00f6k\u00e9n",
    ],
)
async def test_posts_need_the_token(
    bare: Any, service: FakeService, route: str, body: Any, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    r = await bare.post(P + route, json=body, headers=headers)
    error = await error_of(r, 401)
    assert error["type"] == "HTTPUnauthorized"
    assert "api.token" in error["message"]
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert service.calls == []


@pytest.mark.asyncio
async def test_bearer_scheme_is_case_insensitive(bare: Any) -> None:
    r = await bare.post(f"{P}/repair", headers={"Authorization": f"bearer {TOKEN}"})
    assert r.status == 200


@pytest.mark.asyncio
async def test_every_route_but_health_and_openapi_needs_the_token(
    bare: Any, service: FakeService
) -> None:
    """Reads too: status makes the node fetch a manifest from the network, jobs name models."""
    for op in OPERATIONS:
        path = P + op.path.replace("{cid}", CID).replace("{job_id}", "1")
        body = {"json": {}} if op.method == "POST" else {}
        r = await bare.request(op.method, path, **body)
        if op.name in ("health", "openapi"):
            assert r.status == 200, op.name
        else:
            assert r.status == 401, op.name
            assert "api.token" in (await error_of(r, 401))["message"]
    assert service.calls == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1.evil.example:80"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://127.0.0.1:9", "Sec-Fetch-Site": "cross-site"},
    ],
)
async def test_cross_site_browser_requests_are_refused(
    client: Any, service: FakeService, headers: dict[str, str]
) -> None:
    """A web page may make the browser send simple requests to a loopback port (it cannot
    read the answers): refused before any effect, token or not."""
    for method, path in [("GET", f"{P}/status/{CID}"), ("POST", f"{P}/repair")]:
        r = await client.request(method, path, headers=headers)
        error = await error_of(r, 403)
        assert "refused" in error["message"]
    assert service.calls == []


@pytest.mark.asyncio
async def test_same_origin_and_non_browser_requests_pass(client: Any) -> None:
    for headers in (
        {},
        {"Origin": "http://127.0.0.1:8080"},
        {"Origin": "http://localhost:1"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
    ):
        assert (await client.get(f"{P}/id", headers=headers)).status == 200


@pytest.mark.asyncio
async def test_non_loopback_host_is_refused(client: Any, service: FakeService) -> None:
    r = await client.get(f"{P}/id", headers={"Host": "evil.example:8080"})
    error = await error_of(r, 421)
    assert "loopback" in error["message"]
    for host in ("localhost:1", "127.0.0.1", "[::1]:5"):
        assert (await client.get(f"{P}/health", headers={"Host": host})).status == 200
    assert service.calls == []


def test_create_app_refuses_an_empty_token(service: FakeService) -> None:
    with pytest.raises(ValueError, match="token"):
        create_app(service, token="", max_body_bytes=MAX_BODY)


# -- malformed requests -----------------------------------------------------------------------


async def post_raw(
    client: Any, route: str, data: bytes, content_type: str = "application/json"
) -> Any:
    return await client.post(P + route, data=data, headers={**AUTH, "Content-Type": content_type})


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "data,message",
    [
        (b"{", "invalid JSON: Expecting property name"),
        (b'{"path": "/a",}', "invalid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b'{"path": "/a", "path": "/b"}', "duplicate key 'path'"),
        (b'{"path": "/a", "k": NaN}', "NaN is not JSON"),
        (b"[]", "must be a JSON object, not array"),
        (b'"/a"', "must be a JSON object, not string"),
        (b"4", "must be a JSON object, not integer"),
        (b"null", "must be a JSON object, not null"),
        (b"", "request body is empty: expected a JSON object with path"),
    ],
)
async def test_malformed_json(client: Any, service: FakeService, data: bytes, message: str) -> None:
    error = await error_of(await post_raw(client, "/put", data), 400)
    assert error["type"] == "HTTPBadRequest"
    assert message in error["message"]
    assert service.calls == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "route,body,message",
    [
        ("/put", {}, "missing required key(s): path"),
        ("/get", {"cid": CID}, "missing required key(s): output"),
        ("/get", {}, "missing required key(s): cid, output"),
        (
            "/put",
            {"path": "/a", "size": 3},
            "unknown key(s): size (accepted: path, k, n, recipients, public)",
        ),
        ("/repair", {"force": True}, "unknown key(s): force (accepted: none)"),
        ("/put", {"path": 3}, "'path' must be a string, not integer"),
        ("/put", {"path": "rel/m.onnx"}, "'path' must be an absolute path, not 'rel/m.onnx'"),
        ("/put", {"path": "/a\u0000b"}, "'path' must not contain a NUL character"),
        ("/put", {"path": "/a", "k": "4"}, "'k' must be an integer or null, not string"),
        ("/put", {"path": "/a", "n": True}, "'n' must be an integer or null, not boolean"),
        ("/put", {"path": "/a", "k": 1.5}, "'k' must be an integer or null, not number"),
        (
            "/put",
            {"path": "/a", "recipients": "age1x"},
            "'recipients' must be an array of strings, not string",
        ),
        (
            "/put",
            {"path": "/a", "recipients": [RECIPIENT, 2]},
            "'recipients'[1] must be a string, not integer",
        ),
        ("/put", {"path": "/a", "public": 1}, "'public' must be a boolean, not integer"),
        (
            "/put",
            {"path": "/a", "recipients": ["age1x"]},
            "'recipients'[0] 'age1x': not an age recipient",
        ),
        ("/put", {"path": "/a", "k": 0}, "'k' must be at least 1, not 0"),
        ("/put", {"path": "/a", "n": 65}, "'n' must be at most 64, not 65"),
        ("/put", {"path": "/a", "public": None}, "'public' must be a boolean, not null"),
        ("/get", {"cid": "QmNope", "output": "/o"}, "'cid': "),
        ("/get", {"cid": 5, "output": "/o"}, "'cid' must be a string, not integer"),
        ("/get", {"cid": CID, "output": "o"}, "'output' must be an absolute path"),
        (
            "/get",
            {"cid": CID, "output": "/o", "identity_path": "k.txt"},
            "'identity_path' must be an absolute path",
        ),
        (
            "/get",
            {"cid": CID, "output": "/o", "identity_path": {}},
            "'identity_path' must be a string, not object",
        ),
    ],
)
async def test_invalid_bodies(
    client: Any, service: FakeService, route: str, body: Any, message: str
) -> None:
    error = await error_of(await client.post(P + route, json=body, headers=AUTH), 400)
    assert message in error["message"], error["message"]
    assert service.calls == []


@pytest.mark.asyncio
async def test_invalid_cid_in_status_path(client: Any, service: FakeService) -> None:
    error = await error_of(await client.get(f"{P}/status/QmNotACid"), 400)
    assert error["type"] == "BadRequest"
    assert service.calls == []


@pytest.mark.asyncio
async def test_oversize_body_with_content_length(client: Any, service: FakeService) -> None:
    body = json.dumps({"path": "/" + "a" * MAX_BODY}).encode()
    error = await error_of(await post_raw(client, "/put", body), 413)
    assert error["type"] == "HTTPRequestEntityTooLarge"
    assert f"exceeds the {MAX_BODY}-byte limit" in error["message"]
    assert service.calls == []


@pytest.mark.asyncio
async def test_oversize_chunked_body(client: Any, service: FakeService) -> None:
    async def chunks() -> Any:
        for _ in range(4):
            yield b" " * MAX_BODY

    r = await client.post(
        f"{P}/put", data=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    )
    error = await error_of(r, 413)
    assert str(MAX_BODY) in error["message"]
    assert service.calls == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "content_type,message",
    [
        ("text/plain", "expected Content-Type: application/json, got 'text/plain'"),
        ("application/x-www-form-urlencoded", "got 'application/x-www-form-urlencoded'"),
        ("application/json; charset=latin-1", "JSON must be UTF-8"),
    ],
)
async def test_wrong_content_type(
    client: Any, service: FakeService, content_type: str, message: str
) -> None:
    r = await post_raw(client, "/put", json.dumps({"path": "/a"}).encode(), content_type)
    error = await error_of(r, 415)
    assert message in error["message"]
    assert service.calls == []


@pytest.mark.asyncio
async def test_charset_utf8_is_accepted(client: Any) -> None:
    r = await post_raw(client, "/put", b'{"path": "/a"}', "application/json; charset=UTF-8")
    assert r.status == 200


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "method,path",
    [("GET", "/nope"), ("GET", f"{P}/nope"), ("POST", f"{P}/nope"), ("GET", f"{P}/status/")],
)
async def test_unknown_route_is_json_404(client: Any, method: str, path: str) -> None:
    # A POST to an unknown route is a 404, not a 401: the guard only covers real routes.
    error = await error_of(await client.request(method, path), 404)
    assert error["type"] == "HTTPNotFound"
    assert error["message"] == f"no such endpoint: {method} {path} (see {P}/openapi.json)"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "method,route,allowed",
    [
        ("GET", "/put", "POST"),
        ("POST", "/id", "GET"),
        ("DELETE", "/repair", "POST"),
        ("HEAD", "/health", "GET"),
    ],
)
async def test_wrong_method_is_json_405(client: Any, method: str, route: str, allowed: str) -> None:
    r = await client.request(method, P + route, headers=AUTH)
    assert r.status == 405
    assert r.headers["Allow"] == allowed
    if method != "HEAD":
        error = await error_of(r, 405)
        assert error["message"] == f"{method} is not allowed on {P}{route} (allowed: {allowed})"


# -- domain errors ----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "error,status",
    [
        (InvalidArgument("k=5 must be below n=4"), 409),
        (ManifestError("manifest version 9 is not supported"), 409),
        (HeaderError("bad recipient 'age1'"), 409),
        (NoIdentityMatch("no identity opens this file"), 403),
        (BackendTimeout(f"fragment {CID} was not found within 60 s"), 504),
        (NotEnoughFragments("segment 0: 3 of the 4 needed fragments"), 503),
        (IntegrityError("fragment hash mismatch"), 502),
        (DecryptionError("payload authentication failed"), 502),
        (BackendError("kubo exited"), 500),
        (StorageError("something in storage"), 500),
        (ModelFileError("not an ONNX model"), 400),
        (PassError("pass failed"), 400),
        (VerificationError("outputs differ"), 422),
        (ConfigError("config: bad"), 500),
        (RepoError("not a repo"), 409),
        (DaemonError("busy"), 502),
        (NodeError("conflict"), 409),
        (PlacementError("only 2 peers for n=6"), 503),
    ],
)
async def test_domain_errors_map_to_statuses(
    client: Any, service: FakeService, error: Exception, status: int
) -> None:
    service.error = error
    body = await error_of(await client.get(f"{P}/status/{CID}"), status)
    assert body == {"type": type(error).__name__, "message": str(error)}


@pytest.mark.asyncio
async def test_a_new_error_class_is_mapped_with_one_line(
    client: Any, service: FakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    class LaterError(NodeError):
        """Stands for an error class added later: its status is one line, on the class."""

        http_status = 507

    service.error = LaterError("only 2 peers for n=6")
    await error_of(await client.post(f"{P}/put", json={"path": "/a"}, headers=AUTH), 507)


@pytest.mark.asyncio
async def test_unexpected_error_is_a_generic_500_and_the_daemon_keeps_serving(
    client: Any, service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    service.error = KeyError("internal detail")
    with caplog.at_level(logging.ERROR, logger="fusenode.node.api"):
        error = await error_of(await client.get(f"{P}/peers"), 500)
    assert error["type"] == "InternalServerError"
    assert "internal detail" not in error["message"] and "log" in error["message"]
    [record] = [r for r in caplog.records if r.name == "fusenode.node.api"]
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    r = await client.get(f"{P}/peers")
    assert r.status == 200


@pytest.mark.asyncio
async def test_unserializable_result_is_a_500(
    client: Any, service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    async def bad() -> dict[str, Any]:
        return {"when": object()}

    service.identity = bad  # type: ignore[method-assign]
    with caplog.at_level(logging.CRITICAL, logger="fusenode.node.api"):
        await error_of(await client.get(f"{P}/id"), 500)


# -- the OpenAPI document ---------------------------------------------------------------------


def _app_routes(app: web.Application) -> set[tuple[str, str]]:
    """The JSON API's routes (/metrics and the dashboard's files are not JSON operations)."""
    return {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource and r.resource.canonical.startswith(P + "/")
    }


def _doc_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item}


def test_openapi_documents_exactly_the_app_routes(service: FakeService) -> None:
    doc = openapi()
    assert doc["openapi"].startswith("3.1")
    app = create_app(service, token=TOKEN, max_body_bytes=MAX_BODY)
    assert _app_routes(app) == _doc_routes(doc)
    statuses = {op.name: str(op.status) for op in OPERATIONS}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            secured = op.get("security") == [{"bearerAuth": []}]
            open_route = path in (f"{P}/health", f"{P}/openapi.json")
            assert secured == (not open_route), (method, path)
            assert statuses[op["operationId"]] in op["responses"]
            if not open_route:
                assert op["responses"]["401"] == {"$ref": "#/components/responses/401"}
            else:
                assert "401" not in op["responses"]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


@pytest.mark.parametrize("op", [op for op in OPERATIONS if op.body is not None], ids=str)
def test_openapi_request_schemas_match_the_validation(op: Any) -> None:
    doc = openapi()
    schemas = doc["components"]["schemas"]
    ref = doc["paths"][P + op.path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = schemas[ref["$ref"].rsplit("/", 1)[1]]
    fields = op.body.fields
    assert set(schema["properties"]) == set(fields)
    assert set(schema.get("required", [])) == {k for k, f in fields.items() if f.required}
    assert schema["additionalProperties"] is False


def test_openapi_references_resolve() -> None:
    doc = openapi()
    for ref in set(_refs(doc)):
        section, name = ref.split("/")[2:]
        assert name in doc["components"][section], ref


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


# -- DaemonClient against a real server in a thread ------------------------------------------


class ServerThread:
    """Serves an app on 127.0.0.1 from its own event loop in a thread, as a daemon would."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _start(self) -> None:
        self.runner = web.AppRunner(self.app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def daemon(service: FakeService) -> Iterator[ServerThread]:
    with ServerThread(create_app(service, token=TOKEN, max_body_bytes=MAX_BODY)) as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_calls(
    daemon: ServerThread, service: FakeService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = DaemonClient(daemon.url, TOKEN, timeout=5)
    assert c.health() == {"ok": True}
    assert c.identity()["peer_id"] == "12D3KooWPeer"
    assert c.peers()[0]["peer_id"] == "12D3KooWOther"
    assert c.status(CID)["healthy"] is True
    assert c.repair() == {"checked": 0, "repaired": 0}
    monkeypatch.chdir(tmp_path)
    assert c.put("m.onnx", k=2, n=3, recipients=[RECIPIENT], public=True)["cid"] == CID
    assert c.get(CID, "out.onnx", identity_path="id.txt", timeout=5)["path"] == str(
        tmp_path / "out.onnx"
    )
    put, get = service.calls[-2:]
    # Relative paths are resolved in the client's working directory, not the daemon's.
    assert put == (
        "put",
        {
            "path": str(tmp_path / "m.onnx"),
            "k": 2,
            "n": 3,
            "recipients": [RECIPIENT],
            "public": True,
        },
    )
    assert get == (
        "get",
        {
            "cid": CID,
            "output": str(tmp_path / "out.onnx"),
            "identity_path": str(tmp_path / "id.txt"),
        },
    )
    assert TOKEN not in repr(c)


def test_client_raises_the_daemons_error_as_its_own_class(
    daemon: ServerThread, service: FakeService
) -> None:
    c = DaemonClient(daemon.url, TOKEN, timeout=5)
    service.error = NotEnoughFragments("segment 0: only 3 of the 4 needed fragments answered")
    with pytest.raises(NotEnoughFragments) as info:
        c.put("/m.onnx")
    assert str(info.value) == "segment 0: only 3 of the 4 needed fragments answered"
    assert info.value.exit_code == 7  # the CLI exits as it would have without a daemon
    with pytest.raises(BadRequest, match=r"^'cid': "):
        c.get("QmNope", "/o")
    service.error = KeyError("a bug")  # not one of ours: the generic 500 and its message
    with pytest.raises(DaemonError, match="internal error in the daemon"):
        c.repair()


@pytest.mark.parametrize("token", [None, "wrong"])
def test_client_without_the_right_token(daemon: ServerThread, token: str | None) -> None:
    c = DaemonClient(daemon.url, token, timeout=5)
    assert c.health() == {"ok": True}  # health needs no token
    for call in (c.identity, c.repair):
        with pytest.raises(DaemonError, match=r"api\.token"):
            call()


def test_client_connection_refused() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DaemonError) as info:
        DaemonClient(url, TOKEN, timeout=2).identity()
    assert str(info.value) == f"daemon at {url} is not answering"


def test_client_timeout(daemon: ServerThread, service: FakeService) -> None:
    service.delay = 1.0
    with pytest.raises(DaemonError, match=r"did not answer within 0.2 s"):
        DaemonClient(daemon.url, TOKEN, timeout=0.2).peers()


def test_client_ignores_proxy_variables(
    daemon: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy that does not exist: if the client used it, the call would fail.
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("no_proxy", "")
    assert DaemonClient(daemon.url, None, timeout=5).health() == {"ok": True}


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:5001",
        "https://127.0.0.1:5001",
        "http://127.0.0.1",
        "http://example.com:80",
        "http://127.0.0.1:1/x",
    ],
)
def test_client_refuses_non_loopback_urls(url: str) -> None:
    with pytest.raises(DaemonError, match="loopback only"):
        DaemonClient(url, None, timeout=1)


# -- find_daemon ------------------------------------------------------------------------------


def write_api_files(repo: Path, url: str, pid: int, token: str | None = TOKEN) -> None:
    (repo / "api.json").write_text(json.dumps({"url": url, "pid": pid, "peer_id": "12D3KooWPeer"}))
    if token is not None:
        (repo / "api.token").write_text(token + "\n")
        (repo / "api.token").chmod(0o600)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_find_daemon_running(daemon: ServerThread, tmp_path: Path) -> None:
    write_api_files(tmp_path, daemon.url, os.getpid())
    c = find_daemon(tmp_path, timeout=7)
    assert c is not None and c.base_url == daemon.url and c.timeout == 7
    assert c.repair() == {"checked": 0, "repaired": 0}  # the token was read


def test_find_daemon_without_a_token_file(daemon: ServerThread, tmp_path: Path) -> None:
    write_api_files(tmp_path, daemon.url, os.getpid(), token=None)
    c = find_daemon(tmp_path)
    assert c is not None and c.token is None


def test_find_daemon_missing_file(tmp_path: Path) -> None:
    assert find_daemon(tmp_path) is None


def test_find_daemon_stale_pid(daemon: ServerThread, tmp_path: Path) -> None:
    write_api_files(tmp_path, daemon.url, dead_pid())
    assert find_daemon(tmp_path) is None


def test_find_daemon_nothing_listening(tmp_path: Path) -> None:
    write_api_files(tmp_path, f"http://127.0.0.1:{free_port()}", os.getpid())
    assert find_daemon(tmp_path) is None


@pytest.mark.parametrize(
    "content",
    [
        "{",
        "[]",
        '{"url": "http://127.0.0.1:1"}',
        '{"url": "http://127.0.0.1:1", "pid": 0}',
        '{"url": "http://127.0.0.1:1", "pid": true}',
        '{"url": "http://10.1.1.1:1", "pid": PID}',
    ],
)
def test_find_daemon_malformed_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "api.json").write_text(content.replace("PID", str(os.getpid())))
    with pytest.raises(DaemonError, match=r"api\.json|loopback"):
        find_daemon(tmp_path)
