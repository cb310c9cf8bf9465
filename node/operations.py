"""Every operation of the daemon's local API, declared once.

Each `Operation` names the use case it runs (a `fusenode.node.service.NodeService` method of
the same name), its route, its request (path parameters or a JSON body) and its result, as
`fusenode.node.schema` types. From this table come: the server's routes and request checks
(`fusenode.node.api`), the client's requests (`fusenode.node.client`), the checks the CLI
applies without a daemon (`fusenode.node.local`), and openapi.json (`openapi`). Nothing else
spells an operation out, so they cannot drift.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fusenode import __version__, defaults
from fusenode.node.errors import BadRequest
from fusenode.node.schema import (
    AbsolutePath,
    Array,
    Boolean,
    Field,
    Free,
    Integer,
    Nullable,
    Object,
    String,
    Type,
    type_name,
)

__all__ = ["API_PREFIX", "OPERATIONS", "Cid", "Operation", "by_name", "has_operation", "openapi"]

API_PREFIX = "/api/v1"


@dataclass(frozen=True)
class Cid(String):
    """A CID as Kubo prints them: CIDv0 (``Qm`` + 44 base58btc) or CIDv1 in base32. The
    pattern is the syntax; whether the hash inside decodes is the use case's to say."""

    pattern: str | None = r"^(Qm[1-9A-HJ-NP-Za-km-z]{44}|b[a-z2-7]{8,200})$"
    description: str = "manifest CID (CIDv0 Qm... or CIDv1 base32 b...)"

    def check(self, where: str, value: Any) -> str:
        if not isinstance(value, str):
            raise BadRequest(f"{where} must be a string, not {type_name(value)}")
        try:
            return super().check(where, value)
        except BadRequest:
            raise BadRequest(
                f"{where}: malformed CID {value[:80]!r}: expected Qm... (CIDv0) or b... "
                "(CIDv1, base32)"
            ) from None


@dataclass(frozen=True)
class Operation:
    name: str  # the operationId, and the NodeService method that runs it
    method: str
    path: str  # under API_PREFIX; {name} segments are the params
    summary: str
    result: Type
    params: Mapping[str, Type] = field(default_factory=dict)
    body: Object | None = None
    status: int = 200
    #: Runs only on a daemon (the CLI says so instead of starting the embedded node).
    daemon_only: bool = False

    @property
    def auth(self) -> bool:
        """Everything but health and this document needs the bearer token (fusenode.node.api
        says why)."""
        return self.name not in ("health", "openapi")

    @property
    def arguments(self) -> list[str]:
        """Its arguments in order: path parameters, then body keys."""
        return [*self.params, *(self.body.fields if self.body is not None else ())]

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Name positional ``args`` like a call would, and make relative paths absolute here
        (a daemon's working directory is not the caller's). Unchecked: see `check`."""
        names = self.arguments
        if len(args) > len(names):
            raise TypeError(f"{self.name} takes at most {len(names)} arguments")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{self.name} got an unexpected argument {key!r}")
            if key in values:
                raise TypeError(f"{self.name} got {key!r} twice")
            values[key] = value
        fields = self.body.fields if self.body is not None else {}
        for key, f in fields.items():
            value = values.get(key)
            kind = f.type.inner if isinstance(f.type, Nullable) else f.type
            if isinstance(kind, AbsolutePath) and isinstance(value, str | os.PathLike):
                values[key] = os.path.abspath(value)
        return values

    def check(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The use case's keyword arguments from ``values``, checked as the server checks
        them (a `BadRequest` for anything the schema refuses)."""
        out = {name: kind.check(repr(name), values[name]) for name, kind in self.params.items()}
        if self.body is not None:
            body = {k: v for k, v in values.items() if k not in self.params}
            out.update(self.body.check("request body", body))
        return out


# -- shapes ------------------------------------------------------------------------------------

