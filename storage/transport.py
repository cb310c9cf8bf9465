"""The libp2p transport the node layer talks over, apart from block storage.

Two services of a libp2p node that fusenode's daemons use to reach each other (node/protocol):

- stream mounting (like ``ipfs p2p``): `Libp2pTransport.p2p_listen` connects streams that
  peers open for a protocol to a local TCP service; `Libp2pTransport.p2p_forward` carries
  local TCP connections to a peer's listener. The remote peer is authenticated by libp2p, but
  the local service only sees a TCP connection from the node: it cannot tell which peer it
  is, so requests must carry their own proof (fusenode.node.peerauth).
- PubSub: best-effort broadcast of small messages, signed by the publishing peer.

The embedded Kubo implements it (`fusenode.storage.kubo.transport.KuboTransport`); unit tests
of the layers above use in-memory fakes. Like `IpfsBackend`, every method is synchronous and
thread-safe and raises `InvalidArgument` for malformed arguments before anything reaches
the node.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_PUBSUB_MESSAGE", "Libp2pTransport", "P2PForward", "P2PListener", "PubSubMessage"]

#: Kubo's PubSub drops larger messages silently; implementations refuse them instead.
MAX_PUBSUB_MESSAGE: Final = 1024 * 1024


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


class Libp2pTransport(abc.ABC):
    """Stream mounting and PubSub of one libp2p node: what the node layer uses of them.
    (An implementation may offer more, such as closing and listing mounts.)"""

    @abc.abstractmethod
    def p2p_listen(
        self, protocol: str, target: str, *, timeout: float | None = None
    ) -> P2PListener:
        """Serve ``protocol`` to peers by connecting their streams to local TCP ``target``."""

    @abc.abstractmethod
    def p2p_forward(
        self, protocol: str, listen: str, peer_id: str, *, timeout: float | None = None
    ) -> P2PForward:
        """Carry TCP connections to local ``listen`` (port 0: pick one) to ``peer_id``."""

    @abc.abstractmethod
    def pubsub_subscribe(self, topic: str, *, timeout: float | None = None) -> int:
        """Subscribe to ``topic``; the id for `pubsub_next_message`."""

    @abc.abstractmethod
    def pubsub_publish(self, topic: str, data: bytes, *, timeout: float | None = None) -> None:
        """Publish ``data`` (at most `MAX_PUBSUB_MESSAGE` bytes), best effort."""

    @abc.abstractmethod
    def pubsub_next_message(self, sub_id: int, timeout: float) -> PubSubMessage | None:
        """The next message of a subscription, or None if none came within ``timeout``."""

    @abc.abstractmethod
    def pubsub_unsubscribe(self, sub_id: int, *, timeout: float | None = None) -> None:
        """End a subscription (an unknown id is fine)."""
