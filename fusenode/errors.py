"""The one root of every error fusenode raises on purpose, and what each means at the edges.

``str(err)`` is always a one-line message written for the user. Each class carries the exit
code the CLI ends with and the HTTP status both HTTP apps (the local API and the peer API)
answer with; the edges read those attributes and keep no table of their own. Classes live
beside what raises them (borg's style); the whole family, with exit code / HTTP status::

    Error                              1 / 500   base: an error we foresaw
    ├── StorageError                   1 / 500   fusenode.storage.errors
    │   ├── InvalidArgument            2 / 409   a value that cannot be used: k >= n, a file
    │   │                                        that is not there, a CID that does not decode
    │   ├── CryptoError                1 / 500
    │   │   ├── HeaderError            2 / 409   malformed age header, recipient or identity
    │   │   ├── NoIdentityMatch        5 / 403   none of the identities given opens the file
    │   │   └── DecryptionError        6 / 502   ciphertext fails authentication
    │   ├── IntegrityError             6 / 502   data does not match its content hash
    │   ├── ManifestError              1 / 409   not a manifest, or an unknown version
    │   ├── BackendError               1 / 500   the IPFS node failed
    │   │   └── BackendTimeout         7 / 504   an IPFS call missed its deadline
    │   │       └── ManifestNotFound   4 / 404   no reachable node has the manifest
    │   ├── NotEnoughSpace             1 / 507   the disk has not room for what a manifest
    │   │                                        declares (checked before any fetch)
    │   └── NotEnoughFragments         7 / 503   fewer than k good fragments reachable
    ├── PassError                      1 / 400   fusenode.passes.errors
    │   ├── ModelFileError             1 / 400   input missing, not ONNX, invalid
    │   ├── OutputError                1 / 400   output cannot be written
    │   └── VerificationError          3 / 422   outputs differ: nothing written
    └── NodeError                      1 / 409   fusenode.node.errors
        ├── BadRequest                 2 / 400   a request that breaks the API's schema
        ├── CommandError               1 / 409   a command's own refusal (no daemon, ...)
        ├── ConfigError                8 / 500   config.toml or a FUSENODE_* variable
        ├── RepoError                  8 / 409   repo missing, existing, or damaged
        ├── DaemonError                9 / 502   talking to the local daemon failed
        ├── PlacementError             7 / 503   too few reachable nodes for the placement
        ├── NotFoundError              4 / 404   no such job or other named thing
        ├── PeerError                  7 / 502   fusenode.node.protocol: a peer call failed
        │   ├── PeerUnreachable        7 / 503   no answer (down, disconnected, no daemon)
        │   └── PeerRefused            1 / 502   the peer answered with an error
        │       └── PeerOverCapacity   1 / 502   it will not hold more for us (its 507)
        ├── BadPeerRequest             1 / 400   a peer's request is malformed
        ├── OverCapacity               1 / 507   this node will not hold more for that peer
        ├── StoreTooSlow               1 / 408   a store's body did not arrive in time
        ├── NotOwner                   1 / 403   a peer asked to release what it did not place
        ├── GcBusy                     1 / 409   the node stayed busy: no gc ran
        ├── PeerAuthError              1 / 401   a peer request's signature is not valid
        ├── FuseJobError               1 / 409   the fuse child failed or hit a limit
        ├── JobError                   1 / 409   an optimization job cannot complete
        └── ProvenanceError           10 / 422   fusenode.node.provenance: a signed statement
            │                                    that is not fusenode's provenance
            ├── NoProvenance          11 / 422   the model carries no signed provenance
            ├── BadSignature          12 / 422   envelope malformed, tampered, or not signed
            │                                    by the key its keyid names
            ├── SubjectMismatch       13 / 422   the model's bytes are not the signed subject
            ├── SourceMissing         14 / 422   the source does not resolve or open here
            ├── SourceMismatch        15 / 422   the source's bytes are not the signed ones
            ├── UntrustedSigner       16 / 422   valid signature, signer not trusted
            ├── RecheckFailed         17 / 422   run here, the outputs differ (--recheck)
            └── RecheckNotRun         18 / 422   --recheck could not run here (shapes over
                                                 the bound, a limit): outputs not judged

Why 409 and not 400 for a value that cannot be used: the local API answers 400 only for a
request that breaks its published schema (`fusenode.node.schema`), so a client (or a fuzzer)
holding openapi.json can tell its own mistakes from the node's refusals.

Exit codes, as the CLI documents them: 0 success, 1 error, 2 usage (the command line or an
argument is wrong), 3 verification failed, 4 not found, 5 no key opens the model, 6 stored
data damaged, 7 not enough of the network reachable now (retry later), 8 repo or
configuration, 9 the daemon cannot be reached, 10-18 a model's provenance does not verify
(`fusenode verify`: 11 none, 12 bad signature, 13 wrong subject, 14 source missing, 15 source
differs, 16 untrusted signer, 17 recheck: outputs differ, 18 recheck could not run here, 10 any
other), 130 interrupted.

Why a registry by class name: the daemon answers ``{"error": {"type": NAME, "message"}}``
and the CLI's client raises the same class again (:meth:`Error.named`), so a command exits
with the same code whether a daemon ran it or the CLI did offline.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "Error"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Error(Exception):
    """Base of every error fusenode raises on purpose."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500
    _by_name: ClassVar[dict[str, type[Error]]] = {}

    def __init_subclass__(
        cls, *, exit_code: int | None = None, http_status: int | None = None, **kwargs: object
    ) -> None:
        """``class X(Base, exit_code=.., http_status=..)``: what X changes of its base's."""
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code
        if http_status is not None:
            cls.http_status = http_status
        if cls.__module__.startswith("fusenode."):  # not a test's or a user's subclass
            Error._by_name.setdefault(cls.__name__, cls)

    @classmethod
    def named(cls, name: str) -> type[Error] | None:
        """The error class called ``name`` (among those imported), or None."""
        return cls._by_name.get(name) if isinstance(name, str) else None
