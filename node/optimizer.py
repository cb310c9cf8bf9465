"""Optimization jobs: fetch a stored model by CID, fuse its BatchNorms (CUDA when present),
verify it against the original with onnxruntime, and store the result through the same
encrypted, erasure-coded, multi-peer path, with provenance.

Jobs live in SQLite (node.state): one per (source CID, pass, pass version, recipients), so
asking twice returns the same job (its result once done); a failed job keeps its reason until
it is asked for again; jobs a stopped daemon left running are queued again at start. One job
runs at a time.

Announcements (PubSub topic :data:`ANNOUNCE_TOPIC`): after storing a manifest a node publishes
``{"v": 1, "cid": ..., "kind": "stored" | "optimized" | "shared", "encrypted": bool}``; the
sender is the libp2p peer that signed the message. A node with ``[optimizer] enabled`` and
``auto_optimize`` picks up ONNX models announced by the peers it lists in ``[optimizer]
announcers`` (and ``[network] accept_from`` accepts) that it can decrypt (or public ones), that
are not themselves derived models (no ``parent``), and queues a job for each; with no
announcers (the default) it acts on nothing it hears. An announced model whose job failed is
not queued again by later announcements (only ``fusenode optimize`` retries it), so a peer
cannot keep a node busy with a model that fails. PubSub is best effort: a dropped
announcement just means no automatic job; ``fusenode optimize`` always works.

Limits: a model above ``[optimizer] max_model_bytes`` is refused before it is fetched; fuse
and verification run in a child process stopped at ``max_seconds`` and ``max_memory``
(`fusenode.node.fusejob`).

Provenance of an optimized model: ``parent`` is the source CID, in the sealed metadata of an
encrypted result (format version 3 hides it from whoever has no key) and in the manifest of a
public one; the sealed metadata's ``provenance`` holds the pass and its version, the fusion report, the
verification figures, the input's sha256 (the output's is the metadata's own ``sha256``),
the device, and the optimizing node. The same facts, signed with the node's libp2p key, are
the metadata's ``attestation``: a DSSE envelope of an in-toto statement with a SLSA
provenance predicate (`fusenode.node.provenance`), which `fusenode verify` checks and
`fusenode provenance` exports. Sealed with the rest for an encrypted model, in clear for a
public one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fusenode import __version__
from fusenode.node.aio import AsyncTransport
from fusenode.node.errors import NodeError
from fusenode.node.fusejob import FuseJobError, auto_memory_limit, run_fuse_job
from fusenode.passes import fuse_bn
from fusenode.storage.backend import validate_cid
from fusenode.storage.errors import NoIdentityMatch, StorageError
from fusenode.storage.manifest import format_time, utc_now
from fusenode.storage.store import check_recipients, open_metadata

if TYPE_CHECKING:
    from fusenode.node.service import NodeService

ANNOUNCE_TOPIC = "fusenode/announce/v1"
log = logging.getLogger(__name__)


class JobError(NodeError):
    """An optimization job cannot complete; the message is the job's recorded reason."""


class Announcer:
    """Publishes ``{"v": 1, "cid", "kind", "encrypted"}`` on :data:`ANNOUNCE_TOPIC`, best
    effort, unless ``[optimizer] announce = false``."""

    def __init__(self, transport: AsyncTransport, enabled: bool) -> None:
        self.transport = transport
        self.enabled = enabled

    async def announce(self, cid: str, kind: str, encrypted: bool) -> None:
        if not self.enabled:
            return
        message = json.dumps({"v": 1, "cid": cid, "kind": kind, "encrypted": encrypted})
        try:
            await self.transport.pubsub_publish(ANNOUNCE_TOPIC, message.encode())
        except Exception as e:  # best effort by design
            log.info("announce %s: %s", cid, e)


