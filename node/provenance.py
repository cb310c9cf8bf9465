"""Signed provenance: an in-toto Statement v1 with a SLSA provenance v1 predicate, in a DSSE
envelope signed with the optimizing node's libp2p key (docs/format.md 15, docs/design.md
"Signed provenance and verify").

The statement says: this output (subject: name and sha256 of the model bytes) was made by
this pass (externalParameters: pass, version, options) from this source (resolvedDependencies:
the source manifest's CID and the source model's sha256), by this node (builder.id:
``urn:libp2p:PEER_ID``), and here is the fusion report and the verification evidence
(byproducts). The DSSE signature covers PAE(payloadType, payload); its ``keyid`` is the
signer's peer ID. An Ed25519 peer ID holds its public key, so the signature is checked with
the key the ID itself names; an RSA peer ID (what Kubo generates by default) is a hash of its
key, so the signature carries the libp2p public key (``publicKey``, base64 of the protobuf)
and the verifier checks that it hashes to the ``keyid`` before using it.

Pure functions: no network, no repo. `sign` makes an envelope, `open_envelope` checks one
(shape, signature, then the statement) and returns the facts it proves as a `Link`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from fusenode import strictjson
from fusenode.node.errors import NodeError
from fusenode.node.peerkeys import (
    PeerAuthError,
    PeerKey,
    PublicKey,
    public_key,
    public_key_from_peer_id,
)
from fusenode.storage.manifest import canonical_json, is_valid_cid

__all__ = [
    "BUILD_TYPE",
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "BadSignature",
    "Link",
    "NoProvenance",
    "ProvenanceError",
    "RecheckFailed",
    "RecheckNotRun",
    "SourceMismatch",
    "SourceMissing",
    "SubjectMismatch",
    "UntrustedSigner",
    "builder_id",
    "make_statement",
    "open_envelope",
    "pae",
    "sign",
]

PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE: Final = "https://slsa.dev/provenance/v1"
BUILD_TYPE: Final = "urn:fusenode:optimize:v1"
_BUILDER_PREFIX: Final = "urn:libp2p:"
#: An envelope is at most this many bytes of JSON (it lives in the metadata, itself <= 1 MiB).
MAX_ENVELOPE_BYTES: Final = 512 * 1024
#: Signatures an envelope may carry (only the first valid one counts: one signer per link).
MAX_SIGNATURES: Final = 8
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


# -- errors: each failure of `fusenode verify` is its own class and exit code ------------------


class ProvenanceError(NodeError, exit_code=10, http_status=422):
    """A model's provenance does not verify: a signed statement that says something else than
    fusenode's provenance (the base; each other failure has its own class)."""


class NoProvenance(ProvenanceError, exit_code=11):
    """The model carries no signed provenance (stored with a plain put, or before signing)."""


class BadSignature(ProvenanceError, exit_code=12):
    """The envelope is malformed, tampered with, or not signed by the key its keyid names."""


class SubjectMismatch(ProvenanceError, exit_code=13):
    """The model's bytes are not the subject the statement was signed for."""


class SourceMissing(ProvenanceError, exit_code=14):
    """The source model the statement names cannot be fetched or opened."""


class SourceMismatch(ProvenanceError, exit_code=15):
    """The source model's bytes are not those the statement names."""


class UntrustedSigner(ProvenanceError, exit_code=16):
    """A valid signature by a peer that is not among the trusted signers."""


class RecheckFailed(ProvenanceError, exit_code=17):
    """Run again here, the model's outputs differ from its source's (``--recheck``)."""


class RecheckNotRun(ProvenanceError, exit_code=18):
    """``--recheck`` could not run here (signed input shapes too large, a time or memory
    limit, a model this node cannot run): nothing is known about the outputs either way."""


# -- DSSE --------------------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is signed."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def builder_id(peer_id: str) -> str:
    return _BUILDER_PREFIX + peer_id


def sign(statement: dict[str, Any], key: PeerKey) -> dict[str, Any]:
    """A DSSE envelope of ``statement`` (canonical JSON) signed with ``key``."""
    payload = canonical_json(statement)
    signature: dict[str, Any] = {
        "keyid": key.peer_id,
        "sig": base64.b64encode(key.sign(pae(PAYLOAD_TYPE, payload))).decode("ascii"),
    }
    if public_key_from_peer_id(key.peer_id) is None:  # a hashed (RSA) peer ID
        signature["publicKey"] = base64.b64encode(key.public_key_proto).decode("ascii")
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [signature],
    }
    if len(canonical_json(envelope)) > MAX_ENVELOPE_BYTES:
        raise ProvenanceError(f"the provenance is larger than {MAX_ENVELOPE_BYTES} bytes")
    return envelope


