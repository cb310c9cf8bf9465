"""Errors raised by the storage layer (the hierarchy, with exit codes and HTTP statuses, is
drawn in `fusenode.errors`)."""

from fusenode.errors import Error


class StorageError(Error):
    """Base of all storage errors."""


class InvalidArgument(StorageError, exit_code=2, http_status=409):
    """A parameter cannot be used: out of range, malformed, a file that is not there.

    HTTP 409, not 400: the API answers 400 only for a request that breaks its schema
    (`fusenode.node.schema`); a value the schema allows but the node cannot use is this.
    """


class CryptoError(StorageError):
    """Encryption or decryption failed."""


class HeaderError(CryptoError, exit_code=2, http_status=409):
    """Malformed age header, recipient or identity."""


class NoIdentityMatch(CryptoError, exit_code=5, http_status=403):
    """None of the identities given can open this file (wrong key)."""


class DecryptionError(CryptoError, exit_code=6, http_status=502):
    """The ciphertext failed authentication or is truncated."""


class IntegrityError(StorageError, exit_code=6, http_status=502):
    """Stored data does not match its content hash."""


class ManifestError(StorageError, http_status=409):
    """The manifest is malformed or of an unsupported version."""


class BackendError(StorageError):
    """The IPFS backend failed."""


class BackendTimeout(BackendError, exit_code=7, http_status=504):
    """An IPFS call did not finish before its deadline."""


class ManifestNotFound(BackendTimeout, exit_code=4, http_status=404):
    """No reachable node has the manifest a CID names."""


class NotEnoughSpace(StorageError, http_status=507):
    """The disk has not room for what a manifest declares (checked before any fetch)."""


class NotEnoughFragments(StorageError, exit_code=7, http_status=503):
    """Fewer than k good fragments of a segment could be retrieved."""