RECIPIENT = String(
    pattern=r"^age1[0-9a-z]{6,8000}$",
    description="an age recipient (age1..., Bech32); whether it decodes is the use case's check",
    mismatch="not an age recipient: a recipient is an age1... or age1pq1... key in lower case",
)
_RECIPIENTS = Array(RECIPIENT, max_items=1000)
_IDENTITY_PATH = Field(
    Nullable(AbsolutePath()), None, "absolute path of an age identity file; null: the node's"
)
_TEXT = String()
_COUNT = Integer(minimum=0)
_PEER = String(description="libp2p peer ID")

IDENTITY = Object(
    {
        "peer_id": Field(_PEER),
        "addresses": Field(Array(_TEXT), description="multiaddrs peers dial this node at"),
        "recipient": Field(String(pattern="^age1"), description="the node's age recipient"),
    },
    name="Identity",
    closed=False,
)
PEER = Object(
    {
        "peer_id": Field(_PEER),
        "connected": Field(Boolean()),
        "fusenode": Field(Boolean(), False, "its fusenode daemon answers (not just IPFS)"),
        "last_seen": Field(Nullable(String()), description="when its daemon last answered"),
    },
    name="Peer",
    closed=False,
)
PUT_REQUEST = Object(
    {
        "path": Field(
            AbsolutePath(), description="absolute path of the file on this machine (read there)"
        ),
        "k": Field(
            Nullable(Integer(1, defaults.MAX_FRAGMENTS - 1)),
            None,
            "fragments needed to rebuild a segment; null: [storage] k",
        ),
        "n": Field(
            Nullable(Integer(2, defaults.MAX_FRAGMENTS)),
            None,
            "fragments stored per segment (more than k); null: [storage] n",
        ),
        "recipients": Field(_RECIPIENTS, (), "who may read it; empty and not public: this node"),
        "public": Field(Boolean(), False, "store unencrypted"),
    },
    name="PutRequest",
)
PUT_RESULT = Object(
    {
        "cid": Field(Cid(description="the manifest CID")),
        "size": Field(_COUNT, description="bytes of the file stored"),
        "encrypted": Field(Boolean()),
        "segments": Field(_COUNT),
        "k": Field(_COUNT),
        "n": Field(_COUNT),
        "placement": Field(
            String(enum=("distinct", "weak", "local")),
            description="distinct: the n fragments of a segment on n distinct nodes; weak: "
            "fewer nodes than n, some hold several; local: no network, all on this node",
        ),
        "holders": Field(
            Object(extra=_COUNT, closed=False), description="peer ID -> fragments it holds"
        ),
    },
    name="PutResult",
    closed=False,
)
GET_REQUEST = Object(
    {
        "cid": Field(Cid()),
        "output": Field(AbsolutePath(), description="absolute path to write (atomically)"),
        "identity_path": _IDENTITY_PATH,
    },
    name="GetRequest",
)
GET_RESULT = Object(
    {
        "path": Field(_TEXT),
        "size": Field(_COUNT),
        "name": Field(_TEXT, description="file name stored with the file"),
        "sha256": Field(String(pattern="^[0-9a-f]{64}$"), description="verified plaintext hash"),
    },
    name="GetResult",
    closed=False,
)
FRAGMENT_STATUS = Object(
    {
        "index": Field(_COUNT),
        "cid": Field(_TEXT),
        "peer": Field(Nullable(_TEXT), description="its holder (null: no known holder)"),
        "answered": Field(Boolean(), description="the holder answered for it just now"),
        "audit": Field(
            Nullable(
                Object(
                    {
                        "time": Field(_TEXT),
                        "result": Field(String(enum=("passed", "failed", "unanswered"))),
                        "detail": Field(Nullable(_TEXT), None),
                    },
                    name="Audit",
                    closed=False,
                )
            ),
            description="the last audit of this copy by this node (null: not audited yet, "
            "or held here)",
        ),
        "lost": Field(_TEXT, "", "why this copy no longer counts: repair rebuilds it"),
    },
    name="FragmentStatus",
    closed=False,
)
STATUS = Object(
    {
        "cid": Field(_TEXT),
        "k": Field(_COUNT),
        "n": Field(_COUNT),
        "owner": Field(Boolean(), False, "this node placed the model and repairs it"),
        "healthy": Field(Boolean()),
        "segments": Field(
            Array(
                Object(
                    {
                        "index": Field(_COUNT),
                        "fragments": Field(Array(FRAGMENT_STATUS)),
                        "distinct": Field(Boolean(), True, "each answered from another node"),
                    },
                    name="SegmentStatus",
                    closed=False,
                )
            )
        ),
    },
    name="Status",
    closed=False,
)
JOB = Object(
    {
        "id": Field(Integer(minimum=1)),
        "kind": Field(String(enum=("optimize",))),
        "source": Field(_TEXT),
        "state": Field(String(enum=("queued", "running", "done", "failed"))),
        "pass": Field(_TEXT, ""),
        "pass_version": Field(_TEXT, ""),
        "recipients": Field(Array(_TEXT), ()),
        "result": Field(Nullable(_TEXT), None, "manifest CID of the optimized model"),
        "error": Field(Nullable(_TEXT), None, "why the job failed"),
        "report": Field(Free(("object", "null")), None, "fusion, verification, timings"),
        "origin": Field(String(enum=("user", "announce")), "user"),
        "seconds": Field(Free(("number", "null")), None),
    },
    name="Job",
    closed=False,
)
_CID_ONLY = {"cid": Field(Cid())}
INFO = Object(
    {
        "cid": Field(_TEXT),
        "encrypted": Field(Boolean()),
        "k": Field(_COUNT),
        "n": Field(_COUNT),
        "readable": Field(Boolean(), description="a key opened the sealed metadata"),
        "metadata": Field(Free(("object", "null")), None, "name, size, sha256, provenance..."),
    },
    name="Info",
    closed=False,
)
_BYTES = Integer(minimum=0, description="bytes")
HEALTH = String(
    enum=("healthy", "degraded", "unavailable"),
    description="healthy: every segment counts n fragments; degraded: fewer than n but at "
    "least k (readable; repair rebuilds); unavailable: a segment counts fewer than k",
)
HELD = Object(
    {
        "peer": Field(_PEER, description="the peer this node holds them for"),
        "fragments": Field(_COUNT, description="CIDs held (fragments and their manifests)"),
        "bytes": Field(_BYTES),
    },
    name="Held",
    closed=False,
)
MODEL = Object(
    {
        "cid": Field(_TEXT, description="manifest CID"),
        "name": Field(Nullable(_TEXT), description="file name given at put (null: not recorded)"),
        "size": Field(Nullable(_COUNT), description="bytes of the file (null: not recorded)"),
        "k": Field(_COUNT),
        "n": Field(_COUNT),
        "segments": Field(_COUNT),
        "placement": Field(_TEXT, description="distinct, weak or local (see PutResult)"),
        "created": Field(_TEXT, description="when it was placed (UTC, ISO 8601)"),
        "health": Field(HEALTH),
        "degraded_segments": Field(_COUNT, description="segments counting fewer than n"),
        "fragments_counted": Field(_COUNT, description="copies not lost on live holders"),
        "holders": Field(Array(_PEER), description="peers holding its fragments"),
    },
    name="Model",
    closed=False,
)
LISTING = Object(
    {
        "models": Field(Array(MODEL), description="models this node placed (it repairs them)"),
        "held": Field(Array(HELD), description="what this node holds for other peers"),
        "shares": Field(
            Array(
                Object(
                    {
                        "cid": Field(_TEXT),
                        "source": Field(_TEXT, description="the model it grants access to"),
                        "created": Field(_TEXT),
                    },
                    name="Share",
                    closed=False,
                )
            ),
            description="shares this node made (new keys for a model; `rm` deletes one)",
        ),
    },
    name="Listing",
    closed=False,
)
_RUNS = Object(
    {
        "runs": Field(_COUNT),
        "errors": Field(_COUNT),
        "last": Field(
            Free(("object", "null")),
            None,
            "the last run since the daemon started: time, seconds, summary or error",
        ),
    },
    name="Runs",
    closed=False,
)
NODE_STATUS = Object(
    {
        "peer_id": Field(_PEER),
        "addresses": Field(Array(_TEXT)),
        "recipient": Field(_TEXT),
        "version": Field(_TEXT),
        "daemon": Field(Boolean(), description="answered by a running daemon (else offline)"),
        "uptime_seconds": Field(Free(("number", "null")), description="null: no daemon"),
        "peers": Field(
            Object(
                {
                    "known": Field(_COUNT),
                    "live": Field(_COUNT, description="daemons that answered lately"),
                    "connected": Field(_COUNT, description="IPFS swarm connections"),
                    "list": Field(
                        Array(
                            Object(
                                {
                                    "peer_id": Field(_PEER),
                                    "connected": Field(Boolean()),
                                    "live": Field(Boolean()),
                                    "last_seen": Field(Nullable(_TEXT)),
                                    "last_error": Field(Nullable(_TEXT)),
                                    "audit_score": Field(
                                        Free(("object", "null")),
                                        description="score, passed, failed (null: not audited)",
                                    ),
                                },
                                name="PeerSummary",
                                closed=False,
                            )
                        )
                    ),
                },
                name="Peers",
                closed=False,
            )
        ),
        "storage": Field(
            Object(
                {
                    "capacity": Field(
                        Free(("string", "integer")), description='[storage] capacity ("auto")'
                    ),
                    "capacity_bytes": Field(_BYTES, description="offered to peers now"),
                    "peer_quota_bytes": Field(_BYTES),
                    "held_bytes": Field(_BYTES, description="held for others"),
                    "held_fragments": Field(_COUNT),
                    "blockstore_bytes": Field(_BYTES, description="block files in REPO/kubo"),
                    "pinned_bytes": Field(_BYTES, description="what this node's pins keep"),
                    "disk_total_bytes": Field(_BYTES),
                    "disk_free_bytes": Field(_BYTES),
                },
                name="Storage",
                closed=False,
            )
        ),
        "held": Field(Array(HELD)),
        "models": Field(
            Object(
                {
                    "placed": Field(_COUNT),
                    "healthy": Field(_COUNT),
                    "degraded": Field(_COUNT),
                    "unavailable": Field(_COUNT),
                    "degraded_segments": Field(_COUNT),
                },
                name="ModelTotals",
                closed=False,
            )
        ),
        "jobs": Field(Object(extra=_COUNT, closed=False), description="jobs by state"),
        "activity": Field(
            Object(extra=_RUNS, closed=False),
            description="put, get, repair, audit, gc: runs and errors since the daemon started",
        ),
    },
    name="NodeStatus",
    closed=False,
)

