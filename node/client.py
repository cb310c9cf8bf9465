"""The CLI's side of the daemon API: a small synchronous client, and finding the daemon.

The CLI is synchronous and should start fast, so this uses the stdlib ``urllib.request``
instead of aiohttp: no event loop, nothing heavy to import.

Files the daemon writes in its repo once it serves (and removes when it stops)::

    REPO/api.token   the bearer token for write requests: one line of ASCII, mode 0600,
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

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusenode.node.errors import DaemonError

__all__ = ["API_FILE", "HEALTH_TIMEOUT", "TOKEN_FILE", "DaemonClient", "find_daemon"]

API_FILE = "api.json"
TOKEN_FILE = "api.token"
HEALTH_TIMEOUT = 2.0
_PREFIX = "/api/v1"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The daemon never redirects; following one would send the token elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No ProxyHandler settings from the environment: an http_proxy variable must not route a
# loopback request (and its token) through a proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


class DaemonClient:
    """Calls a local daemon's API; methods mirror ``node.api.NodeService``.

    ``timeout`` (seconds) bounds each wait on the socket for the quick calls. ``put`` and
    ``get`` move whole files and answer only when done, so they take their own ``timeout``,
    by default none (the user can interrupt).
    """

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

    # -- API --------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def identity(self) -> dict[str, Any]:
        return self._call("GET", "/id")

    def peers(self) -> list[dict[str, Any]]:
        return self._call("GET", "/peers")

    def status(self, cid: str) -> dict[str, Any]:
        return self._call("GET", "/status/" + urllib.parse.quote(cid, safe=""))

    def put(
        self,
        path: str | os.PathLike[str],
        *,
        k: int | None = None,
        n: int | None = None,
        recipients: Sequence[str] = (),
        public: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Store the file at ``path``, made absolute here: the daemon's cwd is not ours."""
        body = {
            "path": os.path.abspath(path),
            "k": k,
            "n": n,
            "recipients": list(recipients),
            "public": public,
        }
        return self._call("POST", "/put", body, timeout=timeout)

    def get(
        self,
        cid: str,
        output: str | os.PathLike[str],
        *,
        identity_path: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Fetch ``cid`` into ``output`` (paths made absolute here, as for :meth:`put`)."""
        body = {
            "cid": cid,
            "output": os.path.abspath(output),
            "identity_path": None if identity_path is None else os.path.abspath(identity_path),
        }
        return self._call("POST", "/get", body, timeout=timeout)

    def repair(self) -> dict[str, Any]:
        return self._call("POST", "/repair", {})

    def optimize(self, cid: str, recipients: Sequence[str] = ()) -> dict[str, Any]:
        return self._call("POST", "/optimize", {"cid": cid, "recipients": list(recipients)})

    def jobs(self) -> list[dict[str, Any]]:
        return self._call("GET", "/jobs")

    def job(self, job_id: int) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{int(job_id)}")

    def share(
        self, cid: str, recipients: Sequence[str], identity_path: str | None = None
    ) -> dict[str, Any]:
        body = {"cid": cid, "recipients": list(recipients), "identity_path": identity_path}
        return self._call("POST", "/share", body)

    def info(self, cid: str, identity_path: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/info", {"cid": cid, "identity_path": identity_path})

    # -- transport --------------------------------------------------------------------------

    _DEFAULT = object()

    def _call(
        self, method: str, route: str, body: dict[str, Any] | None = None, timeout: Any = _DEFAULT
    ) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if method != "GET" and self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.base_url + _PREFIX + route, data=data, headers=headers, method=method
        )
        wait = self.timeout if timeout is self._DEFAULT else timeout
        where = f"daemon at {self.base_url}"
        try:
            with _OPENER.open(request, timeout=wait) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            with e:
                raise DaemonError(_error_message(e, where)) from None
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


def _error_message(e: urllib.error.HTTPError, where: str) -> str:
    """The daemon's message from its JSON error body, or the status when there is none."""
    try:
        message = json.loads(e.read())["error"]["message"]
        if isinstance(message, str) and message:
            return message
    except (OSError, http.client.HTTPException, ValueError, TypeError, KeyError):
        pass
    return f"{where} answered HTTP {e.code} {e.reason}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def find_daemon(repo_path: Path, timeout: float = 60.0) -> DaemonClient | None:
    """A client for the daemon serving ``repo_path``, or ``None`` when none is running.

    ``None`` when REPO/api.json is missing, its pid is not alive, or the URL does not answer
    ``GET /api/v1/health`` within 2 s (a stale file from a crash). A present but malformed
    api.json raises DaemonError (the daemon writes it atomically, so it is damage, not a
    race). A missing or unreadable api.token gives a client without a token: reads work and
    writes fail with the daemon's 401 message. ``timeout`` is the returned client's.
    """
    api_file = Path(repo_path) / API_FILE
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
        token: str | None = (Path(repo_path) / TOKEN_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        token = None
    probe = DaemonClient(url, token, HEALTH_TIMEOUT)  # a malformed URL raises here
    try:
        health = probe.health()
    except DaemonError:
        return None
    if not isinstance(health, dict) or health.get("ok") is not True:
        return None
    return DaemonClient(url, token or None, timeout)
