"""The daemon's service: put with placement on distinct peers, get from live holders,
status, and repair. The HTTP API (node.api) and the peer API (node.peering) call into it.

Placement: fragment i of segment s goes to ``candidates[(i + s) % len(candidates)]`` where
the candidates are this node followed by the live fusenode peers (sorted by peer ID). With at
least n candidates, the n fragments of a segment land on n distinct nodes, and rotating by s
spreads the load. A fragment counts as stored only once its holder answered the pin request
(it fetched the fragment from us over bitswap and pinned it). The manifest is written only
after every fragment is confirmed, then pinned on every live peer: a put interrupted before
that leaves no manifest claiming anything.

Get: before fetching, live peers are asked which fragments they hold, so fragments are taken
from live holders first; a fragment with no known live holder is only tried last, with a
short deadline (a fetch of a block nobody has never ends by itself in Kubo).

Repair (owner only): holders are checked every ``[repair] interval``; a holder unheard of for
``[repair] unreachable_after`` seconds has its fragments rebuilt from k others (erasure coding
is deterministic, so the rebuilt fragment has the same CID) and placed on a live node that
holds no fragment of that segment yet; the placement table records the move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fusenode.node.errors import NodeError, NotFoundError, PlacementError
from fusenode.node.peering import PeerClient, PeerRefused, PeerUnreachable
from fusenode.node.repo import Repo, read_identities
from fusenode.node.state import State, parse_iso
from fusenode.storage import age
from fusenode.storage.erasure import ErasureCoder
from fusenode.storage.errors import BackendError, BackendTimeout, InvalidArgument
from fusenode.storage.manifest import FragmentRef, Manifest
from fusenode.storage.store import get_file, load_manifest, open_metadata, put_file
from fusenode.storage.unixfs import file_cid

log = logging.getLogger("fusenode.service")
HEALTH_TIMEOUT = 3.0
UNKNOWN_HOLDER_TIMEOUT = 10.0


class NodeService:
    def __init__(self, repo: Repo, kubo: Any, state: State, peers: PeerClient) -> None:
        self.repo = repo
        self.config = repo.config
        self.kubo = kubo
        self.state = state
        self.client = peers
        self.peer_id: str = kubo.identity().peer_id
        self.addresses = list(kubo.identity().addresses)
        self.loop: asyncio.AbstractEventLoop | None = None
        from fusenode.node.optimizer import Optimizer

        self.optimizer = Optimizer(self)
        self._repair_lock = asyncio.Lock()

    # -- shared helpers --------------------------------------------------------------------
    async def manifest(self, cid: str) -> Manifest:
        """A manifest fetched from the network and checked against its CID."""
        return await asyncio.to_thread(
            load_manifest, cid, self.kubo, timeout=self.config.storage.fetch_timeout
        )

    def identities(self, identity_path: str | None) -> list[age.X25519Identity]:
        """The identities in ``identity_path``, or this node's own."""
        return read_identities(Path(identity_path)) if identity_path else self.repo.identities()

    # -- identity and peers ----------------------------------------------------------------
    async def identity(self) -> dict:
        return {
            "peer_id": self.peer_id,
            "addresses": self.addresses,
            "recipient": self.repo.recipient(),
        }

    async def connected(self) -> list[str]:
        return sorted(await asyncio.to_thread(self.kubo.peers))

    async def health(self, peer_id: str) -> bool:
        try:
            reply = await self.client.call(
                peer_id, "GET", "/peer/v1/health", timeout=HEALTH_TIMEOUT
            )
        except (PeerUnreachable, PeerRefused) as e:
            self.state.peer_failed(peer_id, str(e))
            return False
        addresses = [a for a in reply.get("addresses", []) if isinstance(a, str)]
        self.state.peer_answered(peer_id, addresses)
        return True

    async def keep_connected(self, stop: asyncio.Event, every: float = 5.0) -> None:
        """Learn the addresses of connected peers and redial known peers that dropped off.

        libp2p does not reconnect by itself, and the peer store lives in memory only: without
        this, two nodes that lost each other (a restart on either side) stay apart.
        """
        while not stop.is_set():
            try:
                connected = set(await self.connected())
                records = {r.peer_id: r for r in self.state.peers()}
                fresh = [p for p in connected if not (records.get(p) and records[p].addresses)]
                await asyncio.gather(*(self.health(p) for p in fresh))
                for rec in records.values():
                    if rec.peer_id in connected or rec.peer_id == self.peer_id:
                        continue
                    for addr in rec.multiaddrs():
                        try:
                            await self.connect(addr, timeout=5.0)
                            break
                        except Exception as e:
                            log.debug("redial %s at %s: %s", rec.peer_id, addr, e)
            except Exception:
                log.exception("keep-connected pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)

    async def live_peers(self) -> list[str]:
        """Connected peers whose fusenode daemon answers (sorted by peer ID)."""
        connected = await self.connected()
        answers = await asyncio.gather(*(self.health(p) for p in connected))
        return [p for p, ok in zip(connected, answers, strict=True) if ok]

    async def peers(self) -> list[dict]:
        connected = set(await self.connected())
        live = set(await self.live_peers())
        known = {r.peer_id: r for r in self.state.peers()}
        out = []
        for peer in sorted(connected | set(known)):
            rec = known.get(peer)
            out.append(
                {
                    "peer_id": peer,
                    "connected": peer in connected,
                    "fusenode": peer in live,
                    "last_seen": rec.last_seen if rec else None,
                }
            )
        return out

    async def connect(self, multiaddr: str, timeout: float = 20.0) -> None:
        await asyncio.to_thread(self.kubo.connect, multiaddr, timeout)

    # -- serving peers ------------------------------------------------------------------------
    async def pin_for(self, owner: str, cids: list[str]) -> list[str]:
        timeout = self.config.placement.pin_timeout
        for cid in cids:
            await asyncio.to_thread(self.kubo.pin, cid, timeout)
        self.state.hold(cids, owner)
        return cids

    async def store_for(self, owner: str, expected: str, data: bytes) -> str:
        """Add a fragment streamed by ``owner`` if it hashes to ``expected``.

        Checked before it is added (`storage.unixfs`), so bytes that are not what the owner
        claims never reach the blockstore (which has no GC to take them out again); Kubo's
        own answer is compared too, in case the two hashings ever disagree.
        """
        if not expected.startswith("Qm"):  # Kubo's add gives CIDv0: another form would not
            raise ValueError(f"expected a CIDv0 (Qm...), the form Kubo's add gives, not {expected}")
        actual = await asyncio.to_thread(file_cid, data)
        if actual != expected:
            raise ValueError(f"fragment hashes to {actual}, not {expected}")
        with tempfile.NamedTemporaryFile(dir=self.repo.tmp, prefix=".store-") as f:
            f.write(data)
            f.flush()
            cid = await asyncio.to_thread(self.kubo.add, Path(f.name))
        if cid != expected:
            if cid not in self.state.held([cid]):
                await asyncio.to_thread(self.kubo.unpin, cid)
            raise ValueError(f"fragment hashes to {cid}, not {expected}")
        self.state.hold([cid], owner)
        return cid

    async def unpin_for(self, owner: str, cids: list[str]) -> list[str]:
        released = []
        for cid in cids:
            if self.state.release(cid, owner):
                await asyncio.to_thread(self.kubo.unpin, cid)
                released.append(cid)
        return released

    # -- put -------------------------------------------------------------------------------
    async def put(
        self, path: str, k: int | None, n: int | None, recipients: list[str], public: bool
    ) -> dict:
        result = await self.store(Path(path), k, n, recipients, public)
        await self.optimizer.announce(result["cid"], "stored", not public)
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
        provenance: dict | None = None,
        parent: str | None = None,
    ) -> dict:
        """Store a file with placement on distinct peers; see the module docstring."""
        k = k if k is not None else self.config.storage.k
        n = n if n is not None else self.config.storage.n
        ErasureCoder(k, n)  # validates k and n before anything is stored
        parsed = [age.X25519Recipient.from_string(r) for r in recipients]
        if not parsed and not public:
            parsed = [self.repo.identities()[0].recipient]
        candidates = [self.peer_id, *await self.live_peers()]
        if len(candidates) >= n:
            mode = "distinct"
        elif self.config.placement.allow_weak:
            mode = "weak"
        else:
            raise PlacementError(
                f"only {len(candidates)} reachable node(s) (this one included) for n={n} "
                f"fragments per segment: fragments cannot go to distinct nodes. Start more "
                "nodes, lower n, or set [placement] allow_weak = true to accept a weaker "
                "placement"
            )
        loop = asyncio.get_running_loop()
        placements: list[tuple[int, int, str, str]] = []
        lock = threading.Lock()

        def sink(segment: int, index: int, frag_path: Path) -> str:
            holder = candidates[(index + segment) % len(candidates)]
            fut = asyncio.run_coroutine_threadsafe(self._place(holder, frag_path), loop)
            try:
                cid = fut.result()
            except (PeerUnreachable, PeerRefused) as e:
                raise NodeError(
                    f"fragment {index} of segment {segment}: {e}; nothing was published"
                ) from e
            with lock:
                placements.append((segment, index, cid, holder))
            return cid

        result = await asyncio.to_thread(
            put_file,
            Path(path),
            self.kubo,
            recipients=parsed,
            public=public,
            k=k,
            n=n,
            segment_size=self.config.storage.segment_size,
            work_dir=self.repo.tmp,
            sink=sink,
            name=name,
            provenance=provenance,
            parent=parent,
        )
        # The manifest is on this node; pin it on every live holder too, so any node finds it.
        holders = sorted({h for *_, h in placements if h != self.peer_id})
        await asyncio.gather(
            *(self._ask_pin(h, [result.cid]) for h in holders), return_exceptions=True
        )
        self.state.hold([result.cid], self.peer_id)
        self.state.record_model(result.cid, k, n, len(result.manifest.segments), mode, placements)
        for h in holders:
            self.state.peer_answered(h)
        counts: dict[str, int] = defaultdict(int)
        for *_, h in placements:
            counts[h] += 1
        return {
            "cid": result.cid,
            "segments": len(result.manifest.segments),
            "k": k,
            "n": n,
            "placement": mode,
            "holders": dict(sorted(counts.items())),
        }

    async def _place(self, holder: str, path: Path, cid: str | None = None) -> str:
        """Store the fragment in ``path`` on ``holder`` (this node or a peer) and return its
        CID once the holder confirmed it. Peers get the bytes streamed (/peer/v1/store); only
        fragments over the stream limit go the bitswap way (add here, peer pins)."""
        from fusenode.node.peering import MAX_FRAGMENT

        if holder == self.peer_id:
            cid = await asyncio.to_thread(self.kubo.add, path)
            self.state.hold([cid], self.peer_id)
            return cid
        timeout = self.config.placement.pin_timeout
        if path.stat().st_size > MAX_FRAGMENT:
            cid = await asyncio.to_thread(self.kubo.add, path)
            await self.client.call(
                holder, "POST", "/peer/v1/pin", {"cids": [cid]}, timeout=timeout, attempts=3
            )
            if cid not in self.state.held([cid]):
                await asyncio.to_thread(self.kubo.unpin, cid)
            return cid
        data = await asyncio.to_thread(path.read_bytes)
        if cid is None:  # the CID is ours to compute: never taken from the holder's word
            cid = await asyncio.to_thread(file_cid, data)
        await self.client.call(
            holder, "POST", f"/peer/v1/store?cid={cid}", raw=data, timeout=timeout, attempts=3
        )
        return cid

    async def _ask_pin(self, peer: str, cids: list[str]) -> None:
        await self.client.call(
            peer, "POST", "/peer/v1/pin", {"cids": cids}, timeout=self.config.placement.pin_timeout
        )

    # -- who holds what -------------------------------------------------------------------------
    async def holders(self, manifest: Manifest) -> tuple[dict[str, set[str]], list[str]]:
        """For each fragment CID, the live nodes that say they hold it; and the live peers."""
        cids = [c for c in manifest.fragment_cids()]
        live = await self.live_peers()
        found: dict[str, set[str]] = defaultdict(set)
        for cid in self.state.held(cids):
            found[cid].add(self.peer_id)

        async def ask(peer: str) -> None:
            try:
                reply = await self.client.call(peer, "POST", "/peer/v1/has", {"cids": cids})
            except (PeerUnreachable, PeerRefused):
                return
            for cid in reply.get("held", []):
                found[cid].add(peer)

        await asyncio.gather(*(ask(p) for p in live))
        return found, live

    # -- get -------------------------------------------------------------------------------
    async def get(self, cid: str, output: str, identity_path: str | None) -> dict:
        identities = self.identities(identity_path)
        timeout = self.config.storage.fetch_timeout
        manifest = await self.manifest(cid)
        found, _ = await self.holders(manifest)
        local = self.peer_id

        def order(segment: int) -> list[int]:
            frags = manifest.segments[segment].fragments

            def rank(i: int) -> tuple[int, int]:
                who = found.get(frags[i].cid, set())
                return (0 if local in who else 1 if who else 2, i)

            return sorted(range(len(frags)), key=rank)

        def fetch(frag_cid: str, deadline: float) -> bytes:
            if not found.get(frag_cid):
                deadline = min(deadline, UNKNOWN_HOLDER_TIMEOUT)
            return self.kubo.fetch_bytes(frag_cid, deadline)

        result = await asyncio.to_thread(
            get_file,
            cid,
            output,
            self.kubo,
            identities=identities,
            fetch_timeout=timeout,
            order=order,
            fetch=fetch,
            manifest=manifest,
        )
        return {
            "path": str(result.path),
            "size": result.metadata.size,
            "name": result.metadata.name,
            "sha256": result.metadata.sha256,
        }

    # -- optimize, jobs, share, info ----------------------------------------------------------
    async def optimize(self, cid: str, recipients: list[str]) -> dict:
        return await self.optimizer.submit(cid, recipients)

    async def jobs(self) -> list[dict]:
        return self.state.jobs()

    async def job(self, job_id: int) -> dict:
        job = self.state.job(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id}")
        return job

    async def share(self, cid: str, recipients: list[str], identity_path: str | None) -> dict:
        from fusenode.storage.share import share_cid

        if not recipients:
            raise InvalidArgument("share needs at least one --recipient")
        parsed = [age.X25519Recipient.from_string(r) for r in recipients]
        identities = self.identities(identity_path)
        new_cid, _manifest = await asyncio.to_thread(
            share_cid, cid, self.kubo, identities, parsed, self.config.storage.fetch_timeout
        )
        if new_cid == cid:  # every key already had access: nothing new was written
            return {"cid": cid, "source": cid, "added": 0}
        self.state.hold([new_cid], self.peer_id)
        live = await self.live_peers()
        await asyncio.gather(*(self._ask_pin(p, [new_cid]) for p in live), return_exceptions=True)
        await self.optimizer.announce(new_cid, "shared", True)
        return {"cid": new_cid, "source": cid, "added": len(parsed)}

    async def info(self, cid: str, identity_path: str | None) -> dict:
        manifest = await self.manifest(cid)
        identities = self.identities(identity_path)
        return describe(cid, manifest, identities)

    # -- status ------------------------------------------------------------------------------
    async def status(self, cid: str) -> dict:
        manifest = await self.manifest(cid)
        found, _live = await self.holders(manifest)
        placed = {(p.segment, p.fragment): p.peer for p in self.state.placements(cid)}
        segments = []
        healthy = True
        for seg in manifest.segments:
            frags = []
            for f in seg.fragments:
                who = found.get(f.cid, set())
                peer = placed.get((seg.index, f.index)) or (sorted(who)[0] if who else None)
                answered = peer is not None and peer in who
                healthy &= answered
                frags.append({"index": f.index, "cid": f.cid, "peer": peer, "answered": answered})
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

    # -- repair ------------------------------------------------------------------------------
    async def repair(self) -> dict:
        async with self._repair_lock:
            return await self._repair()

    async def _repair(self) -> dict:
        placements = self.state.placements()
        peers = sorted({p.peer for p in placements if p.peer != self.peer_id})
        answers = dict(
            zip(peers, await asyncio.gather(*(self.health(p) for p in peers)), strict=True)
        )
        now = datetime.now(UTC)
        limit = self.config.repair.unreachable_after
        away = []
        for peer in peers:
            if answers[peer]:
                continue
            rec = self.state.peer(peer)
            seen = parse_iso(rec.last_seen) if rec and rec.last_seen else None
            if seen is None or (now - seen).total_seconds() >= limit:
                away.append(peer)
        summary: dict[str, Any] = {
            "checked": len(peers),
            "unreachable": sorted(p for p in peers if not answers[p]),
            "replaced": sorted(away),
            "repaired": [],
            "failed": [],
        }
        if not away:
            return summary
        live = await self.live_peers()
        by_segment: dict[tuple[str, int], list] = defaultdict(list)
        for p in placements:
            by_segment[(p.manifest, p.segment)].append(p)
        total: dict[str, int] = defaultdict(int)  # fragments per node, all models
        for p in placements:
            total[p.peer] += 1
        for (manifest_cid, segment), rows in sorted(by_segment.items()):
            lost = [r for r in rows if r.peer in away]
            if not lost:
                continue
            try:
                moves = await self._repair_segment(manifest_cid, segment, rows, lost, live, total)
                summary["repaired"].extend(moves)
            except Exception as e:  # keep repairing the others; report this one
                log.warning("repair of %s segment %d failed: %s", manifest_cid, segment, e)
                summary["failed"].append(
                    {"manifest": manifest_cid, "segment": segment, "error": str(e)}
                )
        return summary

    async def _repair_segment(self, manifest_cid, segment, rows, lost, live, total) -> list[dict]:
        timeout = self.config.storage.fetch_timeout
        manifest = await self.manifest(manifest_cid)
        seg = manifest.segments[segment]
        coder = ErasureCoder(manifest.erasure.k, manifest.erasure.n)
        alive_rows = [
            r for r in rows if r not in lost and (r.peer == self.peer_id or r.peer in live)
        ]
        good: dict[int, bytes] = {}
        for r in alive_rows:
            if len(good) >= coder.k:
                break
            ref = seg.fragments[r.fragment]

            def fetch_checked(index: int = r.fragment, ref: FragmentRef = ref) -> bytes:
                data = self.kubo.fetch_bytes(ref.cid, timeout)
                coder.check_fragment(index, data, seg.size, cid=ref.cid, sha256=ref.sha256)
                return data

            try:
                data = await asyncio.to_thread(fetch_checked)
            except (BackendError, BackendTimeout, InvalidArgument, Exception) as e:
                log.warning("repair: fragment %d of %s: %s", r.fragment, manifest_cid, e)
                continue
            good[r.fragment] = data
        if len(good) < coder.k:
            raise NodeError(f"only {len(good)} of {coder.k} fragments reachable: cannot rebuild")
        fragments = coder.rebuild(good, seg.size)  # the same bytes, so the same CIDs
        load: dict[str, int] = defaultdict(int)  # fragments of this segment per live node
        for r in rows:
            if r not in lost:
                load[r.peer] += 1
        nodes = [self.peer_id, *live]
        moves = []
        for r in lost:
            ref = seg.fragments[r.fragment]
            # A node without a fragment of this segment if there is one; otherwise (fewer
            # live nodes than n) the least loaded: all n fragments again, on fewer nodes, is
            # still better than leaving them missing. status shows it as not distinct.
            target = min(nodes, key=lambda p: (load[p], total[p], p))
            with tempfile.NamedTemporaryFile(dir=self.repo.tmp, prefix=".repair-") as f:
                f.write(fragments[r.fragment])
                f.flush()
                # A peer checks the bytes hash to the manifest's CID (erasure coding is
                # deterministic); this node checks its own add.
                cid = await self._place(target, Path(f.name), cid=ref.cid)
            if cid != ref.cid:
                raise NodeError(f"rebuilt fragment {r.fragment} hashes to {cid}, not {ref.cid}")
            self.state.move_placement(manifest_cid, segment, r.fragment, target)
            load[target] += 1
            total[target] += 1
            total[r.peer] -= 1
            moves.append(
                {
                    "manifest": manifest_cid,
                    "segment": segment,
                    "fragment": r.fragment,
                    "from": r.peer,
                    "to": target,
                }
            )
            log.info(
                "repaired %s segment %d fragment %d: %s -> %s",
                manifest_cid,
                segment,
                r.fragment,
                r.peer,
                target,
            )
        return moves

    async def repair_loop(self, stop: asyncio.Event) -> None:
        interval = self.config.repair.interval
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            except TimeoutError:
                pass
            try:
                summary = await self.repair()
                if summary["repaired"] or summary["failed"]:
                    log.info("repair pass: %s", summary)
            except Exception:
                log.exception("repair pass failed")


def describe(cid: str, manifest: Manifest, identities) -> dict:
    """What anyone may see of a manifest, plus its metadata and provenance when a key fits."""
    from fusenode.storage.errors import NoIdentityMatch

    info: dict[str, Any] = {
        "cid": cid,
        "encrypted": manifest.encrypted,
        "created": manifest.to_obj()["created"],
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
    return info