VERIFY_LINK = Object(
    {
        "cid": Field(_TEXT, description="the model this link is about"),
        "signer": Field(_PEER, description="peer ID whose key signed its provenance"),
        "trusted": Field(Nullable(Boolean()), description="null: no trusted signers given"),
        "subject": Field(Free(("object",)), description="name and sha256 of the model"),
        "source": Field(Free(("object",)), description="cid and sha256 it was made from"),
        "pass": Field(_TEXT),
        "pass_version": Field(_TEXT),
        "recheck": Field(Free(("object", "null")), None, "the equivalence check run here"),
    },
    name="VerifyLink",
    closed=False,
)
VERIFY_RESULT = Object(
    {
        "cid": Field(_TEXT),
        "verified": Field(Boolean(), description="every link checked, none failed"),
        "signer": Field(Nullable(_PEER), description="who signed the model's provenance"),
        "trusted": Field(Nullable(Boolean()), description="null: no trusted signers given"),
        "origin": Field(Nullable(_TEXT), description="the chain's first model (no provenance)"),
        "links": Field(Array(VERIFY_LINK), description="the model first, then its sources"),
        "recheck": Field(Boolean()),
        "failure": Field(
            Nullable(
                Object(
                    {
                        "type": Field(_TEXT, description="error class, e.g. NoProvenance"),
                        "message": Field(_TEXT),
                        "exit_code": Field(_COUNT),
                    },
                    name="VerifyFailure",
                    closed=False,
                )
            ),
            description="why it does not verify (null: it does)",
        ),
    },
    name="VerifyResult",
    closed=False,
)

