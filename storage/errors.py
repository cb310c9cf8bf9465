"""Errors raised by the storage layer.

Every error's message is written for the user: the CLI prints ``str(err)`` as one line and
exits non-zero, the daemon turns it into a JSON error body. Hierarchy::

    StorageError
    ├── InvalidArgument      bad parameters (k/n, CID syntax, empty file, ...)
    ├── CryptoError          age format / key problems
    │   ├── HeaderError      malformed age header or recipient/identity string
    │   ├── NoIdentityMatch  none of the given identities can open the file key
    │   └── DecryptionError  payload authentication failed, truncated ciphertext
    ├── IntegrityError       a fragment, segment or manifest does not match its hash
    ├── ManifestError        malformed or unsupported manifest
    ├── BackendError         the IPFS node failed
    │   └── BackendTimeout   an IPFS call missed its deadline
    └── NotEnoughFragments   fewer than k good fragments of a segment could be had
"""


class StorageError(Exception):
    """Base of all storage errors."""


class InvalidArgument(StorageError):
    """A parameter is out of range or malformed."""


class CryptoError(StorageError):
    """Encryption or decryption failed."""


class HeaderError(CryptoError):
    """Malformed age header, recipient or identity."""


class NoIdentityMatch(CryptoError):
    """None of the identities given can open this file (wrong key)."""


class DecryptionError(CryptoError):
    """The ciphertext failed authentication or is truncated."""


class IntegrityError(StorageError):
    """Stored data does not match its content hash."""


class ManifestError(StorageError):
    """The manifest is malformed or of an unsupported version."""


class BackendError(StorageError):
    """The IPFS backend failed."""


class BackendTimeout(BackendError):
    """An IPFS call did not finish before its deadline."""


class NotEnoughFragments(StorageError):
    """Fewer than k good fragments of a segment could be retrieved."""
