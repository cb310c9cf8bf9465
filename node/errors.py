"""Errors of the node layer; ``str(err)`` is a one-line message for the user.

Errors from storage (``storage.errors.StorageError``) and passes (``passes.errors.PassError``)
reach the edges unchanged; the CLI and the HTTP API map all three families.

    NodeError
    ├── ConfigError      config.toml or a FUSENODE_* variable is invalid
    ├── RepoError        the repo is missing, already exists, or is damaged
    ├── DaemonError      talking to a running daemon failed
    ├── PlacementError   too few reachable nodes for the placement asked for
    └── NotFoundError    no such job (or other named thing)
"""


class NodeError(Exception):
    """Base of the node layer's errors."""


class ConfigError(NodeError):
    """Invalid configuration."""


class RepoError(NodeError):
    """A problem with the repo folder."""


class DaemonError(NodeError):
    """A request to the daemon failed."""


class PlacementError(NodeError):
    """Not enough reachable nodes for the requested placement."""


class NotFoundError(NodeError):
    """The thing asked for does not exist."""
