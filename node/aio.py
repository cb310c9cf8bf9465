"""The one place where the daemon's event loop and worker threads meet.

The storage layer is synchronous (the embedded Kubo's calls block; put/get pipelines run their
own threads); the daemon is asyncio. Every hop between the two goes through a `Bridge`:

- loop -> thread: ``await bridge.run(fn, *args)`` runs a blocking call on the bridge's own
  thread pool. Its own, not asyncio's default one: that one has min(32, cores + 4) threads
  (6 on two cores), and a few fragment pins waiting minutes on peers would starve every other
  blocking call of the daemon.
- thread -> loop: ``bridge.wait_for(coro)`` runs a coroutine on the loop from a worker thread
  and blocks that thread for its result (put's fragment sink, which places fragments on
  peers over the async peer client).

`AsyncBlocks` and `AsyncTransport` are the storage interfaces seen from the loop: the same
methods as `IpfsBackend` and `Libp2pTransport`, awaitable. Node code holds those, never a
bare backend, and never calls ``asyncio.to_thread`` itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

from fusenode.storage.backend import IpfsBackend, NodeIdentity
from fusenode.storage.transport import Libp2pTransport, P2PForward, P2PListener, PubSubMessage

__all__ = ["AsyncBlocks", "AsyncTransport", "Bridge", "every"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: Blocking calls in flight at once: fragment pins and stores of a put (1.5 segments' worth),
#: fetches of a get, health checks, plus headroom. Threads that wait cost only memory.
MAX_WORKERS = 64


class Bridge:
    """Runs blocking calls off the loop, and coroutines from worker threads on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="fusenode")

    async def run(self, fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
        """Run the blocking ``fn(*args, **kwargs)`` on a worker thread; await its result."""
        return await self.loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def wait_for(self, coro: Awaitable[_R]) -> _R:
        """From a worker thread: run ``coro`` on the loop and block until it is done."""
        return asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self.loop).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _as_coroutine(awaitable: Awaitable[_R]) -> _R:
    return await awaitable


class AsyncBlocks:
    """An `IpfsBackend` seen from the event loop. ``sync`` is the backend itself, for code
    that already runs on a worker thread (the put and get pipelines)."""

    def __init__(self, blocks: IpfsBackend, bridge: Bridge) -> None:
        self.sync = blocks
        self.bridge = bridge

    def identity(self) -> NodeIdentity:
        return self.sync.identity()

    async def add(self, path: Path) -> str:
        return await self.bridge.run(self.sync.add, path)

    async def add_bytes(self, data: bytes) -> str:
        return await self.bridge.run(self.sync.add_bytes, data)

    async def unpin(self, cid: str) -> None:
        await self.bridge.run(self.sync.unpin, cid)

    async def read_block(self, cid: str) -> bytes | None:
        return await self.bridge.run(self.sync.read_block, cid)

    async def connect(self, multiaddr: str, timeout: float) -> None:
        await self.bridge.run(self.sync.connect, multiaddr, timeout)

    async def peers(self) -> list[str]:
        return await self.bridge.run(self.sync.peers)


class AsyncTransport:
    """A `Libp2pTransport` seen from the event loop."""

    def __init__(self, transport: Libp2pTransport, bridge: Bridge) -> None:
        self.sync = transport
        self.bridge = bridge

    async def p2p_listen(self, protocol: str, target: str) -> P2PListener:
        return await self.bridge.run(self.sync.p2p_listen, protocol, target)

    async def p2p_forward(self, protocol: str, listen: str, peer_id: str) -> P2PForward:
        return await self.bridge.run(self.sync.p2p_forward, protocol, listen, peer_id)

    async def pubsub_subscribe(self, topic: str) -> int:
        return await self.bridge.run(self.sync.pubsub_subscribe, topic)

    async def pubsub_publish(self, topic: str, data: bytes) -> None:
        await self.bridge.run(self.sync.pubsub_publish, topic, data)

    async def pubsub_next_message(self, sub_id: int, timeout: float) -> PubSubMessage | None:
        return await self.bridge.run(self.sync.pubsub_next_message, sub_id, timeout)

    async def pubsub_unsubscribe(self, sub_id: int) -> None:
        await self.bridge.run(self.sync.pubsub_unsubscribe, sub_id)


async def every(
    interval: float,
    stop: asyncio.Event,
    task: Callable[[], Awaitable[dict]],
    worth_logging: Callable[[dict], bool],
    name: str,
) -> None:
    """Run ``task`` every ``interval`` seconds until ``stop``; log its summary when
    ``worth_logging`` says so, and its failure without stopping (repair and audit passes)."""
    log = logging.getLogger(f"fusenode.node.{name}")
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
            return
        except TimeoutError:
            pass
        try:
            summary = await task()
            if worth_logging(summary):
                log.info("%s pass: %s", name, summary)
        except Exception:
            log.exception("%s pass failed", name)