GC_REPORT = Object(
    {
        "started": Field(_TEXT, description="when it started (UTC)"),
        "seconds": Field(Free(("number",)), description="how long it took"),
        "removed_blocks": Field(_COUNT),
        "removed_bytes": Field(_COUNT),
        "blockstore_before": Field(_COUNT, description="bytes of every block file"),
        "blockstore_after": Field(_COUNT),
        "pinned_before": Field(_COUNT, description="bytes of the blocks the pins reach"),
        "pinned_after": Field(_COUNT),
    },
    name="GcReport",
    closed=False,
)
RM_RESULT = Object(
    {
        "cid": Field(_TEXT),
        "released": Field(
            Object(extra=_COUNT, closed=False),
            description="peer ID -> holds it released now (fragments and the manifest)",
        ),
        "pending": Field(
            Object(extra=_TEXT, closed=False),
            description="peer ID -> why it could not be asked now (asked again when it "
            "answers; its lease runs out anyway)",
        ),
        "local": Field(_COUNT, description="holds this node released itself"),
        "shares": Field(
            Array(_TEXT),
            description="the shares this node made of the model, removed with it",
        ),
    },
    name="RmResult",
    closed=False,
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "health",
        "GET",
        "/health",
        "Is the daemon up and serving?",
        Object({"ok": Field(Boolean())}, name="Health", closed=False),
    ),
    Operation("openapi", "GET", "/openapi.json", "This document", Free(("object",))),
    Operation("identity", "GET", "/id", "This node's peer ID, addresses, recipient", IDENTITY),
    Operation("peers", "GET", "/peers", "Peers this node knows", Array(PEER), daemon_only=True),
    Operation(
        "node_status",
        "GET",
        "/status",
        "This node: identity, peers, storage against capacity, models' health, jobs, activity",
        NODE_STATUS,
    ),
    Operation(
        "ls",
        "GET",
        "/ls",
        "The models this node placed, with their health, and what it holds for each peer",
        LISTING,
    ),
    Operation(
        "status",
        "GET",
        "/status/{cid}",
        "Where each fragment of a stored file is, and which holders answered",
        STATUS,
        params={"cid": Cid()},
        daemon_only=True,
    ),
    Operation(
        "put",
        "POST",
        "/put",
        "Store a file of this machine: encrypt, erasure-code, place fragments on peers",
        PUT_RESULT,
        body=PUT_REQUEST,
    ),
    Operation(
        "get",
        "POST",
        "/get",
        "Fetch a file by manifest CID, verify and decrypt it into a path of this machine",
        GET_RESULT,
        body=GET_REQUEST,
    ),
    Operation(
        "repair",
        "POST",
        "/repair",
        "Run a repair pass now",
        Free(("object",), description="the pass's summary: checked, unreachable, repaired..."),
        body=Object({}, name="RepairRequest", description="no options; the body may be absent"),
        daemon_only=True,
    ),
    Operation(
        "optimize",
        "POST",
        "/optimize",
        "Queue (or find) the optimization job of a stored model",
        JOB,
        body=Object(
            {
                **_CID_ONLY,
                "recipients": Field(_RECIPIENTS, (), "readers of the result; []: the source's"),
            },
            name="OptimizeRequest",
        ),
        status=202,
        daemon_only=True,
    ),
    Operation(
        "jobs", "GET", "/jobs", "Every job with its state and timing", Array(JOB), daemon_only=True
    ),
    Operation(
        "job",
        "GET",
        "/jobs/{job_id}",
        "One job",
        JOB,
        params={"job_id": Integer(minimum=1, maximum=2**63 - 1)},
        daemon_only=True,
    ),
    Operation(
        "share",
        "POST",
        "/share",
        "Grant more keys access: a new manifest CID, no fragment re-uploaded",
        Object(
            {"cid": Field(_TEXT), "source": Field(_TEXT), "added": Field(_COUNT)},
            name="ShareResult",
            closed=False,
        ),
        body=Object(
            {
                **_CID_ONLY,
                "recipients": Field(Array(RECIPIENT, min_items=1, max_items=1000)),
                "identity_path": _IDENTITY_PATH,
            },
            name="ShareRequest",
        ),
    ),
    Operation(
        "rm",
        "POST",
        "/rm",
        "Delete a model this node placed, or a share it made: its holders release it "
        "(blocks go at the next gc)",
        RM_RESULT,
        body=Object(_CID_ONLY, name="RmRequest"),
    ),
    Operation(
        "gc",
        "POST",
        "/gc",
        "Delete every block of the blockstore this node's pins do not reach",
        GC_REPORT,
        body=Object({}, name="GcRequest", description="no options; the body may be absent"),
    ),
    Operation(
        "info",
        "POST",
        "/info",
        "A model's public manifest fields, and its metadata and provenance when a key fits",
        INFO,
        body=Object({**_CID_ONLY, "identity_path": _IDENTITY_PATH}, name="InfoRequest"),
    ),
    Operation(
        "provenance",
        "POST",
        "/provenance",
        "A model's signed provenance: the DSSE envelope stored with it",
        Object(
            {
                "cid": Field(_TEXT),
                "signer": Field(Nullable(_PEER), description="null: the signature fails"),
                "problem": Field(_TEXT, "", "why the signature fails"),
                "envelope": Field(Free(("object",)), description="DSSE envelope (in-toto)"),
            },
            name="ProvenanceResult",
            closed=False,
        ),
        body=Object({**_CID_ONLY, "identity_path": _IDENTITY_PATH}, name="ProvenanceRequest"),
    ),
    Operation(
        "verify",
        "POST",
        "/verify",
        "Check a model's signed provenance link by link: signature, subject, source, signer",
        VERIFY_RESULT,
        body=Object(
            {
                **_CID_ONLY,
                "identity_path": _IDENTITY_PATH,
                "trust": Field(
                    Array(
                        String(pattern=r"^[1-9A-HJ-NP-Za-km-z]{1,128}$", description="peer ID"),
                        max_items=1000,
                    ),
                    (),
                    "trusted signers, with [trust] signers",
                ),
                "recheck": Field(Boolean(), False, "run the equivalence check again here"),
            },
            name="VerifyRequest",
        ),
    ),
)

