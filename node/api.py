"""The daemon's local HTTP API: what the ``fusenode`` CLI on this machine talks to.

One factory, :func:`create_app`, builds the application for the daemon and for the tests.
Its routes, request checks and openapi.json all come from the operation table
(`fusenode.node.operations`); each handler only turns a checked request into a call of the
use case of the same name (`fusenode.node.service.NodeService`) and its result into JSON.

Security decisions:

- Listens on 127.0.0.1 only (the daemon binds it; nothing here opens a socket).
- Every route but ``health``, ``openapi.json``, ``/metrics`` and the dashboard's files needs
  ``Authorization: Bearer <token>``:
  the daemon writes the token to ``REPO/api.token`` (mode 0600), so only the repo's owner can
  use the node. Reads too: ``status`` makes the node fetch the manifest a CID names from the
  network (a side effect anyone could otherwise trigger), and job errors name models. Every
  route is guarded by :func:`_guard_middleware` unless the operation table marks it open, so
  a route added later is protected without opting in. ``/metrics`` (Prometheus text) is open
  like health, for scrapers on this machine: aggregate numbers only, no CID, no model name.
  The dashboard's page, script and style (``/``, ``/dashboard/...``) are open too: static
  files, the same for every node; the page asks for the token and sends it to the JSON API
  like any client (its answers are data put into the page as text, never as markup).
- A browser page cannot use the API: a request a browser marks cross-site (``Sec-Fetch-Site``
  other than ``same-origin`` or ``none``) or that carries an ``Origin`` other than a loopback
  one is refused with 403 before anything else (a page can send simple requests to a loopback
  port without reading the answer; this stops them having effects), requests whose ``Host``
  is not a loopback name are refused with 421 (this defeats DNS rebinding, the one way a web
  page could read an answer), and no CORS header is ever sent.

Errors are JSON everywhere, shaped ``{"error": {"type": "<ExceptionClass>", "message": "..."}}``,
produced by one middleware (:func:`_error_middleware`). A domain error's status is its class's
``http_status`` (`fusenode.errors`); anything else is a generic 500 whose details go to the
log only.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any, Protocol

from aiohttp import web

from fusenode import strictjson
from fusenode.errors import Error
from fusenode.node.operations import API_PREFIX, OPERATIONS, Operation, openapi
from fusenode.node.schema import Object, type_name

__all__ = [
    "API_PREFIX",
    "MAX_BODY_KEY",
    "SERVICE_KEY",
    "UseCases",
    "create_app",
    "error_status",
]

log = logging.getLogger(__name__)


class UseCases(Protocol):
    """What the API serves: for each operation of `fusenode.node.operations`, a coroutine
    method of the same name taking the checked request as keyword arguments and returning a
    JSON-ready result (`fusenode.node.service.NodeService`; a fake in the API's tests)."""

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]: ...


SERVICE_KEY = web.AppKey("service", UseCases)
TOKEN_KEY = web.AppKey("token", bytes)
MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
OPENAPI_KEY = web.AppKey("openapi", bytes)
GATE_KEY = web.AppKey("gate", object)
#: Operations that do not wait for a garbage collection: gc itself, and what transfers nothing.
_UNGATED = frozenset({"gc", "health", "openapi", "identity", "jobs", "job"})


# -- errors -----------------------------------------------------------------------------------


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
#: The dashboard's files (package data of `fusenode.node.dashboard`): route -> (file, type).
PAGES = {
    "/": ("index.html", "text/html"),
    "/dashboard/app.js": ("app.js", "text/javascript"),
    "/dashboard/style.css": ("style.css", "text/css"),
}
METRICS_PATH = "/metrics"
#: Routes anyone on this machine may call without the token.
OPEN_PATHS = frozenset(
    [*(API_PREFIX + op.path for op in OPERATIONS if not op.auth), METRICS_PATH, *PAGES]
)
#: Sent with every dashboard file: nothing but this origin's own files and API, no inline
#: script, no framing (clickjacking), no referrer.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _host_name(host: str) -> str:
    """``Host`` header without its port (``[::1]:80`` -> ``[::1]``)."""
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rpartition(":")[0] if ":" in host else host


