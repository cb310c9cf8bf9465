"""Errors raised by the storage layer (the hierarchy, with exit codes and HTTP statuses, is
drawn in `fusenode.errors`)."""

from fusenode.errors import Error


class StorageError(Error):
    """Base of all storage errors."""


class InvalidArgument(StorageError):
    """A parameter cannot be used: out of range, malformed, a file that is not there.

    HTTP 409, not 400: the API answers 400 only for a request that breaks its schema
    (`fusenode.node.schema`); a value the schema allows but the node cannot use is this.
    """

    exit_code = 2
    http_status = 409


class CryptoError(StorageError):
    """Encryption or decryption failed."""


class HeaderError(CryptoError):
    """Malformed age header, recipient or identity."""

    exit_code = 2
    http_status = 409


class NoIdentityMatch(CryptoError):
    """None of the identities given can open this file (wrong key)."""

    exit_code = 5
    http_status = 403


class DecryptionError(CryptoError):
    """The ciphertext failed authentication or is truncated."""

    exit_code = 6
    http_status = 502


class IntegrityError(StorageError):
    """Stored data does not match its content hash."""

    exit_code = 6
    http_status = 502


class ManifestError(StorageError):
    """The manifest is malformed or of an unsupported version."""

    http_status = 409


class BackendError(StorageError):
    """The IPFS backend failed."""


class BackendTimeout(BackendError):
    """An IPFS call did not finish before its deadline."""

    exit_code = 7
    http_status = 504


class ManifestNotFound(BackendTimeout):
    """No reachable node has the manifest a CID names."""

    exit_code = 4
    http_status = 404


class NotEnoughFragments(StorageError):
    """Fewer than k good fragments of a segment could be retrieved."""

    exit_code = 7
    http_status = 503