class Optimizer:
    def __init__(self, service: NodeService, transport: AsyncTransport) -> None:
        self.service = service
        self.transport = transport
        self.state = service.state
        self.config = service.config
        self._wake = asyncio.Event()

    # -- jobs ------------------------------------------------------------------------------
    async def submit(self, cid: str, recipients: list[str], origin: str = "user") -> dict:
        """The job for ``cid``: queued, or found. A failed job is queued again only when a
        user asks (``origin`` "user"), never by an announcement."""
        from fusenode.storage import age

        validate_cid(cid)
        # Refused before anything is queued, as put refuses them (HeaderError, InvalidArgument:
        # 409): a key that does not decode, post-quantum and classic keys mixed, or more keys
        # than a manifest's header holds.
        check_recipients([age.parse_recipient(r) for r in recipients])
        job, changed = self.state.submit_job(
            "optimize",
            cid,
            fuse_bn.NAME,
            fuse_bn.VERSION,
            recipients,
            origin,
            retry_failed=origin == "user",
        )
        if changed:
            self._wake.set()
        return job

    async def run_forever(self, stop: asyncio.Event) -> None:
        requeued = self.state.requeue_interrupted_jobs()
        if requeued:
            log.info("%d interrupted job(s) queued again", requeued)
        while not stop.is_set():
            job = self.state.next_queued_job()
            if job is None:
                self._wake.clear()
                waiter = asyncio.create_task(self._wake.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                continue
            log.info("job %d: optimizing %s", job["id"], job["source"])
            try:
                result, report = await self._optimize(job)
            except asyncio.CancelledError:
                raise  # daemon stopping: the job stays 'running' and is queued at next start
            except (JobError, NodeError, StorageError, Exception) as e:
                reason = str(e) or type(e).__name__
                log.warning("job %d failed: %s", job["id"], reason)
                self.state.fail_job(job["id"], reason)
                continue
            self.state.finish_job(job["id"], result, report)
            log.info("job %d done: %s -> %s", job["id"], job["source"], result)

    async def _optimize(self, job: dict) -> tuple[str, dict]:
        service = self.service
        limits = self.config.optimizer
        source = job["source"]
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        manifest = await service.manifest(source)
        try:
            _key, metadata = open_metadata(manifest, service.repo.identities())
        except NoIdentityMatch:
            raise JobError(
                f"this node holds no key for {source}: it is not one of the model's recipients"
            ) from None
        size = manifest.plaintext_size()
        if limits.max_model_bytes is not None and size > limits.max_model_bytes:
            raise JobError(
                f"{source} is {size} bytes, over the {limits.max_model_bytes} this node "
                "optimizes ([optimizer] max_model_bytes)"
            )
        recipients = list(job["recipients"]) or list(getattr(metadata, "recipients", None) or [])
        if manifest.encrypted and not recipients:
            raise JobError(f"{source} does not record its recipients: name them with --recipient")
        started = utc_now()
        work = Path(tempfile.mkdtemp(prefix=f".job{job['id']}-", dir=service.repo.files.tmp))
        try:
            source_file = work / "input.onnx"
            fused_file = work / "fused.onnx"
            await service.get(source, str(source_file), None)
            timings["fetch"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            try:
                report = await run_fuse_job(
                    source_file,
                    fused_file,
                    device=limits.device,
                    max_seconds=limits.max_seconds,
                    max_memory=limits.max_memory or auto_memory_limit(size),
                )
            except FuseJobError as e:
                if e.kind == "VerificationError":
                    raise JobError(f"the fused model failed verification: {e}") from e
                raise JobError(f"{source} ({metadata.name}): {e}") from e
            timings["fuse_and_verify"] = time.perf_counter() - t1
            provenance = {
                "source": source,
                "pass": report["pass"],
                "pass_version": report["version"],
                "tool": f"fusenode {__version__}",
                "optimized_by": service.peer_id,
                "device": report["device"],
                "input_sha256": metadata.sha256,
                "report": {
                    key: report[key]
                    for key in (
                        "n_fused",
                        "n_skipped",
                        "nodes_before",
                        "nodes_after",
                        "fused",
                        "skipped",
                    )
                },
                "verification": {
                    key: report["verify"][key]
                    for key in ("engine", "rtol", "atol", "max_abs_error", "max_rel_error", "ok")
                },
            }
            stem, dot, suffix = metadata.name.rpartition(".")
            name = f"{stem}.fused.{suffix}" if dot else f"{metadata.name}.fused"
            attestation = await asyncio.to_thread(
                self._attest, job, fused_file, name, metadata.sha256, report, provenance, started
            )
            t2 = time.perf_counter()
            stored = await service.store(
                fused_file,
                manifest.erasure.k,
                manifest.erasure.n,
                recipients,
                public=not manifest.encrypted,
                name=name,
                provenance=provenance,
                parent=source,
                attestation=attestation,
                # The source's own readers (when none were named) may be post-quantum and
                # classic at once (a share allows that): republish to them as they are.
                mixed_recipients=not job["recipients"],
            )
            timings["store"] = time.perf_counter() - t2
        finally:
            shutil.rmtree(work, ignore_errors=True)
        timings["total"] = time.perf_counter() - t0
        await service.network.announce(stored["cid"], "optimized", manifest.encrypted)
        summary = {
            "n_fused": report["n_fused"],
            "n_skipped": report["n_skipped"],
            "nodes_before": report["nodes_before"],
            "nodes_after": report["nodes_after"],
            "verification": provenance["verification"],
            "placement": stored["placement"],
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        return stored["cid"], summary

    def _attest(
        self,
        job: dict,
        fused: Path,
        name: str,
        source_sha256: str,
        report: dict,
        provenance: dict,
        started: datetime,
    ) -> dict:
        """The signed provenance of ``fused`` (a DSSE envelope), signed with this node's key."""
        from fusenode.node.peerkeys import load_private_key
        from fusenode.node.provenance import ProvenanceError, make_statement, sign

        with open(fused, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
        key = load_private_key(self.service.repo.files.kubo)
        checked = report["verify"]

        def statement(fusion: dict) -> dict:
            return make_statement(
                subject_name=name,
                subject_sha256=digest.hexdigest(),
                source_cid=job["source"],
                source_sha256=source_sha256,
                pass_name=report["pass"],
                pass_version=report["version"],
                options={"device": self.config.optimizer.device, "verify": True},
                signer=key.peer_id,
                tool_version=__version__,
                report=fusion,
                verification={
                    **provenance["verification"],
                    "seed": checked.get("seed", 0),
                    "inputs": checked.get("inputs"),
                },
                started=format_time(started),
                finished=format_time(utc_now()),
                invocation=f"job-{job['id']}",
            )

        fusion = {**provenance["report"], "device": report["device"]}
        try:
            return sign(statement(fusion), key)
        except ProvenanceError:  # a model with thousands of fused nodes: counts, no lists
            fusion = {k: v for k, v in fusion.items() if k not in ("fused", "skipped")}
            return sign(statement({**fusion, "lists_left_out": True}), key)

    # -- announcements ---------------------------------------------------------------------
    async def listen(self, stop: asyncio.Event) -> None:
        """Queue jobs for announced models this node can optimize (if configured to).

        Only an auto-optimizing node subscribes: reading PubSub means polling the embedded
        node, which would cost every plain storage node CPU for nothing.
        """
        optimizer, accept = self.config.optimizer, self.config.network.accept_from
        if not (optimizer.enabled and optimizer.auto_optimize and optimizer.announcers):
            return
        heard = set(optimizer.announcers)
        if "*" not in accept:
            heard &= set(accept)
        transport = self.transport
        sub = await transport.pubsub_subscribe(ANNOUNCE_TOPIC)
        try:
            while not stop.is_set():
                msg = await transport.pubsub_next_message(sub, 1.0)
                if msg is None or msg.sender == self.service.peer_id:
                    continue
                if msg.sender not in heard:  # anyone may publish; only announcers are heard
                    continue
                try:
                    data = json.loads(msg.data)
                    cid = validate_cid(data["cid"])
                except (ValueError, KeyError, TypeError, StorageError):
                    log.info("ignoring malformed announcement from %s", msg.sender)
                    continue
                try:
                    if await self._wants(cid):
                        job = await self.submit(cid, [], origin="announce")
                        log.info("announced %s from %s: job %d", cid, msg.sender, job["id"])
                except Exception as e:
                    log.info("announced %s: not optimizing (%s)", cid, e)
        finally:
            with contextlib.suppress(Exception):
                await transport.pubsub_unsubscribe(sub)

    async def _wants(self, cid: str) -> bool:
        service = self.service
        manifest = await service.manifest(cid)
        if manifest.parent is not None:
            return False  # already a derived model
        try:
            _key, metadata = open_metadata(manifest, service.repo.identities())
        except NoIdentityMatch:
            return False
        if metadata.parent is not None:
            return False  # derived, said in sealed metadata (format version 3)
        return metadata.media_type == "application/onnx" or metadata.name.endswith(".onnx")