_BY_NAME = {op.name: op for op in OPERATIONS}


def by_name(name: str) -> Operation:
    return _BY_NAME[name]


def has_operation(name: str) -> bool:
    return name in _BY_NAME


# -- openapi.json -------------------------------------------------------------------------------

#: Error statuses any operation may answer (each is a JSON Error); see fusenode.errors.
ERRORS: dict[int, str] = {
    400: "the request breaks this document's schema",
    401: "missing or wrong bearer token (every route but health and openapi.json)",
    403: "no identity given opens the model, or a cross-site browser request",
    404: "no such manifest, job or route",
    405: "method not allowed on this route (Allow header)",
    409: "the request is well-formed but cannot be carried out (k >= n, a recipient that "
    "does not decode, a file that is not there, ...)",
    413: "request body over [api] max_body_bytes",
    415: "request body not application/json in UTF-8",
    421: "Host header is not a loopback name",
    422: "the optimized model failed verification, or a model's provenance does not verify",
    500: "internal error (details in the daemon's log)",
    502: "stored data is damaged, or a peer answered with an error",
    503: "not enough fragments or nodes reachable now",
    504: "the IPFS node missed a deadline",
    507: "not enough disk for what the manifest declares (checked before any fetch)",
}

ERROR_SCHEMA = Object(
    {
        "error": Field(
            Object(
                {
                    "type": Field(_TEXT, description="the error's class, e.g. NotEnoughFragments"),
                    "message": Field(_TEXT, description="one line written for the user"),
                }
            )
        )
    },
    name="Error",
)


