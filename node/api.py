"""The daemon's local HTTP API: what the ``fusenode`` CLI on this machine talks to.

One factory, :func:`create_app`, builds the application for the daemon and for the tests. The
handlers only translate HTTP to calls on a :class:`NodeService` (the node's core, implemented in
``node.service``) and back; every decision about data lives in the service.

Routes (all under ``/api/v1``, documented in ``node/openapi.json``)::

    GET  /health          {"ok": true}: the daemon is up and serving
    GET  /id              this node's peer ID, listen addresses and age recipient
    GET  /peers           the peers this node knows, whether connected, when last seen
    GET  /status/{cid}    where each fragment of a stored file is, and who answered
    GET  /openapi.json    the API document
    POST /put             store a file that is on this machine (its absolute path is sent)
    POST /get             fetch a file by manifest CID into an absolute output path
    POST /repair          run a repair pass now

Security decisions:

- Listens on 127.0.0.1 only (the daemon binds it; nothing here opens a socket).
- Writes need ``Authorization: Bearer <token>``: the daemon writes the token to
  ``REPO/api.token`` (mode 0600), so only the repo's owner can store, fetch into a path of the
  daemon's choosing, or start a repair. Every non-GET route is guarded by
  :func:`_guard_middleware`, so a POST route added later is protected without opting in.
- Reads need no token: the peer ID, addresses and age recipient are public by design (they
  are what other nodes and senders are given), peers are visible to anyone on the swarm, and
  ``status`` requires knowing the CID and reveals only where fragments are pinned, which
  every peer holding one already knows. This keeps ``fusenode id`` and health checks working
  for any local user and for tools that cannot read the token.
- A browser page cannot use the reads either: requests whose ``Host`` is not a loopback name
  are refused with 421 (this defeats DNS rebinding, the one way a web page could reach a
  loopback port and read the answer), and no CORS header is ever sent.

Errors are JSON everywhere, shaped ``{"error": {"type": "<ExceptionClass>", "message": "..."}}``,
produced by one middleware (:func:`_error_middleware`). Domain errors map to a status through
:data:`ERROR_STATUS`, a table keyed by class and searched along the exception's MRO, so a new
error class (e.g. a ``PlacementError(NodeError)``) gets its own status with one line.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from fusenode.storage.backend import validate_cid
from fusenode.storage.errors import (
    InvalidArgument,
)

from fusenode.errors import Error

__all__ = [
    "API_PREFIX",
    "MAX_BODY_KEY",
    "OPENAPI_PATH",
    "REQUEST_FIELDS",
    "SERVICE_KEY",
    "NodeService",
    "create_app",
    "error_status",
]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
OPENAPI_PATH = Path(__file__).with_name("openapi.json")


class NodeService(Protocol):
    """What the API needs from the node's core (implemented by ``node.service``).

    All methods are coroutines and raise the domain errors of ``storage.errors``,
    ``passes.errors`` and ``node.errors``; the API turns those into HTTP statuses. Return values
    are JSON-ready dicts, sent to the client unchanged.
    """

    async def identity(self) -> dict[str, Any]:
        """``{"peer_id": str, "addresses": [str], "recipient": "age1..."}``."""
        ...

    async def peers(self) -> list[dict[str, Any]]:
        """``[{"peer_id": str, "connected": bool, "last_seen": str | None}]``."""
        ...

    async def put(
        self, path: str, k: int | None, n: int | None, recipients: list[str], public: bool
    ) -> dict[str, Any]:
        """Store the file at absolute ``path`` (on this machine); ``None`` k/n: config default.

        Returns ``{"cid", "segments", "k", "n", "placement": "distinct" | "weak" | "local",
        "holders": {peer_id: fragment_count}}``.
        """
        ...

    async def get(self, cid: str, output: str, identity_path: str | None) -> dict[str, Any]:
        """Fetch manifest ``cid`` into absolute ``output``; ``None`` identity: the node's.

        Returns ``{"path": str, "size": int, "name": str, "sha256": str}``.
        """
        ...

    async def status(self, cid: str) -> dict[str, Any]:
        """``{"cid", "k", "n", "healthy", "segments": [{"index", "fragments": [...]}]}``."""
        ...

    async def optimize(self, cid: str, recipients: list[str]) -> dict[str, Any]:
        """Queue (or find) the optimization job of ``cid``; returns the job."""
        ...

    async def jobs(self) -> list[dict[str, Any]]: ...

    async def job(self, job_id: int) -> dict[str, Any]: ...

    async def share(
        self, cid: str, recipients: list[str], identity_path: str | None
    ) -> dict[str, Any]: ...

    async def info(self, cid: str, identity_path: str | None) -> dict[str, Any]: ...

    async def repair(self) -> dict[str, Any]:
        """Run one repair pass now and return its summary."""
        ...


SERVICE_KEY = web.AppKey("service", NodeService)
TOKEN_KEY = web.AppKey("token", bytes)
MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
OPENAPI_KEY = web.AppKey("openapi", bytes)


# -- error mapping ----------------------------------------------------------------------------


def error_status(exc: BaseException) -> int | None:
    """The HTTP status of a domain error (its class says it), or ``None`` for any other."""
    return exc.http_status if isinstance(exc, Error) else None


def _error_response(
    status: int, kind: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = {"error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)


def _describe_http_exception(request: web.Request, exc: web.HTTPException) -> str:
    """A message for an aiohttp-raised exception that says what to do about it."""
    if request.match_info.http_exception is exc:  # raised by the router, not by a handler
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            return f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
        return f"no such endpoint: {request.method} {request.path} (see {API_PREFIX}/openapi.json)"
    return exc.text or exc.reason


@web.middleware
async def _error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn every failure into a JSON error; the one place statuses are decided."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        keep = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        message = _describe_http_exception(request, exc)
        response = _error_response(exc.status, type(exc).__name__, message, keep)
    except Exception as exc:
        status = error_status(exc)
        if status is None:
            log.exception("%s %s failed unexpectedly", request.method, request.path)
            response = _error_response(
                500,
                "InternalServerError",
                "internal error in the daemon (details are in the daemon's log)",
            )
        else:
            if status >= 500:
                log.warning("%s %s: %s: %s", request.method, request.path, type(exc).__name__, exc)
            response = _error_response(status, type(exc).__name__, str(exc))
    else:
        return response
    # An error answered before the body was read: close instead of draining it (it may be
    # large, and the client is not going to get a better answer by sending the rest).
    if request.body_exists and not request.content.is_eof():
        response.force_close()
    return response


# -- guards: Host and token -------------------------------------------------------------------

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _host_name(host: str) -> str:
    """``Host`` header without its port (``[::1]:80`` -> ``[::1]``)."""
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rpartition(":")[0] if ":" in host else host


@web.middleware
async def _guard_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse non-loopback Host headers; require the bearer token on every non-GET route."""
    host = request.headers.get("Host")
    if host is not None and _host_name(host).lower() not in _LOOPBACK_HOSTS:
        raise web.HTTPMisdirectedRequest(
            text=f"Host {host!r} refused: this API answers loopback clients only"
        )
    if request.method in _SAFE_METHODS or request.match_info.http_exception is not None:
        return await handler(request)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="fusenode"'}
    if scheme.lower() != "bearer" or not given.strip():
        raise web.HTTPUnauthorized(
            headers=challenge,
            text="this request needs 'Authorization: Bearer <token>' "
            "(the daemon writes the token to REPO/api.token)",
        )
    # Bytes, not str: compare_digest refuses non-ASCII str, and a header may hold any octet.
    expected = request.app[TOKEN_KEY]
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), expected):
        raise web.HTTPUnauthorized(
            headers=challenge, text="wrong API token (the daemon's is in REPO/api.token)"
        )
    return await handler(request)


