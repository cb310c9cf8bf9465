"""The IPFS backend interface the storage layer talks to, and CID / multiaddr syntax checks.

The layers above (fragment placement, manifests, repair) only ever see `IpfsBackend`, so an
embedded Kubo (`storage.kubo.KuboNode`), a remote Kubo over its RPC API, or an in-memory fake
for unit tests can be swapped without touching them.

Contract shared by every implementation:

- All methods are synchronous and thread-safe: the daemon calls them from a thread pool
  (through `fusenode.node.aio.Bridge`), several at once.
- Every call that can wait on the network takes a ``timeout`` in seconds and raises
  `BackendTimeout` when it is missed; the backend stays usable afterwards.
- Arguments are checked before anything reaches the node: a malformed CID or multiaddr raises
  `InvalidArgument`, never a backend error.
- CIDs are compared as strings. The embedded Kubo always produces CIDv0 (``Qm...``); a CIDv1 of
  the same content is a different string.
- The CID of a file is the one Kubo's ``add`` with its default options gives it (256 KiB
  chunks, balanced dag-pb, CIDv0): readers recompute it from the bytes they get
  (`storage.unixfs`), so a backend that built files another way (raw leaves, another chunker)
  would have every read refused as corrupted. A remote Kubo backend passes those defaults.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from fusenode.storage.errors import InvalidArgument
from fusenode.storage.multiformats import parse_cid

__all__ = [
    "IpfsBackend",
    "NodeIdentity",
    "validate_cid",
    "validate_peer_multiaddr",
]


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Who a node is and where peers can dial it.

    ``addresses`` are complete, dialable multiaddrs WITH the ``/p2p/<peer_id>`` suffix
    (``/ip4/127.0.0.1/tcp/4001/p2p/Qm...``), because the only thing anyone does with them is
    hand them to another node's `IpfsBackend.connect`, which needs the suffix to authenticate
    the peer it reaches.
    """

    peer_id: str
    addresses: tuple[str, ...]


class IpfsBackend(abc.ABC):
    """What the storage layer needs from an IPFS node.

    An ABC rather than a Protocol so that the context-manager support and the convenience
    methods (`has_pin`) are written once; fakes for unit tests subclass it too.
    """

    @abc.abstractmethod
    def add(self, path: Path) -> str:
        """Store and pin a regular file; return its CID.

        Adding the same content twice is harmless and returns the same CID.
        """

    @abc.abstractmethod
    def add_bytes(self, data: bytes) -> str:
        """Store and pin ``data``; return its CID. Meant for small objects (manifests)."""

    @abc.abstractmethod
    def hash_only(self, path: Path) -> str:
        """Return the CID `add` would give ``path`` without storing or pinning anything.

        The storage layer uses it to re-verify content read from the local blockstore: Kubo's
        Download does not re-hash blocks it already holds, so a corrupted block comes back
        silently unless the caller checks.
        """

    @abc.abstractmethod
    def pin(self, cid: str, timeout: float) -> None:
        """Fetch ``cid`` recursively (from connected peers if need be) and pin it."""

    @abc.abstractmethod
    def unpin(self, cid: str) -> None:
        """Remove the pin on ``cid``; unpinning something not pinned is not an error.

        Implementations may keep the blocks (Kubo has no GC here), so this frees no space.
        """

    @abc.abstractmethod
    def pins(self) -> set[str]:
        """Return every pinned CID.

        With the embedded Kubo this includes indirect pins (every chunk of every pinned file),
        so the set grows with stored bytes / 256 KiB: keep your own record of what you pinned.
        """

    def has_pin(self, cid: str) -> bool:
        """Whether ``cid`` is pinned (directly, recursively or as part of another pin)."""
        return validate_cid(cid) in self.pins()

    def read_block(self, cid: str) -> bytes | None:
        """The raw bytes of block ``cid`` if this node's own blockstore has it, else None;
        never asks the network. What audits are answered with (a holder proves it still has
        a fragment's blocks on its disk), so a backend that cannot tell cannot hold for peers.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot read single blocks")

    @abc.abstractmethod
    def fetch(self, cid: str, dest: Path, timeout: float) -> None:
        """Write the file ``cid`` to ``dest`` atomically.

        The content appears at ``dest`` complete (written to a temporary file beside it and
        renamed) or not at all: on any failure nothing is left at ``dest`` or beside it.
        """

    @abc.abstractmethod
    def fetch_bytes(self, cid: str, timeout: float) -> bytes:
        """Return the content of the file ``cid``. Meant for small objects (manifests)."""

    @abc.abstractmethod
    def connect(self, multiaddr: str, timeout: float) -> None:
        """Connect to the peer at ``multiaddr`` (which must end in ``/p2p/<peer id>``)."""

    @abc.abstractmethod
    def peers(self) -> list[str]:
        """Return the peer IDs of the currently connected peers."""

    @abc.abstractmethod
    def identity(self) -> NodeIdentity:
        """Return this node's peer ID and dialable addresses."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the node; further calls raise `BackendError`. Safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- syntax checks


def validate_cid(cid: str) -> str:
    """Return ``cid`` unchanged if it is a syntactically valid CID, else raise InvalidArgument.

    Accepts CIDv0 (``Qm`` + 44 base58btc characters, a sha2-256 multihash) and CIDv1 in
    multibase base32 (``b...``, lowercase), the two forms Kubo prints. Checked before any
    call reaches the node so a typo gives a clear error instead of an opaque backend code.
    """
    if not isinstance(cid, str):
        raise InvalidArgument(f"CID must be a string, not {type(cid).__name__}")
    try:
        parse_cid(cid)
    except ValueError as exc:
        shown = cid if len(cid) <= 60 else cid[:57] + "..."
        raise InvalidArgument(f"malformed CID {shown!r}: {exc}") from None
    return cid


def validate_peer_multiaddr(multiaddr: str) -> str:
    """Return ``multiaddr`` if it looks like a dialable peer address, else raise InvalidArgument.

    Only the shape is checked (``/proto/value/.../p2p/<peer id>``); the node parses the rest.
    """
    if not isinstance(multiaddr, str):
        raise InvalidArgument(f"multiaddr must be a string, not {type(multiaddr).__name__}")
    parts = multiaddr.split("/")
    if (
        len(multiaddr) > 1000
        or not multiaddr.startswith("/")
        or len(parts) < 5
        or parts[-2] != "p2p"
        or not parts[-1]
        or any(not p for p in parts[1:])
        or any(c.isspace() for c in multiaddr)
    ):
        raise InvalidArgument(
            f"malformed peer multiaddr {multiaddr[:100]!r}: expected "
            "/ip4/<host>/tcp/<port>/p2p/<peer id>"
        )
    return multiaddr