def _loopback_origin(origin: str) -> bool:
    """``http://127.0.0.1:PORT`` and the like: a page served from this machine's loopback."""
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and _host_name(rest).lower() in _LOOPBACK_HOSTS


@web.middleware
async def _guard_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse cross-site browser requests and non-loopback Host headers; require the bearer
    token on every route the operation table does not mark open."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        raise web.HTTPForbidden(text=f"cross-site request refused (Sec-Fetch-Site: {site:.40})")
    origin = request.headers.get("Origin")
    if origin is not None and not _loopback_origin(origin):
        raise web.HTTPForbidden(text=f"request from origin {origin!r:.80} refused")
    host = request.headers.get("Host")
    if host is not None and _host_name(host).lower() not in _LOOPBACK_HOSTS:
        raise web.HTTPMisdirectedRequest(
            text=f"Host {host!r} refused: this API answers loopback clients only"
        )
    if request.path in OPEN_PATHS or request.match_info.http_exception is not None:
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


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message)


async def _json_body(request: web.Request, body: Object) -> dict[str, Any]:
    """Read, parse and check the body of a POST against ``body``; 4xx with a precise reason.

    Order: size from Content-Length (413 before reading a byte), content type (415), then
    the bytes (aiohttp enforces client_max_size on chunked bodies: 413), JSON (400), shape (400).
    An empty body stands for ``{}`` on routes whose keys all have defaults.
    """
    fields = body.fields
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
            raw = strictjson.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _bad(f"request body is not UTF-8: {e.reason} at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise _bad(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except ValueError as e:  # duplicate key, NaN, nesting
            raise _bad(f"invalid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise _bad(f"request body must be a JSON object, not {type_name(raw)}")
    return body.check("request body", raw)


# -- handlers ---------------------------------------------------------------------------------


def _handler(op: Operation) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The route of ``op``: check its parameters and body, run its use case, answer JSON."""

    async def handle(request: web.Request) -> web.Response:
        args = {
            name: kind.from_text(repr(name), request.match_info[name])
            for name, kind in op.params.items()
        }
        if op.body is not None:
            args.update(await _json_body(request, op.body))
        run = getattr(request.app[SERVICE_KEY], op.name)
        gate = request.app.get(GATE_KEY)
        if gate is None or op.name in _UNGATED:
            result = await run(**args)
        else:
            async with gate.op():  # type: ignore[attr-defined]
                result = await run(**args)
        return web.json_response(result, status=op.status)

    return handle


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_KEY], content_type="application/json")


_SPECIAL = {"health": _health, "openapi": _openapi}


async def _metrics(request: web.Request) -> web.Response:
    from fusenode.node.metrics import CONTENT_TYPE

    body = await request.app[SERVICE_KEY].metrics_text()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _page(name: str, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    body = (resources.files("fusenode.node.dashboard") / name).read_bytes()

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=kind, charset="utf-8", headers=PAGE_HEADERS)

    return page


def create_app(
    service: UseCases, *, token: str, max_body_bytes: int, gate: object | None = None
) -> web.Application:
    """The API application around ``service``; the caller binds it to 127.0.0.1.

    ``token`` guards every route but health and openapi.json (see the module docstring); ``max_body_bytes`` caps request
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
    app[OPENAPI_KEY] = json.dumps(openapi(), indent=1).encode()
    if gate is not None:  # fusenode.node.gc.Gate: operations wait while a gc runs
        app[GATE_KEY] = gate
    for op in OPERATIONS:
        handler = _SPECIAL.get(op.name) or _handler(op)
        # allow_head=False: the routes are exactly those of openapi.json.
        app.router.add_route(op.method, API_PREFIX + op.path, handler)
    app.router.add_route("GET", METRICS_PATH, _metrics)
    for route, (name, kind) in PAGES.items():
        app.router.add_route("GET", route, _page(name, kind))
    return app