# -- request bodies ---------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}.get(
        type(value), "object"
    )


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message)


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(f"{key!r} must be a string, not {_type_name(value)}")
    return value


def _absolute_path(key: str, value: Any) -> str:
    """An absolute path: the daemon's working directory is not the client's."""
    text = _string(key, value)
    if "\0" in text:
        raise _bad(f"{key!r} must not contain a NUL character")
    if not os.path.isabs(text):
        raise _bad(f"{key!r} must be an absolute path, not {text!r}")
    return text


def _optional_absolute_path(key: str, value: Any) -> str | None:
    return None if value is None else _absolute_path(key, value)


def _optional_int(key: str, value: Any) -> int | None:
    # bool is an int in Python but not in JSON: true is not k=1.
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _bad(f"{key!r} must be an integer or null, not {_type_name(value)}")
    return value


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"{key!r} must be a boolean, not {_type_name(value)}")
    return value


def _string_list(key: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise _bad(f"{key!r} must be an array of strings, not {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(f"{key!r}[{i}] must be a string, not {_type_name(item)}")
    return value


def _cid(key: str, value: Any) -> str:
    try:
        return validate_cid(_string(key, value))
    except InvalidArgument as e:
        raise _bad(f"{key!r}: {e}") from None


_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One key of a request body: its check, and its default when absent (or required)."""

    check: Callable[[str, Any], Any]
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


#: Body keys of each POST route; they are the NodeService method's parameter names.
REQUEST_FIELDS: dict[str, dict[str, Field]] = {
    "put": {
        "path": Field(_absolute_path),
        "k": Field(_optional_int, None),
        "n": Field(_optional_int, None),
        "recipients": Field(_string_list, ()),
        "public": Field(_boolean, False),
    },
    "get": {
        "cid": Field(_cid),
        "output": Field(_absolute_path),
        "identity_path": Field(_optional_absolute_path, None),
    },
    "repair": {},
    "optimize": {
        "cid": Field(_cid),
        "recipients": Field(_string_list, ()),
    },
    "share": {
        "cid": Field(_cid),
        "recipients": Field(_string_list),
        "identity_path": Field(_optional_absolute_path, None),
    },
    "info": {
        "cid": Field(_cid),
        "identity_path": Field(_optional_absolute_path, None),
    },
}


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _json_body(request: web.Request, route: str) -> dict[str, Any]:
    """Read, parse and check the body of a POST to ``route``; raise 4xx with a precise reason.

    Order: size from Content-Length (413 before reading a byte), content type (415), then
    the bytes (aiohttp enforces client_max_size on chunked bodies: 413), JSON (400), shape (400).
    An empty body stands for ``{}`` on routes whose keys all have defaults.
    """
    fields = REQUEST_FIELDS[route]
    limit = request.app[MAX_BODY_KEY]
    length = request.content_length
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(
            limit, length, text=f"request body of {length} bytes exceeds the {limit}-byte limit"
        )
    if length == 0 or not request.body_exists:
        required = [k for k, f in fields.items() if f.required]
        if required:
            raise _bad(f"request body is empty: expected a JSON object with {', '.join(required)}")
        raw: Any = {}
    else:
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(
                text=f"expected Content-Type: application/json, got {request.content_type!r}"
            )
        if (request.charset or "utf-8").lower() not in ("utf-8", "utf8"):
            raise web.HTTPUnsupportedMediaType(
                text=f"JSON must be UTF-8, not charset={request.charset!r}"
            )
        data = await request.read()
        try:
            raw = json.loads(
                data.decode("utf-8"),
                object_pairs_hook=_reject_duplicates,
                parse_constant=_reject_constant,
            )
        except UnicodeDecodeError as e:
            raise _bad(f"request body is not UTF-8: {e.reason} at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise _bad(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except ValueError as e:  # from the hooks above
            raise _bad(f"invalid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise _bad(f"request body must be a JSON object, not {_type_name(raw)}")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise _bad(f"unknown key(s): {', '.join(unknown)} (accepted: {known})")
    missing = [k for k, f in fields.items() if f.required and k not in raw]
    if missing:
        raise _bad(f"missing required key(s): {', '.join(missing)}")
    body: dict[str, Any] = {}
    for key, f in fields.items():
        value = f.check(key, raw[key]) if key in raw else f.default
        body[key] = list(value) if isinstance(value, tuple) else value
    return body


# -- handlers ---------------------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_KEY], content_type="application/json")


async def _identity(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICE_KEY].identity())


async def _peers(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICE_KEY].peers())


async def _status(request: web.Request) -> web.Response:
    cid = validate_cid(request.match_info["cid"])  # InvalidArgument -> 400
    return web.json_response(await request.app[SERVICE_KEY].status(cid))


async def _put(request: web.Request) -> web.Response:
    body = await _json_body(request, "put")
    return web.json_response(await request.app[SERVICE_KEY].put(**body))


async def _get(request: web.Request) -> web.Response:
    body = await _json_body(request, "get")
    return web.json_response(await request.app[SERVICE_KEY].get(**body))


async def _repair(request: web.Request) -> web.Response:
    await _json_body(request, "repair")
    return web.json_response(await request.app[SERVICE_KEY].repair())


async def _optimize(request: web.Request) -> web.Response:
    body = await _json_body(request, "optimize")
    return web.json_response(await request.app[SERVICE_KEY].optimize(**body), status=202)


async def _jobs(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICE_KEY].jobs())


async def _job(request: web.Request) -> web.Response:
    text = request.match_info["job_id"]
    if not text.isdigit() or len(text) > 18:
        raise _bad(f"job id must be a positive integer, not {text!r}")
    return web.json_response(await request.app[SERVICE_KEY].job(int(text)))


async def _share(request: web.Request) -> web.Response:
    body = await _json_body(request, "share")
    return web.json_response(await request.app[SERVICE_KEY].share(**body))


async def _info(request: web.Request) -> web.Response:
    body = await _json_body(request, "info")
    return web.json_response(await request.app[SERVICE_KEY].info(**body))


def create_app(service: NodeService, *, token: str, max_body_bytes: int) -> web.Application:
    """The API application around ``service``; the caller binds it to 127.0.0.1.

    ``token`` guards every write (see the module docstring); ``max_body_bytes`` caps request
    bodies (they only ever carry paths and options, never file contents).
    """
    if not token or token != token.strip():
        raise ValueError("the API token must be non-empty and without surrounding whitespace")
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be positive")
    app = web.Application(
        middlewares=[_error_middleware, _guard_middleware], client_max_size=max_body_bytes
    )
    app[SERVICE_KEY] = service
    app[TOKEN_KEY] = token.encode("utf-8")
    app[MAX_BODY_KEY] = max_body_bytes
    app[OPENAPI_KEY] = OPENAPI_PATH.read_bytes()
    p = API_PREFIX
    # allow_head=False: the routes are exactly those of openapi.json.
    app.router.add_get(f"{p}/health", _health, allow_head=False)
    app.router.add_get(f"{p}/openapi.json", _openapi, allow_head=False)
    app.router.add_get(f"{p}/id", _identity, allow_head=False)
    app.router.add_get(f"{p}/peers", _peers, allow_head=False)
    app.router.add_get(f"{p}/status/{{cid}}", _status, allow_head=False)
    app.router.add_post(f"{p}/put", _put)
    app.router.add_post(f"{p}/get", _get)
    app.router.add_post(f"{p}/repair", _repair)
    app.router.add_post(f"{p}/optimize", _optimize)
    app.router.add_get(f"{p}/jobs", _jobs, allow_head=False)
    app.router.add_get(f"{p}/jobs/{{job_id}}", _job, allow_head=False)
    app.router.add_post(f"{p}/share", _share)
    app.router.add_post(f"{p}/info", _info)
    return app
