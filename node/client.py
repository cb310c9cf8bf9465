"""The CLI's side of the daemon API: a small synchronous client, and finding the daemon.

The CLI is synchronous and should start fast, so this uses the stdlib ``urllib.request``
instead of aiohttp: no event loop, nothing heavy to import.

Files the daemon writes in its repo once it serves (and removes when it stops)::

    REPO/api.token   the bearer token for every request but health: one line of ASCII, 0600,
                     written before api.json
    REPO/api.json    {"url": "http://127.0.0.1:PORT", "pid": 1234, "peer_id": "12D3Koo..."},
                     written last (atomically) to mark the daemon ready

A daemon that crashed leaves them behind, so :func:`find_daemon` trusts them only if the pid
is alive and the URL answers ``GET /api/v1/health`` within 2 seconds.

Every failure is a ``node.errors.DaemonError`` whose message is fit to print after
``fusenode: error: ``: the daemon's own error message when it answered, otherwise what went
wrong with the connection.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusenode import defaults
from fusenode.errors import Error
from fusenode.layout import RepoLayout
from fusenode.node.errors import DaemonError
from fusenode.node.operations import API_PREFIX, by_name, has_operation

# The classes a daemon's error may name are those of every layer: import their modules so
# `Error.named` knows them (all are small).
from fusenode.passes import errors as _passes_errors  # noqa: F401
from fusenode.storage import errors as _storage_errors  # noqa: F401

__all__ = ["HEALTH_TIMEOUT", "DaemonClient", "find_daemon"]

HEALTH_TIMEOUT = defaults.DAEMON_HEALTH_TIMEOUT
_DEFAULT: Any = object()
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The daemon never redirects; following one would send the token elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No ProxyHandler settings from the environment: an http_proxy variable must not route a
# loopback request (and its token) through a proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


class DaemonClient:
    """Runs operations (`fusenode.node.operations`) on a local daemon.

    ``client.call("put", "/m.onnx", k=4)`` or ``client.put("/m.onnx", k=4)``: arguments are
    the operation's parameters then its body keys, in their declared order; relative paths
    are made absolute here (the daemon's working directory is not ours). An error the daemon
    answers is raised again as its own class (`fusenode.errors.Error.named`), so a command
    exits with the same code through a daemon as without one.

    ``timeout`` (seconds) bounds each wait on the socket for the quick calls. ``put``,
    ``get`` and ``verify`` move whole files and answer only when done, ``gc`` waits for a
    quiet moment and ``rm`` for its holders, so they wait as long as they take unless given
    their own ``timeout`` (the user can interrupt).
    """

    _LONG = frozenset({"put", "get", "verify", "gc", "rm"})

    def __init__(self, base_url: str, token: str | None, timeout: float) -> None:
        parts = urllib.parse.urlsplit(base_url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if (
            parts.scheme != "http"
            or parts.hostname not in _LOOPBACK
            or port is None
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise DaemonError(
                f"daemon URL {base_url!r} is not http://127.0.0.1:PORT (loopback only)"
            )
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"DaemonClient({self.base_url!r})"  # never the token

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_") or not has_operation(name):
            raise AttributeError(name)
        return functools.partial(self.call, name)

    def call(self, name: str, *args: Any, timeout: Any = _DEFAULT, **kwargs: Any) -> Any:
        """Run operation ``name`` on the daemon; its JSON result."""
        op = by_name(name)
        kwargs.pop("progress", None)  # a daemon cannot draw on our terminal
        values = op.bind(args, kwargs)
        path = op.path
        for param in op.params:
            path = path.replace(f"{{{param}}}", urllib.parse.quote(str(values[param]), safe=""))
        body = None
        if op.body is not None:
            body = {k: v for k, v in values.items() if k in op.body.fields}
        if timeout is _DEFAULT:
            timeout = None if name in self._LONG else self.timeout
        return self._call(op.method, path, body, timeout)

    # -- transport --------------------------------------------------------------------------

    def _call(
        self, method: str, route: str, body: dict[str, Any] | None, timeout: float | None
    ) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.base_url + API_PREFIX + route, data=data, headers=headers, method=method
        )
        wait = timeout
        where = f"daemon at {self.base_url}"
        try:
            with _OPENER.open(request, timeout=wait) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            with e:
                raise _daemon_error(e, where) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError):
                raise DaemonError(f"{where} is not answering") from None
            if isinstance(e.reason, TimeoutError):
                raise DaemonError(f"{where} did not answer within {wait} s") from None
            raise DaemonError(f"{where} cannot be reached: {e.reason}") from None
        except TimeoutError:
            raise DaemonError(f"{where} did not answer within {wait} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise DaemonError(
                f"{where} broke off the connection: {str(e) or type(e).__name__}"
            ) from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise DaemonError(f"{where} answered {method} {route} with invalid JSON") from None


def _daemon_error(e: urllib.error.HTTPError, where: str) -> Error:
    """The daemon's error as its own class (a DaemonError when the class is not one of
    ours), with the daemon's message; the HTTP status when there is no JSON body."""
    try:
        error = json.loads(e.read())["error"]
        kind, message = error["type"], error["message"]
    except (OSError, http.client.HTTPException, ValueError, TypeError, KeyError):
        return DaemonError(f"{where} answered HTTP {e.code} {e.reason}")
    if not isinstance(message, str) or not message:
        return DaemonError(f"{where} answered HTTP {e.code} {e.reason}")
    cls = Error.named(kind) if isinstance(kind, str) else None
    return cls(message) if cls is not None else DaemonError(message)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def find_daemon(repo_path: Path, timeout: float = defaults.DAEMON_TIMEOUT) -> DaemonClient | None:
    """A client for the daemon serving ``repo_path``, or ``None`` when none is running.

    ``None`` when REPO/api.json is missing, its pid is not alive, or the URL does not answer
    ``GET /api/v1/health`` within 2 s (a stale file from a crash). A present but malformed
    api.json raises DaemonError (the daemon writes it atomically, so it is damage, not a
    race). A missing or unreadable api.token gives a client without a token: its requests fail
    with the daemon's 401 message (which says where the token is). ``timeout`` is the returned client's.
    """
    files = RepoLayout(Path(repo_path))
    api_file = files.api_json
    try:
        info = json.loads(api_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DaemonError(f"{api_file}: cannot read: {e} (delete it if no daemon runs)") from e
    url = info.get("url") if isinstance(info, dict) else None
    pid = info.get("pid") if isinstance(info, dict) else None
    # pid 0 or negative would make os.kill signal a whole process group.
    if not isinstance(url, str) or isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise DaemonError(
            f"{api_file}: expected {{'url': str, 'pid': int > 0, ...}} "
            "(delete it if no daemon runs)"
        )
    if not _pid_alive(pid):
        return None
    try:
        token: str | None = files.api_token.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        token = None
    probe = DaemonClient(url, token, HEALTH_TIMEOUT)  # a malformed URL raises here
    try:
        health = probe.call("health")
    except Error:
        return None
    if not isinstance(health, dict) or health.get("ok") is not True:
        return None
    return DaemonClient(url, token or None, timeout)