def _schemas(kind: Type, into: dict[str, Any]) -> dict[str, Any]:
    """``kind``'s schema with every named object moved into ``into`` and referenced."""
    if isinstance(kind, Object):
        schema = kind.schema()
        props = schema.get("properties", {})
        for key, f in kind.fields.items():
            sub = _schemas(f.type, into)
            if f.description:
                sub = {**sub, "description": f.description} if "$ref" not in sub else sub
            if not f.required and "$ref" not in sub:
                sub["default"] = props[key].get("default")
            props[key] = sub
        if kind.name:
            into[kind.name] = schema
            return {"$ref": f"#/components/schemas/{kind.name}"}
        return schema
    if isinstance(kind, Array):
        return {**kind.schema(), "items": _schemas(kind.items, into)}
    return kind.schema()


def openapi() -> dict[str, Any]:
    """The API document (served at /api/v1/openapi.json)."""
    schemas: dict[str, Any] = {}
    _schemas(ERROR_SCHEMA, schemas)
    responses = {
        str(code): {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for code, text in ERRORS.items()
    }
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        entry: dict[str, Any] = {
            "operationId": op.name,
            "summary": op.summary,
            "responses": {
                str(op.status): {
                    "description": "success",
                    "content": {"application/json": {"schema": _schemas(op.result, schemas)}},
                },
                **{
                    str(c): {"$ref": f"#/components/responses/{c}"}
                    for c in ERRORS
                    if op.auth or c != 401
                },
            },
        }
        if op.params:
            entry["parameters"] = [
                {"name": n, "in": "path", "required": True, "schema": t.schema()}
                for n, t in op.params.items()
            ]
        if op.body is not None:
            entry["requestBody"] = {
                "required": bool(op.body.fields)
                and any(f.required for f in op.body.fields.values()),
                "content": {"application/json": {"schema": _schemas(op.body, schemas)}},
            }
        if op.auth:
            entry["security"] = [{"bearerAuth": []}]
        paths.setdefault(API_PREFIX + op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fusenode daemon API",
            "version": __version__,
            "description": (
                "Local HTTP API of a fusenode daemon, for clients on the same machine (the "
                "`fusenode` CLI). Served on 127.0.0.1 only; requests whose Host header is not "
                "a loopback name are refused (421), and so are cross-site browser requests "
                "(Origin, Sec-Fetch-Site: 403). Every route but health and openapi.json needs "
                "`Authorization: Bearer <token>`, the token being in REPO/api.token (mode "
                "0600). Every error is a JSON `Error`. Request bodies are JSON objects "
                "(Content-Type: application/json, UTF-8), unknown keys are refused, and the "
                "size is capped by [api] max_body_bytes in config.toml."
            ),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [
            {
                "url": "http://127.0.0.1:{port}",
                "variables": {
                    "port": {"default": "5001", "description": "[api] port of config.toml"}
                },
            }
        ],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {str(c): r for c, r in responses.items()},
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the token in REPO/api.token (mode 0600)",
                }
            },
        },
    }