# -- the statement -----------------------------------------------------------------------------


def make_statement(
    *,
    subject_name: str,
    subject_sha256: str,
    source_cid: str,
    source_sha256: str,
    pass_name: str,
    pass_version: str,
    options: dict[str, Any],
    signer: str,
    tool_version: str,
    report: dict[str, Any],
    verification: dict[str, Any],
    started: str,
    finished: str,
    invocation: str,
) -> dict[str, Any]:
    """The in-toto Statement v1 / SLSA provenance v1 an optimizer signs for one output."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": subject_sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "pass": pass_name,
                    "version": pass_version,
                    "options": options,
                },
                "resolvedDependencies": [
                    {
                        "name": "source",
                        "uri": f"ipfs://{source_cid}",
                        "digest": {"sha256": source_sha256},
                    }
                ],
            },
            "runDetails": {
                "builder": {"id": builder_id(signer), "version": {"fusenode": tool_version}},
                "metadata": {
                    "invocationId": invocation,
                    "startedOn": started,
                    "finishedOn": finished,
                },
                "byproducts": [
                    {
                        "name": "fusion-report",
                        "mediaType": "application/json",
                        "annotations": report,
                    },
                    {
                        "name": "verification",
                        "mediaType": "application/json",
                        "annotations": verification,
                    },
                ],
            },
        },
    }


@dataclass(frozen=True)
class Link:
    """What one verified envelope proves: ``signer`` made ``subject_sha256`` from the model
    ``source_cid`` whose bytes hash to ``source_sha256``, with ``pass_name``."""

    signer: str
    subject_name: str
    subject_sha256: str
    source_cid: str
    source_sha256: str
    pass_name: str
    pass_version: str
    options: dict[str, Any]
    tool_version: str
    report: dict[str, Any]
    verification: dict[str, Any]
    statement: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """The link as `fusenode verify --json` prints it (the statement left out)."""
        return {
            "signer": self.signer,
            "subject": {"name": self.subject_name, "sha256": self.subject_sha256},
            "source": {"cid": self.source_cid, "sha256": self.source_sha256},
            "pass": self.pass_name,
            "pass_version": self.pass_version,
            "tool": f"fusenode {self.tool_version}",
            "verification": self.verification,
        }


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise BadSignature(f"the envelope's {what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadSignature(f"the envelope's {what} is not valid base64") from None


def _signer_key(signature: dict[str, Any]) -> PublicKey:
    """The key a signature's ``keyid`` names: from the peer ID itself (Ed25519) or from the
    ``publicKey`` it carries, which must hash to that peer ID (RSA)."""
    keyid = signature.get("keyid")
    if not isinstance(keyid, str):
        raise BadSignature("the signature names no signer (keyid)")
    try:
        key = public_key_from_peer_id(keyid)
        if key is None:
            if "publicKey" not in signature:
                raise BadSignature(
                    f"the signer {keyid[:60]} is a hashed peer ID and the signature carries "
                    "no publicKey"
                )
            key = public_key(_b64(signature["publicKey"], "publicKey"))
    except PeerAuthError as e:
        raise BadSignature(f"the signer's key: {e}") from None
    if key.peer_id != keyid:
        raise BadSignature(
            f"the signature's key is {key.peer_id}'s, not {keyid}'s: signed by another node"
        )
    return key


def open_envelope(envelope: Any) -> Link:
    """Check a DSSE envelope and the statement inside; the `Link` it proves.

    The signature is checked before the payload is parsed (DSSE's rule: an attacker's bytes
    reach no parser before they are known to be the signer's). Raises `BadSignature` for a
    malformed or tampered envelope and `ProvenanceError` for a signed statement that is not
    fusenode's provenance.
    """
    if not isinstance(envelope, dict):
        raise BadSignature("the provenance is not a DSSE envelope (a JSON object)")
    if len(canonical_json(envelope)) > MAX_ENVELOPE_BYTES:
        raise BadSignature(f"the envelope is larger than {MAX_ENVELOPE_BYTES} bytes")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise BadSignature(f"the envelope's payloadType is not {PAYLOAD_TYPE}")
    payload = _b64(envelope.get("payload"), "payload")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not 1 <= len(signatures) <= MAX_SIGNATURES:
        raise BadSignature(f"the envelope must carry 1 to {MAX_SIGNATURES} signatures")
    message = pae(PAYLOAD_TYPE, payload)
    signer, reasons = None, []
    for signature in signatures:
        if not isinstance(signature, dict):
            raise BadSignature("a signature of the envelope is not an object")
        try:
            key = _signer_key(signature)
            if not key.verify(_b64(signature.get("sig"), "sig"), message):
                raise BadSignature(
                    f"the signature does not verify with {key.peer_id}'s key: the provenance "
                    "was altered after it was signed, or signed by another key"
                )
        except BadSignature as e:
            reasons.append(str(e))
            continue
        signer = key.peer_id
        break
    if signer is None:
        raise BadSignature(reasons[0])
    try:
        statement = strictjson.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProvenanceError(f"the signed payload is not JSON: {e}") from None
    return _read_statement(statement, signer)


def _get(obj: Any, *path: str | int) -> Any:
    here = obj
    for step in path:
        try:
            here = here[step]
        except (KeyError, IndexError, TypeError):
            where = ".".join(str(p) for p in path)
            raise ProvenanceError(f"the signed statement lacks {where}") from None
    return here


def _sha256(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ProvenanceError(f"the signed statement's {what} is not a sha256 hex digest")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ProvenanceError(f"the signed statement's {what} is not a string")
    return value


def _read_statement(statement: Any, signer: str) -> Link:
    if _get(statement, "_type") != STATEMENT_TYPE:
        raise ProvenanceError(f"the signed payload is not an in-toto statement ({STATEMENT_TYPE})")
    if _get(statement, "predicateType") != PREDICATE_TYPE:
        raise ProvenanceError(f"the signed statement's predicate is not {PREDICATE_TYPE}")
    subjects = _get(statement, "subject")
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise ProvenanceError("the signed statement must have exactly one subject")
    build = _get(statement, "predicate", "buildDefinition")
    if _get(build, "buildType") != BUILD_TYPE:
        raise ProvenanceError(f"the signed statement's buildType is not {BUILD_TYPE}")
    deps = _get(build, "resolvedDependencies")
    if not isinstance(deps, list) or len(deps) != 1:
        raise ProvenanceError("the signed statement must name exactly one source")
    uri = _str(_get(deps, 0, "uri"), "source uri")
    source = uri.removeprefix("ipfs://")
    if source == uri or not is_valid_cid(source):
        raise ProvenanceError(f"the signed statement's source {uri[:100]!r} is not ipfs://CID")
    run = _get(statement, "predicate", "runDetails")
    if _get(run, "builder", "id") != builder_id(signer):
        raise ProvenanceError(
            f"the statement names builder {str(_get(run, 'builder', 'id'))[:80]} but was signed "
            f"by {signer}"
        )
    byproducts = {}
    listed = _get(run, "byproducts")
    for item in listed if isinstance(listed, list) else []:
        if isinstance(item, dict) and isinstance(item.get("annotations"), dict):
            byproducts[item.get("name")] = item["annotations"]
    params = _get(build, "externalParameters")
    options = params.get("options", {}) if isinstance(params, dict) else {}
    return Link(
        signer=signer,
        subject_name=_str(_get(subjects, 0, "name"), "subject name"),
        subject_sha256=_sha256(_get(subjects, 0, "digest", "sha256"), "subject digest"),
        source_cid=source,
        source_sha256=_sha256(_get(deps, 0, "digest", "sha256"), "source digest"),
        pass_name=_str(_get(params, "pass"), "pass"),
        pass_version=_str(_get(params, "version"), "pass version"),
        options=options if isinstance(options, dict) else {},
        tool_version=str(_get(run, "builder", "version", "fusenode")),
        report=byproducts.get("fusion-report", {}),
        verification=byproducts.get("verification", {}),
        statement=statement,
    )


def dumps(envelope: dict[str, Any]) -> str:
    """The envelope as the standalone file `fusenode provenance -o` writes."""
    return json.dumps(envelope, indent=2, sort_keys=True) + "\n"
