"""`KuboNode`: block storage on an embedded Kubo node, behind the `IpfsBackend` interface.

Facts it is built around (design/libkubo.md, plus what this package found itself):

- ListPins lists indirect pins too (every 256 KiB chunk of every pinned file), and
  ConnectToPeer succeeds for a peer ID already connected whatever address it is given.
- Download/PinCID of a CID nobody has block forever: a missed deadline restarts the node's
  process (`fusenode.storage.kubo.process`).
- As with any "spawn" child, a script that creates a `KuboNode` at import time must guard it
  with ``if __name__ == "__main__":`` (the child re-imports the main module).

Stream mounting and PubSub are not block storage: they are `KuboNode.transport`, a
`fusenode.storage.kubo.transport.KuboTransport` on the same process.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

from fusenode import defaults
from fusenode.storage.backend import (
    IpfsBackend,
    NodeIdentity,
    validate_cid,
    validate_peer_multiaddr,
)
from fusenode.storage.errors import (
    BackendError,
    BackendTimeout,
    IntegrityError,
    InvalidArgument,
)
from fusenode.storage.kubo import gc
from fusenode.storage.kubo.process import ChildGone, KuboProcess, _Child
from fusenode.storage.kubo.transport import KuboTransport
from fusenode.storage.multiformats import encode_multihash, parse_cid
from fusenode.storage.swarm import SwarmSettings
from fusenode.storage.unixfs import MAX_BLOCK_SIZE
from fusenode.system import removed_on_error

__all__ = ["KuboNode", "flatfs_path"]

_RECONNECT_WAIT_S: Final = 3.0
#: Calls that write blocks, which a garbage collection waits for (at most this long).
_WRITES: Final = frozenset({"add", "pin", "download"})
_GC_DRAIN_S: Final = 30.0
# Slowest add rate we still call healthy (shared CPUs, slow disks): sets add's default deadline.
_SLOW_ADD_BYTES_PER_S: Final = 4 * 1024 * 1024


def flatfs_path(kubo_dir: Path, cid: str) -> Path:
    """Where Kubo's flatfs store under ``kubo_dir`` keeps the block ``cid`` names: block ``K``
    (the base32 of its multihash, upper case, no padding) is ``blocks/<K[-3:-1]>/K.data``
    (shard function next-to-last/2, written in ``blocks/SHARDING`` at repo creation)."""
    mh = parse_cid(validate_cid(cid)).multihash
    key = base64.b32encode(encode_multihash(mh.code, mh.digest)).decode().rstrip("=")
    return Path(kubo_dir) / "blocks" / key[-3:-1] / f"{key}.data"


class KuboNode(IpfsBackend):
    """An embedded Kubo node running in its own child process.

    ``swarm``: where the node listens and whom it may dial (`SwarmSettings`: by default
    127.0.0.1 only), re-applied to the repo's config at every start. ``swarm_port`` (or
    ``swarm.port``): the TCP port; ``None`` keeps the port of an existing repo, or picks a
    free one when creating the repo (stored in its config, so it stays the same across
    restarts). Port 0 is refused: the node's multiaddr must be known and stable.

    ``loopback_only=False`` (without ``swarm``): leave an existing repo's config as its owner
    wrote it; ``swarm_port`` then only matters when creating the repo (created loopback-only).

    ``netns``: run the node in that network namespace (``ip netns``), for tests and
    benchmarks of nodes on several hosts; the process that creates the KuboNode stays where
    it is.

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
        swarm: SwarmSettings | None = None,
        loopback_only: bool = True,
        call_timeout: float = defaults.KUBO_CALL_TIMEOUT,
        start_timeout: float = defaults.KUBO_START_TIMEOUT,
        netns: str | None = None,
    ) -> None:
        self._explicit_peers: dict[str, None] = {}  # ordered set
        if swarm is None and loopback_only:
            swarm = SwarmSettings()
        if swarm_port is None and swarm is not None:
            swarm_port = swarm.port
        self._process = KuboProcess(
            repo_dir,
            swarm_port,
            swarm=swarm,
            call_timeout=call_timeout,
            start_timeout=start_timeout,
            netns=netns,
        )
        # Redial first, then re-create stream mounts: a forward to a peer needs the peer.
        self._process.on_restart(self._redial)
        self.transport = KuboTransport(self._process)

    # -- introspection ---------------------------------------------------------------------

    @property
    def repo_dir(self) -> Path:
        """The folder holding ``kubo/`` (Kubo's repo), ``kubo.log`` and ``tmp/``."""
        return self._process.layout.root

    @property
    def log_path(self) -> Path:
        """Kubo's log file, where the details of failed calls end up."""
        return self._process.layout.kubo_log

    @property
    def pid(self) -> int | None:
        """PID of the process hosting the node now (changes after a restart)."""
        return self._process.pid

    def is_running(self) -> bool:
        """Whether the node's process is alive (and not being replaced)."""
        return self._process.is_running()

    def on_restart(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` each time the node's process is restarted after a crash or a
        missed deadline, once the new one is up: for counting restarts. The planned restart
        that ends a gc (`maintain`) is not one of them."""
        self._process.on_restart(lambda _child: hook(), maintenance=False)

    def _redial(self, child: _Child) -> None:
        """Reconnect to the peers `connect` was asked for, without letting a dead one stall
        the restart (each ConnectToPeer may take 15 s; we wait at most a few seconds)."""
        futures = []
        for addr in list(self._explicit_peers):
            with contextlib.suppress(ChildGone):
                futures.append(child.submit("connect", (addr,)))
        deadline = time.monotonic() + _RECONNECT_WAIT_S
        for fut in futures:
            with contextlib.suppress(Exception):
                fut.result(timeout=max(0.0, deadline - time.monotonic()))

    def _block_path(self, cid: str) -> Path:
        return flatfs_path(self._process.layout.kubo, cid)

    def has_block(self, cid: str) -> bool:
        """Whether the root block of ``cid`` is in this node's blockstore, read from disk: a
        file check, no call into Kubo."""
        return self._block_path(cid).exists()

    def read_block(self, cid: str) -> bytes | None:
        """The block's bytes from this node's disk (flatfs), or None; the network is never
        asked. Kubo writes each block file whole and renames it into place, so a read never
        sees half a block. Not re-hashed here: the caller checks the bytes against the CID
        (an audit's challenger does; a holder's disk may be corrupt)."""
        path = self._block_path(cid)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BLOCK_SIZE + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if len(data) > MAX_BLOCK_SIZE:
            raise IntegrityError(f"block {cid} on disk is over {MAX_BLOCK_SIZE} bytes")
        return data

    def _nobody_has(self, cid: str) -> str:
        """Why a fetch or pin of ``cid`` would wait for its whole deadline in vain ("" when
        it may succeed): not stored here, and no peer connected to ask. Kubo would block
        until the deadline and then the node would be restarted (design/libkubo.md);
        answering at once spares both."""
        if self.has_block(cid) or self.peers():
            return ""
        return "not stored on this node, and no peer is connected to provide it"

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

    def _add_timeout(self, path: Path) -> float:
        return self._process.call_timeout + path.stat().st_size / _SLOW_ADD_BYTES_PER_S

    def add(self, path: Path, *, timeout: float | None = None) -> str:
        """Store and pin a file (CIDv0, 256 KiB chunks, dag-pb: Kubo's fixed defaults)."""
        path = self._regular_file(path)
        t = timeout if timeout is not None else self._add_timeout(path)
        return str(self._process.call("add", (str(path), False), t, f"adding {path}"))

    def add_bytes(self, data: bytes, *, timeout: float | None = None) -> str:
        """Store and pin ``data`` (through a scratch file: the C API only adds files)."""
        with self._scratch(".add") as tmp:
            tmp.write_bytes(data)
            return self.add(tmp, timeout=timeout)

    def hash_only(self, path: Path, *, timeout: float | None = None) -> str:
        """The CID `add` would return for ``path``; nothing is stored or pinned."""
        path = self._regular_file(path)
        t = timeout if timeout is not None else self._add_timeout(path)
        return str(self._process.call("add", (str(path), True), t, f"hashing {path}"))

    def pin(self, cid: str, timeout: float) -> None:
        """Fetch ``cid`` recursively from connected peers (if not local) and pin it."""
        validate_cid(cid)
        if why := self._nobody_has(cid):
            raise BackendTimeout(f"cannot pin {cid}: {why}")
        self._process.call("pin", (cid,), timeout, f"pinning {cid}", on_timeout=self._no_provider)

    def unpin(self, cid: str, *, timeout: float | None = None) -> None:
        """Unpin ``cid``; a CID that is not pinned is fine. The blocks stay (no GC in libkubo)."""
        validate_cid(cid)
        self._process.call("unpin", (cid,), timeout, f"unpinning {cid}")

    def pins(self, *, timeout: float | None = None) -> set[str]:
        """All pinned CIDs, including indirect ones (every chunk of every pinned file)."""
        return set(self._process.call("pins", (), timeout, "listing pins"))

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
        with removed_on_error(tmp):
            self._download(cid, tmp, timeout)
            if durable:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, dest)

    def fetch_bytes(self, cid: str, timeout: float) -> bytes:
        """The content of ``cid`` as bytes; for small objects such as manifests."""
        validate_cid(cid)
        with self._scratch(".fetch") as tmp:
            self._download(cid, tmp, timeout)
            return tmp.read_bytes()

    def _download(self, cid: str, path: Path, timeout: float) -> None:
        if why := self._nobody_has(cid):
            raise BackendTimeout(f"cannot fetch {cid}: {why}")
        self._process.call(
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
        self._process.call(
            "connect", (multiaddr,), timeout, f"connecting to {multiaddr}", may_hang=False
        )
        self._explicit_peers[multiaddr] = None

    def peers(self, *, timeout: float | None = None) -> list[str]:
        """Peer IDs of the connected peers (an internal error also reads as "no peers")."""
        return list(self._process.call("peers", (), timeout, "listing peers"))

    def collect_garbage(self, roots: Iterable[str] = (), *, drain: float = _GC_DRAIN_S) -> gc.Sweep:
        """Delete every block not reachable from a pin (or from ``roots``) from this node's
        blockstore (`fusenode.storage.kubo.gc`), with the node's process stopped around the
        deletion: calls that write blocks (add, pin, fetch) in flight get ``drain`` seconds
        to finish (`BackendTimeout` if not), new calls wait, the pins are listed on the quiet
        node, the process stops, the sweep runs, and a new process starts (peers redialled,
        stream mounts re-created, as after a restart)."""
        extra = {validate_cid(c) for c in roots}

        def pins(child: _Child) -> set[str]:
            timeout = self._process.call_timeout
            try:
                listed = child.submit("pins", ()).result(timeout=timeout)
            except TimeoutError:
                raise BackendTimeout(f"listing the pins took over {timeout:.0f} s") from None
            except ChildGone:
                raise BackendError("the Kubo node exited while its pins were listed") from None
            return {*listed, *extra}

        kubo_dir = self._process.layout.kubo
        return self._process.maintain(
            pins, lambda live: gc.sweep(kubo_dir, live), drain=drain, writes=_WRITES
        )

    def disk_usage(self, roots: Iterable[str]) -> gc.Usage:
        """Bytes of the blockstore, and of the blocks reachable from ``roots`` (read from
        disk, no call into Kubo)."""
        return gc.usage(self._process.layout.kubo, roots)

    def identity(self) -> NodeIdentity:
        """Peer ID and ``/ip4/127.0.0.1/tcp/PORT/p2p/<id>`` addresses (fixed per repo)."""
        return self._process.identity()

    def close(self) -> None:
        """Stop the node cleanly (CleanupNode, SIGKILL after 2 s) and release everything."""
        self._process.close()

    @contextlib.contextmanager
    def _scratch(self, suffix: str) -> Iterator[Path]:
        path = self._process.layout.tmp / f"{secrets.token_hex(8)}{suffix}"
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
