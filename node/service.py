"""The node's use cases: put, get, status, share, info, optimize, rm, gc (and identity, peers,
jobs, repair). The daemon's HTTP API and the CLI without a daemon call these same methods, so each
default and each policy is decided here once:

- k and n: the request's, else ``[storage] k/n`` of the repo's config;
- recipients: the request's, else the node's own identity (unless the model is public);
- identities: the file the request names, else the node's own identity;
- placement: the allocator's (`fusenode.node.allocator`), over the network the node has
  (`fusenode.node.network`: peers with a daemon, alone without).

Put: the manifest is written only after every fragment is confirmed by its holder, then
pinned on the holders: a put interrupted before that leaves no manifest claiming anything.
Get: live holders are asked which fragments they hold first, so fragments come from live
holders; a fragment no live node claims is tried last, with a short deadline (a fetch of a
block nobody has never ends by itself in Kubo).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusenode import __version__, defaults
from fusenode.node import observe
from fusenode.node.allocator import Allocator, PutPlan, SegmentAllocation
from fusenode.node.auditor import Auditor, distrusted
from fusenode.node.context import NodeContext
from fusenode.node.errors import NodeError, NotFoundError, PlacementError
from fusenode.node.gc import GarbageCollector, GcReport
from fusenode.node.holder import Limits, offered
from fusenode.node.metrics import Metrics
from fusenode.node.network import Network
from fusenode.node.protocol import PeerError, PeerOverCapacity
from fusenode.node.repo import Repo, read_identities
from fusenode.storage import age
from fusenode.storage.backend import validate_cid
from fusenode.storage.erasure import validate_parameters
from fusenode.storage.errors import InvalidArgument, NoIdentityMatch
from fusenode.storage.manifest import MAX_MANIFEST_SIZE, Manifest
from fusenode.storage.share import share_cid
from fusenode.storage.store import (
    check_input,
    check_recipients,
    check_space,
    get_file,
    load_manifest,
    open_metadata,
    put_file,
)
from fusenode.storage.unixfs import file_cid

if TYPE_CHECKING:
    from fusenode.node.optimizer import Optimizer
    from fusenode.node.repair import Repairer

log = logging.getLogger(__name__)

__all__ = ["NodeService", "ProgressFactory", "describe"]

#: ``factory(total_bytes, label)`` -> a context manager yielding ``update(n_bytes)`` or None
#: (`fusenode.node.progress.progress_bar` draws a bar on a terminal).
ProgressFactory = Callable[[int, str], AbstractContextManager[Callable[[int], None] | None]]


@contextlib.contextmanager
def _no_progress(total: int, label: str) -> Iterator[None]:
    yield None


class NodeService:
    def __init__(
        self,
        repo: Repo,
        ctx: NodeContext,
        network: Network,
        allocator: Allocator | None = None,
    ) -> None:
        self.repo, self.config = repo, repo.config
        self.peer_id, self.blocks, self.state = ctx.peer_id, ctx.blocks, ctx.state
        self.addresses = list(ctx.blocks.identity().addresses)
        self.network = network
        self.allocator = allocator or Allocator()
        self.metrics = Metrics()
        self._usage: tuple[float, tuple[int, int]] | None = None  # (when, storage_usage)
        self.limits = Limits(self.config.storage.capacity, self.config.storage.peer_quota)
        self.collector = GarbageCollector(ctx, on_run=self._gc_ran)
        # The daemon's own components, wired by the daemon (None in a command without one).
        self.optimizer: Optimizer | None = None
        self.repairer: Repairer | None = None
        self.auditor: Auditor | None = None

    # -- the decisions made once -------------------------------------------------------------
    def identities(self, identity_path: str | None) -> list[age.KeyIdentity]:
        """The identities in ``identity_path``, or this node's own."""
        return read_identities(Path(identity_path)) if identity_path else self.repo.identities()

    def erasure(self, k: int | None, n: int | None) -> tuple[int, int]:
        """k and n of a put: the request's, else the config's; checked (InvalidArgument)."""
        k = self.config.storage.k if k is None else k
        n = self.config.storage.n if n is None else n
        validate_parameters(k, n)
        return k, n

    def recipients(
        self, given: list[str], public: bool, *, mixed: bool = False
    ) -> list[age.KeyRecipient]:
        """Who may read a put: the recipients given, else this node (unless public); checked
        as `put_file` checks them (`check_recipients`), before any placement is planned."""
        parsed = [age.parse_recipient(r) for r in given]
        if not parsed and not public:
            parsed = [self.repo.identities()[0].recipient]
        if not public:
            check_recipients(parsed, mixed=mixed)
        return parsed

    async def manifest(self, cid: str) -> Manifest:
        """A manifest fetched from the network and checked against its CID: with a daemon,
        block by block and bounded (`fusenode.node.blockread`); without, through Kubo."""
        validate_cid(cid)
        data = await self.network.read_small_file(cid, MAX_MANIFEST_SIZE)
        if data is None:
            timeout = self.config.storage.fetch_timeout
            return await self.blocks.bridge.run(
                load_manifest, cid, self.blocks.sync, timeout=timeout
            )
        return await self.blocks.bridge.run(Manifest.from_bytes, data)

    # -- identity and peers ------------------------------------------------------------------
    async def identity(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "addresses": self.addresses,
            "recipient": self.repo.recipient(),
        }

    async def peers(self) -> list[dict[str, Any]]:
        return await self.network.report()

    # -- put ---------------------------------------------------------------------------------
    async def put(
        self,
        path: str,
        k: int | None,
        n: int | None,
        recipients: list[str],
        public: bool,
        *,
        progress: ProgressFactory | None = None,
    ) -> dict[str, Any]:
        with self.metrics.timed("put"):
            result = await self.store(Path(path), k, n, recipients, public, progress=progress)
        self.forget_usage()
        await self.network.announce(result["cid"], "stored", not public)
        return result

    async def store(
        self,
        path: Path,
        k: int | None,
        n: int | None,
        recipients: list[str],
        public: bool,
        *,
        name: str | None = None,
        provenance: dict[str, Any] | None = None,
        parent: str | None = None,
        attestation: dict[str, Any] | None = None,
        progress: ProgressFactory | None = None,
        mixed_recipients: bool = False,
    ) -> dict[str, Any]:
        """Store a file with placement on the allocator's nodes; see the module docstring.

        ``mixed_recipients``: a republish to a model's own recipients, which a share may have
        made post-quantum and classic at once (a new put refuses that mix)."""
        # Everything this node can check alone comes before asking the network.
        size = await self.blocks.bridge.run(check_input, path)
        k, n = self.erasure(k, n)
        readers = self.recipients(recipients, public, mixed=mixed_recipients)
        plan = await self._plan(n)
        allocation = SegmentAllocation(self.allocator, plan, n)
        placements: list[tuple[int, int, str, str]] = []
        lock = threading.Lock()
        bridge = self.blocks.bridge

        receipts: dict[tuple[int, int], str] = {}

        def sink(segment: int, index: int, frag_path: Path) -> str:  # on a worker thread
            holder = allocation.holder(segment, index)
            while True:
                try:
                    placed = bridge.wait_for(self.network.place(holder, frag_path))
                    break
                except PeerError as e:
                    # Full, over our quota, refusing, failing or silent: any other node will
                    # do, so one hostile or broken peer cannot stop a put. A store that may
                    # have landed (no answer) is released when that peer answers again.
                    log.info("fragment %d of segment %d on %s: %s", index, segment, holder, e)
                    if not isinstance(e, PeerOverCapacity):
                        self.state.add_surplus("", file_cid(frag_path.read_bytes()), holder)
                    try:
                        holder = allocation.refused(segment, index, holder)
                    except PlacementError as none_left:
                        raise NodeError(
                            f"fragment {index} of segment {segment}: {none_left} (last: {e}); "
                            "nothing was published"
                        ) from e
            with lock:
                placements.append((segment, index, placed.cid, holder))
                if placed.receipt is not None:
                    receipts[(segment, index)] = placed.receipt
            return placed.cid

        try:
            with (progress or _no_progress)(size, "put") as update:
                result = await bridge.run(
                    put_file,
                    path,
                    self.blocks.sync,
                    recipients=readers,
                    public=public,
                    k=k,
                    n=n,
                    segment_size=self.config.storage.segment_size,
                    work_dir=self.repo.files.tmp,
                    sink=sink,
                    progress=update,
                    name=name,
                    provenance=provenance,
                    parent=parent,
                    attestation=attestation,
                    mixed_recipients=mixed_recipients,
                )
        except BaseException:
            await self._orphaned(placements)
            raise
        # The manifest is on this node; every holder gets a copy too, so any node finds it.
        holders = sorted({holder for *_, holder in placements})
        await self.network.distribute(holders, result.cid, result.manifest.to_bytes())
        self.state.hold([result.cid], self.peer_id)
        mode = "weak" if allocation.weakened and plan.mode == "distinct" else plan.mode
        self.state.record_model(
            result.cid, k, n, len(result.manifest.segments), mode, placements, receipts
        )
        self.state.record_model_info(
            result.cid,
            {
                "name": name or path.name,
                "size": result.plaintext_size,
                "stored": result.stored_bytes,
            },
        )
        for holder in holders:
            if holder != self.peer_id:
                self.state.peer_answered(holder)
        return {
            "cid": result.cid,
            "size": result.plaintext_size,
            "encrypted": not public,
            "segments": len(result.manifest.segments),
            "k": k,
            "n": n,
            "placement": mode,
            "holders": dict(sorted(Counter(h for *_, h in placements).items())),
        }

    async def _orphaned(self, placements: list[tuple[int, int, str, str]]) -> None:
        """A put that failed published nothing: the fragments it placed are released (ours
        now, the peers' once they answer: the surplus rule of repair), so no holder keeps
        them, or counts them against our quota, for ever."""
        for _segment, _index, cid, holder in placements:
            if holder != self.peer_id:
                self.state.add_surplus("", cid, holder)
            elif self.state.release(cid, self.peer_id):
                with contextlib.suppress(Exception):
                    await self.blocks.unpin(cid)

    async def _plan(self, n: int) -> PutPlan:
        """The allocator's plan over the live peers; when they are too few domains for n
        fragments, first look for the rest of the network (a node that just joined may not
        know it yet)."""

        bad = distrusted(self.state)  # holders that failed audits get no new fragments

        def plan(live: list[str]) -> PutPlan:
            try:
                return self.allocator.plan(
                    self.peer_id,
                    [p for p in live if p not in bad],
                    n,
                    networked=self.network.networked,
                    allow_weak=self.config.placement.allow_weak,
                )
            except PlacementError as e:
                out = sorted(set(live) & bad)
                if not out:
                    raise
                raise PlacementError(
                    f"{e}. Left out: {len(out)} live peer(s) distrusted after failed audits "
                    f"({', '.join(out)})"
                ) from None

        try:
            first = plan(await self.network.live_peers())
        except PlacementError:
            return await self._plan_again(plan, await self.network.discover())
        if first.mode == "weak":
            return await self._plan_again(plan, await self.network.discover())
        return first

    async def _plan_again(self, plan: Callable[[list[str]], PutPlan], live: list[str]) -> PutPlan:
        """``plan(live)``, waiting (at most `defaults.AWAY_WAIT` seconds) while peers that
        answered within `defaults.LIVE_WINDOW` do not answer now and the plan is short of
        distinct nodes: a peer is away for a second or two while its Kubo restarts after a gc
        sweep or a crash, and a put must not fail, nor go weak, for that. A network that is
        simply too small fails at once (no peer was live lately that is not live now)."""
        deadline = time.monotonic() + defaults.AWAY_WAIT
        while True:
            try:
                result: PutPlan | PlacementError = plan(live)
            except PlacementError as e:
                result = e
            short = isinstance(result, PlacementError) or result.mode == "weak"
            away = (self._live() or set()) - set(live) - {self.peer_id}
            if not short or not away or time.monotonic() >= deadline:
                if isinstance(result, PlacementError):
                    raise result
                return result
            log.info("put: waiting for %d peer(s) briefly away: %s", len(away), sorted(away))
            await asyncio.sleep(1.0)
            live = await self.network.live_peers()

    # -- get ---------------------------------------------------------------------------------
    async def get(
        self,
        cid: str,
        output: str,
        identity_path: str | None,
        *,
        progress: ProgressFactory | None = None,
    ) -> dict[str, Any]:
        with self.metrics.timed("get"):
            try:
                return await self._get(cid, output, identity_path, progress)
            finally:
                self.forget_usage()  # fetched blocks stay in the blockstore

    async def _get(
        self, cid: str, output: str, identity_path: str | None, progress: ProgressFactory | None
    ) -> dict[str, Any]:
        identities = self.identities(identity_path)
        timeout = self.config.storage.fetch_timeout
        manifest = await self.manifest(cid)
        await self.blocks.bridge.run(check_space, manifest, output, self.repo.files.kubo)
        found = await self.network.holders(list(manifest.fragment_cids()))
        networked = self.network.networked
        local = self.peer_id

        def order(segment: int) -> list[int]:
            """Fragments held here first, then those a live peer holds, then the rest."""
            frags = manifest.segments[segment].fragments

            def rank(i: int) -> tuple[int, int]:
                who = found.get(frags[i].cid, set())
                return (0 if local in who else 1 if who else 2, i)

            return sorted(range(len(frags)), key=rank)

        def fetch(frag_cid: str, deadline: float) -> bytes:
            if networked and not found.get(frag_cid):
                deadline = min(deadline, defaults.UNKNOWN_HOLDER_TIMEOUT)
            return self.blocks.sync.fetch_bytes(frag_cid, deadline)

        # Known beforehand: what is fetched, from where, and how it is checked.
        retrieve = functools.partial(
            get_file,
            cid,
            output,
            self.blocks.sync,
            manifest=manifest,
            order=order,
            fetch=fetch,
            hedge_after=self.config.storage.hedge_after if networked else None,
        )
        with (progress or _no_progress)(manifest.plaintext_size(), "get") as update:
            result = await self.blocks.bridge.run(
                retrieve, identities=identities, fetch_timeout=timeout, progress=update
            )
        return {
            "path": str(result.path),
            "size": result.metadata.size,
            "name": result.metadata.name,
            "sha256": result.metadata.sha256,
        }

    # -- status ------------------------------------------------------------------------------
    async def status(self, cid: str) -> dict[str, Any]:
        """Which node holds each fragment of a model, and whether it answered."""
        manifest = await self.manifest(cid)
        found = await self.network.holders(list(manifest.fragment_cids()))
        placed = {(p.segment, p.fragment): p for p in self.state.placements(cid)}
        audits = self.state.audits(manifest.fragment_cids())
        segments = []
        healthy = True
        for seg in manifest.segments:
            frags = []
            for f in seg.fragments:
                who = found.get(f.cid, set())
                row = placed.get((seg.index, f.index))
                peer = row.peer if row else (sorted(who)[0] if who else None)
                answered = peer is not None and peer in who
                lost = row.lost if row else None
                healthy &= answered and not lost
                entry: dict[str, Any] = {
                    "index": f.index,
                    "cid": f.cid,
                    "peer": peer,
                    "answered": answered,
                    # The last audit of this copy (None: not audited yet, or held here).
                    "audit": audits.get((f.cid, peer)) if peer else None,
                }
                if lost:
                    entry["lost"] = lost  # repair rebuilds it elsewhere
                frags.append(entry)
            holders = [f["peer"] for f in frags if f["answered"]]
            segments.append(
                {
                    "index": seg.index,
                    "fragments": frags,
                    "distinct": len(set(holders)) == len(holders) == len(frags),
                }
            )
        return {
            "cid": cid,
            "k": manifest.erasure.k,
            "n": manifest.erasure.n,
            "owner": self.state.model(cid) is not None,
            "healthy": healthy,
            "segments": segments,
        }

    # -- what the node holds and does: ls, the summary, metrics --------------------------------
    def _live(self) -> set[str] | None:
        """Peers whose daemon answered lately; None without a daemon (no checks run)."""
        if not self.network.networked:
            return None
        return {r.peer_id for r in self.state.recent_peers(defaults.LIVE_WINDOW)}

    async def ls(self) -> dict[str, Any]:
        """The models this node placed (with their health) and what it holds for others."""
        return {
            "models": observe.models(self.state, self.peer_id, self._live()),
            "held": observe.held_for_others(self.state, self.peer_id),
            "shares": [
                {"cid": c, "source": info["source"], "created": info["created"]}
                for c, info in sorted(self.state.shares().items())
            ],
        }

    async def node_status(self) -> dict[str, Any]:
        """The node's summary: identity, peers, storage, models' health, jobs, activity
        (`fusenode.node.observe` says where each number comes from)."""
        live = self._live()
        listing = observe.models(self.state, self.peer_id, live)
        held = observe.held_for_others(self.state, self.peer_id)
        blockstore, pinned = await self.storage_usage()
        disk_total, disk_free = observe.disk(self.repo.path)
        held_bytes = sum(h["bytes"] for h in held)
        capacity, quota = offered(self.limits, held_bytes, disk_total, disk_free)
        connected = set(await self.blocks.peers())
        scores = self.state.scores()
        peers = [
            {
                "peer_id": r.peer_id,
                "connected": r.peer_id in connected,
                "live": live is not None and r.peer_id in live,
                "last_seen": r.last_seen,
                "last_error": r.last_error,
                "audit_score": scores.get(r.peer_id),
            }
            for r in self.state.peers()
            if r.peer_id != self.peer_id
        ]
        activity: dict[str, Any] = {}
        for operation in ("put", "get", "repair", "audit", "gc"):
            runs, errors = self.metrics.runs(operation)
            activity[operation] = {"runs": runs, "errors": errors}
            if operation in self.metrics.last:
                activity[operation]["last"] = self.metrics.last[operation]
        if activity["gc"].get("last") is None and (done := self.state.last_gc()):
            # No gc since this process started (or no daemon): the last one the state kept.
            activity["gc"]["last"] = {
                "time": done.get("started"),
                "seconds": done.get("seconds"),
                "summary": {"freed_bytes": done.get("removed_bytes"), **done},
            }
        uptime = time.time() - self.metrics.started
        return {
            "peer_id": self.peer_id,
            "addresses": self.addresses,
            "recipient": self.repo.recipient(),
            "version": __version__,
            "daemon": self.network.networked,
            "uptime_seconds": round(uptime, 1) if self.network.networked else None,
            "peers": {
                "known": len(peers),
                "live": sum(p["live"] for p in peers),
                "connected": len(connected),
                "list": peers,
            },
            "storage": {
                "capacity": "auto" if self.limits.capacity is None else self.limits.capacity,
                "capacity_bytes": capacity,
                "peer_quota_bytes": quota,
                "held_bytes": held_bytes,
                "held_fragments": sum(h["fragments"] for h in held),
                "blockstore_bytes": blockstore,
                "pinned_bytes": pinned,
                "disk_total_bytes": disk_total,
                "disk_free_bytes": disk_free,
            },
            "held": held,
            "models": observe.model_totals(listing),
            "jobs": self.state.job_counts(),
            "activity": activity,
        }

    async def storage_usage(self) -> tuple[int, int]:
        """(blockstore bytes, pinned bytes), walked at most every `defaults.USAGE_MAX_AGE`
        seconds: a dashboard refreshing every few seconds must not walk a large blockstore
        each time. `forget_usage` (after a gc) makes the next call walk again."""
        now = time.monotonic()
        if self._usage is None or now - self._usage[0] > defaults.USAGE_MAX_AGE:
            self._usage = (now, await self.collector.usage())
        return self._usage[1]

    def forget_usage(self) -> None:
        self._usage = None

    def _gc_ran(self, seconds: float, report: GcReport | None, error: str | None) -> None:
        """Each gc pass, the API's or the daemon's own: counted, and the disk walked anew."""
        if report is None:
            self.metrics.record_gc(seconds, 0, error=error)
            return
        self.metrics.record_gc(
            seconds,
            report.removed_bytes,
            removed_blocks=report.removed_blocks,
            blockstore_after=report.blockstore_after,
            pinned_after=report.pinned_after,
        )
        self.forget_usage()

    async def metrics_text(self) -> bytes:
        """The Prometheus exposition, its levels read now."""
        self.metrics.update(await self.node_status())
        return self.metrics.exposition()

    # -- share and info ----------------------------------------------------------------------
    async def share(
        self, cid: str, recipients: list[str], identity_path: str | None
    ) -> dict[str, Any]:
        if not recipients:
            raise InvalidArgument("share needs at least one --recipient")
        parsed = [age.parse_recipient(r) for r in recipients]
        identities = self.identities(identity_path)
        manifest = await self.manifest(cid)
        new_cid, shared = await self.blocks.bridge.run(
            functools.partial(
                share_cid, cid, self.blocks.sync, identities, parsed, manifest=manifest
            )
        )
        if new_cid == cid:  # every key already had access: nothing new was written
            return {"cid": cid, "source": cid, "added": 0}
        self.state.hold([new_cid], self.peer_id)
        peers = await self.network.live_peers()
        await self.network.distribute(peers, new_cid, shared.to_bytes())
        self.state.record_share(new_cid, cid, peers)
        await self.network.announce(new_cid, "shared", True)
        return {"cid": new_cid, "source": cid, "added": len(parsed)}

    async def info(self, cid: str, identity_path: str | None) -> dict[str, Any]:
        """Decision: only a key given with ``identity_path`` opens the sealed metadata, never
        this node's own (unlike get and share): ``info`` without an identity shows what anyone
        holding the CID sees, which for an encrypted version 3 model is no exact size, name,
        creation time or parent (docs/format.md 13.6), even when the node could read it."""
        manifest = await self.manifest(cid)
        identities = read_identities(Path(identity_path)) if identity_path else []
        return describe(cid, manifest, identities)

    # -- provenance ----------------------------------------------------------------------------
    async def provenance(self, cid: str, identity_path: str | None) -> dict[str, Any]:
        """The model's signed provenance (a DSSE envelope) and the signer it proves (None,
        and the reason in ``problem``, when its signature does not verify: exported anyway,
        for whoever wants to look at it)."""
        from fusenode.node.provenance import NoProvenance, ProvenanceError, open_envelope

        manifest = await self.manifest(cid)
        _key, metadata = open_metadata(manifest, self.identities(identity_path))
        if metadata.attestation is None:
            raise NoProvenance(f"{cid} has no provenance (not made by `fusenode optimize`)")
        envelope = dict(metadata.attestation)
        try:
            return {"cid": cid, "signer": open_envelope(envelope).signer, "envelope": envelope}
        except ProvenanceError as e:
            return {"cid": cid, "signer": None, "problem": str(e), "envelope": envelope}

    async def verify(
        self, cid: str, identity_path: str | None, trust: list[str], recheck: bool
    ) -> dict[str, Any]:
        """Check a model's provenance chain (`fusenode.node.verifier`)."""
        from fusenode.node.verifier import verify_model

        return await verify_model(self, cid, identity_path, list(trust), recheck)

    # -- the daemon's own: optimize, jobs, repair --------------------------------------------
    def _daemon_part(self, part: object, what: str) -> Any:
        if part is None:
            raise NodeError(f"{what} needs a running daemon (start `fusenode daemon`)")
        return part

    async def optimize(self, cid: str, recipients: list[str]) -> dict[str, Any]:
        optimizer: Optimizer = self._daemon_part(self.optimizer, "optimize")
        return await optimizer.submit(cid, recipients)

    async def jobs(self) -> list[dict[str, Any]]:
        return self.state.jobs()

    async def job(self, job_id: int) -> dict[str, Any]:
        job = self.state.job(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id}")
        return job

    async def repair(self) -> dict[str, Any]:
        """An audit pass (its failures mark fragments lost), then a repair pass."""
        repairer: Repairer = self._daemon_part(self.repairer, "repair")
        audit = await self.auditor.run(repair=False) if self.auditor is not None else None
        summary = await repairer.run()
        summary["audit"] = audit
        return summary

    # -- disk: rm and gc -----------------------------------------------------------------------
    async def rm(self, cid: str) -> dict[str, Any]:
        """Delete a model this node placed: every holder is asked to release its fragments and
        its copy of the manifest (``/peer/v1/release``: only this node may), this node
        releases its own, and the model is forgotten (repair and leases stop at once). A
        holder that does not answer now is asked again whenever it answers (the ``surplus``
        rule of repair); its lease runs out anyway. Blocks go at the next gc."""
        validate_cid(cid)
        shares = self.state.shares()
        if self.state.model(cid) is None:
            if cid in shares:
                return await self._rm_share(cid, shares[cid])
            raise NotFoundError(
                f"{cid} is not a model this node placed or shared: only the node that placed "
                "a model (or made a share of it) can delete it"
            )
        placements = self.state.placements(cid)
        # A fragment another model of ours placed on the same peer (a public file put twice)
        # stays: it still counts there.
        still = {(p.cid, p.peer) for p in self.state.placements() if p.manifest != cid}
        by_peer: dict[str, list[str]] = defaultdict(list)
        for p in placements:
            if (p.cid, p.peer) not in still:
                by_peer[p.peer].append(p.cid)
        for peer in {p.peer for p in placements}:
            by_peer[peer].append(cid)  # every holder got a copy of the manifest
        own = by_peer.pop(self.peer_id, [])
        self.state.forget_model(cid)
        reply = await self._release(cid, by_peer, [*own, cid])
        # The shares this node made of the model name its fragments, now released: they go
        # too (a share made by another node stops opening; that node removes its manifest).
        gone = [c for c, info in shares.items() if info["source"] == cid]
        for share in gone:
            await self._rm_share(share, shares[share])
        return {**reply, "shares": gone}

    async def _rm_share(self, cid: str, info: dict[str, Any]) -> dict[str, Any]:
        """Delete a share this node made: its manifest, copied to ``info["peers"]``, is
        released there and here; the model's fragments stay (they are the model's)."""
        self.state.forget_share(cid)
        by_peer = {p: [cid] for p in info["peers"] if p != self.peer_id}
        return {**await self._release(cid, by_peer, [cid]), "shares": []}

    async def _release(
        self, manifest: str, by_peer: dict[str, list[str]], own: list[str]
    ) -> dict[str, Any]:
        """Ask each peer to release its CIDs (one signed request each; a peer that does not
        answer now is asked again when it does: the ``surplus`` rule of repair), then drop
        this node's own holds of ``own``; the ``rm`` reply."""
        released: dict[str, int] = {}
        pending: dict[str, str] = {}

        async def ask(peer: str, cids: list[str]) -> None:
            try:
                released[peer] = len(await self.network.release(peer, cids))
            except PeerError as e:
                for c in cids:
                    self.state.add_surplus(manifest, c, peer)
                pending[peer] = str(e)

        await asyncio.gather(*(ask(peer, cids) for peer, cids in sorted(by_peer.items())))
        local = 0
        for c in dict.fromkeys(own):
            if not self.state.holds(c, self.peer_id):
                continue
            if self.state.release(c, self.peer_id):
                await self.blocks.unpin(c)
            local += 1
        return {
            "cid": manifest,
            "released": dict(sorted(released.items())),
            "pending": dict(sorted(pending.items())),
            "local": local,
        }

    async def gc(self) -> dict[str, Any]:
        """Delete every block of the blockstore this node's pins do not reach
        (`fusenode.node.gc`)."""
        return (await self.collector.run("cli")).to_dict()


def describe(cid: str, manifest: Manifest, identities: list[age.KeyIdentity]) -> dict[str, Any]:
    """What anyone may see of a manifest, plus its metadata and provenance when a key fits.

    A version 3 manifest (docs/format.md 13) shows no creation time, parent or exact size
    without a key: ``payload_size`` is that of the padded plaintext, and ``created`` and
    ``parent`` are null until a key opens the sealed metadata, which holds them.
    """
    public = manifest.to_obj()
    info: dict[str, Any] = {
        "cid": cid,
        "version": manifest.version,
        "encrypted": manifest.encrypted,
        "size_hidden": manifest.size_hidden,
        "created": public.get("created"),
        "k": manifest.erasure.k,
        "n": manifest.erasure.n,
        "segments": len(manifest.segments),
        "payload_size": manifest.payload_size,
        "parent": manifest.parent,
        "metadata": None,
    }
    try:
        _key, metadata = open_metadata(manifest, identities)
    except (NoIdentityMatch, InvalidArgument):
        info["readable"] = False
        return info
    info["readable"] = True
    info["metadata"] = metadata.to_obj()
    if manifest.size_hidden:
        info["created"] = info["metadata"]["created"]
        info["parent"] = metadata.parent
    return info
