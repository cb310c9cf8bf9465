"""What a node counts about itself, for ``GET /metrics`` (Prometheus text format), the node
summary (``fusenode status``) and the dashboard.

One `Metrics` per node, with its own `prometheus_client.CollectorRegistry` (never the global
one: two nodes in one process, as in the tests, must not share counts):

- events, counted as they happen: puts, gets, repair passes, audit passes and gc runs, each
  with a latency histogram (``fusenode_operation_seconds{operation}``: its ``_count`` is the
  number of runs) and an error counter; gc also counts the bytes it freed; Kubo restarts;
- levels, read from the state database and the disk when scraped (`Metrics.update` sets them
  from a `fusenode.node.observe` snapshot): fragments and bytes held per peer, blockstore and
  pinned bytes, capacity, free disk, peers, models and degraded segments, jobs by state.

The last repair, audit and gc runs are kept (time, seconds, summary or error) for the
summary and the dashboard. gc itself lives elsewhere: it reports each run with `record_gc`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

__all__ = ["CONTENT_TYPE", "OPERATIONS", "Metrics"]

#: The classic text format (0.0.4) every Prometheus reads; every name here is a legacy one.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: The operations timed and counted (label ``operation``).
OPERATIONS = ("put", "get", "repair", "audit", "gc")
#: Latency buckets in seconds: a health-checked repair pass of nothing (ms) to a large put.
_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = time.time()
        #: The last run of each background pass: {"time", "seconds", "summary" | "error"}.
        self.last: dict[str, dict[str, Any] | None] = {"repair": None, "audit": None, "gc": None}
        r = self.registry
        self.seconds = Histogram(
            "fusenode_operation_seconds",
            "How long puts, gets, repair and audit passes and gc runs took (_count: runs)",
            ["operation"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "fusenode_operation_errors",
            "Operations that failed",
            ["operation"],
            registry=r,
        )
        for op in OPERATIONS:  # every series exists from the start, at 0
            self.seconds.labels(op)
            self.errors.labels(op)
        self.gc_freed = Counter(
            "fusenode_gc_freed_bytes", "Bytes of blocks gc removed from the blockstore", registry=r
        )
        self.repaired = Counter(
            "fusenode_repaired_fragments", "Fragments repair rebuilt on another holder", registry=r
        )
        self.audited = Counter(
            "fusenode_audits", "Fragment audits by result", ["result"], registry=r
        )
        for result in ("passed", "failed", "unanswered"):
            self.audited.labels(result)
        self.kubo_restarts = Counter(
            "fusenode_kubo_restarts", "Restarts of the embedded Kubo node's process", registry=r
        )
        Gauge("fusenode_start_time_seconds", "When this node started (Unix time)", registry=r).set(
            self.started
        )

        def gauge(name: str, text: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, text, list(labels), registry=r)

        self.held_fragments = gauge(
            "fusenode_held_fragments",
            "CIDs held for each peer (its fragments and the manifests listing them)",
            ("peer",),
        )
        self.held_bytes = gauge(
            "fusenode_held_bytes", "Bytes held for each peer (accounted to its quota)", ("peer",)
        )
        self.blockstore_bytes = gauge(
            "fusenode_blockstore_bytes", "Bytes of block files in the Kubo repo's blockstore"
        )
        self.pinned_bytes = gauge(
            "fusenode_pinned_bytes", "Bytes of what this node's pins keep (what gc must keep)"
        )
        self.capacity_bytes = gauge(
            "fusenode_capacity_bytes", "Bytes this node offers peers ([storage] capacity)"
        )
        self.disk_free_bytes = gauge("fusenode_disk_free_bytes", "Free bytes on the repo's disk")
        self.peers = gauge(
            "fusenode_peers",
            "Peers: known (ever seen), live (their daemon answered lately), connected (Kubo swarm)",
            ("state",),
        )
        self.models = gauge("fusenode_models", "Models this node placed, by health", ("health",))
        self.degraded_segments = gauge(
            "fusenode_degraded_segments",
            "Segments of this node's models with fewer than n fragments counted",
        )
        self.jobs = gauge("fusenode_jobs", "Optimization jobs by state", ("state",))

    # -- events ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self, operation: str) -> Iterator[None]:
        """Time one ``operation``; count it as an error when it raises."""
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.errors.labels(operation).inc()
            raise
        finally:
            self.seconds.labels(operation).observe(time.perf_counter() - start)

    def instrument(
        self, operation: str, run: Callable[..., Awaitable[dict[str, Any]]]
    ) -> Callable[..., Awaitable[dict[str, Any]]]:
        """``run`` (a repair or audit pass) timed, counted and its last summary kept."""

        async def wrapped(*args: Any, **kwargs: Any) -> dict[str, Any]:
            start = time.perf_counter()
            try:
                with self.timed(operation):
                    summary = await run(*args, **kwargs)
            except Exception as e:
                self._keep(operation, start, error=f"{type(e).__name__}: {e}")
                raise
            self._keep(operation, start, summary=summary)
            if operation == "repair":
                self.repaired.inc(len(summary.get("repaired") or ()))
            elif operation == "audit":
                for result in ("passed", "failed", "unanswered"):
                    self.audited.labels(result).inc(_count(summary.get(result)))
            return summary

        return wrapped

    def record_gc(
        self, seconds: float, freed_bytes: int, *, error: str | None = None, **summary: Any
    ) -> None:
        """One gc run (called by gc): its duration, the bytes it freed, and why it failed."""
        self.seconds.labels("gc").observe(seconds)
        if error is not None:
            self.errors.labels("gc").inc()
        self.gc_freed.inc(max(0, freed_bytes))
        entry: dict[str, Any] = {"time": _stamp(), "seconds": round(seconds, 3)}
        if error is not None:
            entry["error"] = error
        else:
            entry["summary"] = {"freed_bytes": freed_bytes, **summary}
        self.last["gc"] = entry

    def kubo_restarted(self, *_: Any) -> None:
        self.kubo_restarts.inc()

    def _keep(self, operation: str, start: float, **outcome: Any) -> None:
        seconds = round(time.perf_counter() - start, 3)
        self.last[operation] = {"time": _stamp(), "seconds": seconds, **outcome}

    def runs(self, operation: str) -> tuple[int, int]:
        """(runs, errors) of ``operation`` so far."""
        count = errors = 0
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.labels.get("operation") != operation:
                    continue
                if s.name == "fusenode_operation_seconds_count":
                    count = int(s.value)
                elif s.name == "fusenode_operation_errors_total":
                    errors = int(s.value)
        return count, errors

    # -- levels ------------------------------------------------------------------------------
    def update(self, snapshot: dict[str, Any]) -> None:
        """Set the levels from a node snapshot (`fusenode.node.observe.snapshot`)."""
        self.held_fragments.clear()
        self.held_bytes.clear()
        for row in snapshot["held"]:
            self.held_fragments.labels(row["peer"]).set(row["fragments"])
            self.held_bytes.labels(row["peer"]).set(row["bytes"])
        storage = snapshot["storage"]
        self.blockstore_bytes.set(storage["blockstore_bytes"])
        self.pinned_bytes.set(storage["pinned_bytes"])
        self.capacity_bytes.set(storage["capacity_bytes"])
        self.disk_free_bytes.set(storage["disk_free_bytes"])
        for key in ("known", "live", "connected"):
            self.peers.labels(key).set(snapshot["peers"][key])
        models = snapshot["models"]
        for health in ("healthy", "degraded", "unavailable"):
            self.models.labels(health).set(models[health])
        self.degraded_segments.set(models["degraded_segments"])
        for state, count in snapshot["jobs"].items():
            self.jobs.labels(state).set(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _count(value: Any) -> int:
    """A summary's count: an int, or a list whose length is the count."""
    if isinstance(value, int):
        return value
    if isinstance(value, list | tuple | set | dict):
        return len(value)
    return 0
