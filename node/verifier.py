"""``fusenode verify``: check a model's signed provenance, link by link down to its origin.

For the model named and then for each source its provenance names, while that source has
provenance of its own:

1. the DSSE envelope's signature, by the key its keyid (a peer ID) names (`open_envelope`);
2. the subject: the sha256 of the model's bytes, fetched and hashed here;
3. the signer is trusted: among ``--trust`` and ``[trust] signers`` (not checked, and said so,
   when both are empty);
4. the source: its CID resolves, opens with the identities given, and its bytes (fetched and
   hashed here) are the ones the statement names;
5. with ``recheck``: the source and the model run here on fresh seeded inputs (in a child
   process under the optimizer's limits) and agree within this node's own tolerances for the
   dtype (signed tolerances may only tighten them; signed shapes are used when bounded).

The first failure ends the walk; it is returned in the result (``failure``: its error class,
one-line message and exit code) rather than raised, so that ``--json`` prints what was
checked either way, and the CLI exits with that class's code. A model whose metadata has no
envelope is reported as `NoProvenance`; a source without one is the origin of the chain.
A model that no key given opens is reported as `NoProvenance` too (no provenance this node
can read). Failures that are not about provenance (the model itself not found, a bad
``--trust`` or ``--identity``, the network down) are raised as usual.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fusenode.defaults import RECHECK_MAX_ELEMENTS
from fusenode.node.fusejob import FuseJobError, auto_memory_limit, run_verify_job
from fusenode.node.peerkeys import PeerAuthError, check_peer_id
from fusenode.node.provenance import (
    Link,
    NoProvenance,
    ProvenanceError,
    RecheckFailed,
    RecheckNotRun,
    SourceMismatch,
    SourceMissing,
    SubjectMismatch,
    UntrustedSigner,
    open_envelope,
)
from fusenode.storage.errors import (
    InvalidArgument,
    NoIdentityMatch,
    NotEnoughFragments,
    StorageError,
)
from fusenode.storage.manifest import Metadata
from fusenode.storage.store import open_metadata

if TYPE_CHECKING:
    from fusenode.node.service import NodeService

__all__ = ["MAX_CHAIN", "verify_model"]

#: Links a chain may have (content addressing rules out cycles; this bounds the work).
MAX_CHAIN: Final = 32


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _shapes(value: object) -> dict[str, list[int]] | None:
    """The signed input shapes, when they are shapes (name -> positive dimensions)."""
    if not isinstance(value, dict) or len(value) > 1000:
        return None
    for dims in value.values():
        if not isinstance(dims, list) or len(dims) > 16:
            return None
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            return None
    return value


#: How `fusenode.passes.verify` says it could not run the source here (not a verdict).
_CANNOT_RUN: Final = ("cannot run the models", "the original model fails to run")


class _Walk:
    def __init__(
        self,
        service: NodeService,
        identity_path: str | None,
        identities: list[Any],
        trust: list[str],
        work: Path,
    ):
        self.service = service
        self.identity_path = identity_path
        self.identities = identities
        self.trusted = set(trust) | set(service.config.trust.signers)
        self.work = work
        self.fetched = 0

    async def fetch(self, cid: str) -> Path:
        """The model ``cid`` fetched into the work folder (checked against its metadata)."""
        self.fetched += 1
        path = self.work / f"model{self.fetched}"
        await self.service.get(cid, str(path), self.identity_path)
        return path

    async def source(self, link: Link) -> tuple[Metadata, Path]:
        cid = link.source_cid
        try:
            manifest = await self.service.manifest(cid)
            _key, metadata = open_metadata(manifest, self.identities)
            path = await self.fetch(cid)
        except NoIdentityMatch:
            raise SourceMissing(
                f"the source {cid} opens with none of the identities given: cannot check it "
                "(give --identity with a key it is sealed to)"
            ) from None
        except NotEnoughFragments:
            raise  # the network, not the source: exit 7, retry later
        except StorageError as e:
            raise SourceMissing(f"the source {cid} cannot be fetched: {e}") from None
        got = await asyncio.to_thread(_sha256_file, path)
        if got != link.source_sha256:
            raise SourceMismatch(
                f"the source {cid} hashes to sha256 {got[:16]}..., the provenance names "
                f"{link.source_sha256[:16]}...: the model was not made from it"
            )
        return metadata, path

    async def recheck(self, link: Link, source: Path, model: Path) -> dict[str, Any]:
        """Run ``source`` and ``model`` here on fresh inputs and judge them by this node's own
        tolerances (`fusenode.passes.verify.TOLERANCES` for the output dtype; signed ones are
        used only where tighter). The signed input shapes are used when they are bounded
        (`RECHECK_MAX_ELEMENTS`); a run that cannot happen here is `RecheckNotRun`, never
        "outputs differ"."""
        evidence = link.verification
        shapes = _shapes(evidence.get("inputs"))
        if shapes is not None:
            elements = sum(math.prod(dims) for dims in shapes.values())
            if elements > RECHECK_MAX_ELEMENTS:
                raise RecheckNotRun(
                    f"the recheck could not run here: the signed input shapes ask for "
                    f"{elements} input elements, over the {RECHECK_MAX_ELEMENTS} this node "
                    "generates"
                )
        signed = {key: evidence.get(key) for key in ("rtol", "atol")}
        tighter = {  # the signer may only tighten this node's own tolerances, never loosen
            key: float(value)
            for key, value in signed.items()
            if isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        }
        limits = self.service.config.optimizer
        size = max(source.stat().st_size, model.stat().st_size)
        seed = secrets.randbelow(2**31)
        try:
            result = await run_verify_job(
                source,
                model,
                seed=seed,
                shapes=shapes,
                rtol=tighter.get("rtol"),
                atol=tighter.get("atol"),
                at_most_default=True,
                max_seconds=limits.max_seconds,
                max_memory=limits.max_memory or auto_memory_limit(size),
            )
        except FuseJobError as e:
            cannot = str(e).startswith(_CANNOT_RUN)
            if e.kind == "VerificationError" and not cannot:  # ran, and disagree
                raise RecheckFailed(f"run here, the models do not agree: {e}") from None
            raise RecheckNotRun(f"the recheck could not run here: {e}") from None
        outcome = {
            key: result.get(key)
            for key in ("engine", "seed", "rtol", "atol", "max_abs_error", "max_rel_error", "ok")
        }
        if not result.get("ok"):
            raise RecheckFailed(
                f"run here on fresh inputs (seed {seed}), the model's outputs differ from its "
                f"source's: max abs error {result.get('max_abs_error')}, over rtol "
                f"{result.get('rtol')} / atol {result.get('atol')} (this node's tolerances)"
            )
        return outcome


async def verify_model(
    service: NodeService,
    cid: str,
    identity_path: str | None,
    trust: list[str],
    recheck: bool,
) -> dict[str, Any]:
    """The verification of ``cid``'s provenance chain; see the module docstring."""
    for signer in trust:
        try:
            check_peer_id(signer)
        except PeerAuthError as e:
            raise InvalidArgument(f"trust: {e}") from None
    manifest = await service.manifest(cid)
    identities = service.identities(identity_path)  # a bad --identity fails before any folder
    links: list[dict[str, Any]] = []
    failure: dict[str, Any] | None = None
    current = cid
    try:
        _key, metadata = open_metadata(manifest, identities)
    except NoIdentityMatch as e:
        # Sealed metadata (where the provenance lives) that no key given opens: for this
        # node the model has no provenance it can read (exit 11, as for a plain put).
        error = NoProvenance(
            f"{cid}: no provenance this node can read: no key given opens it ({e}); give "
            "--identity with a key it is sealed to"
        )
        failure = {"type": "NoProvenance", "message": str(error), "exit_code": error.exit_code}
        return _result(cid, recheck, links, failure, current)
    work = Path(tempfile.mkdtemp(prefix=".verify-", dir=service.repo.files.tmp))
    walk = _Walk(service, identity_path, identities, trust, work)
    try:
        if metadata.attestation is None:
            raise NoProvenance(
                f"{cid} has no provenance: nothing signed says where it comes from (a model "
                "stored with a plain put, not made by `fusenode optimize`)"
            )
        model = await walk.fetch(cid)
        while metadata.attestation is not None:
            if len(links) >= MAX_CHAIN:
                raise ProvenanceError(f"the provenance chain is longer than {MAX_CHAIN} links")
            link = open_envelope(dict(metadata.attestation))
            entry: dict[str, Any] = {"cid": current, **link.summary(), "trusted": None}
            links.append(entry)
            got = await asyncio.to_thread(_sha256_file, model)
            if got != link.subject_sha256:
                raise SubjectMismatch(
                    f"{current} hashes to sha256 {got[:16]}..., its provenance was signed for "
                    f"{link.subject_sha256[:16]}...: the provenance is not this model's"
                )
            if walk.trusted:  # before the source is fetched: nothing more for a stranger
                entry["trusted"] = link.signer in walk.trusted
                if not entry["trusted"]:
                    raise UntrustedSigner(
                        f"{current} was signed by {link.signer}, who is not a trusted signer "
                        "(--trust or [trust] signers)"
                    )
            metadata, source = await walk.source(link)
            if recheck:
                entry["recheck"] = await walk.recheck(link, source, model)
            model.unlink()
            current, model = link.source_cid, source
    except ProvenanceError as e:
        failure = {"type": type(e).__name__, "message": str(e), "exit_code": e.exit_code}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _result(cid, recheck, links, failure, current)


def _result(
    cid: str,
    recheck: bool,
    links: list[dict[str, Any]],
    failure: dict[str, Any] | None,
    current: str,
) -> dict[str, Any]:
    return {
        "cid": cid,
        "verified": failure is None,
        "signer": links[0]["signer"] if links else None,
        "trusted": links[0]["trusted"] if links else None,
        "origin": current if failure is None else None,
        "links": links,
        "recheck": recheck,
        "failure": failure,
    }
