"""Errors of the node layer (the hierarchy, with exit codes and HTTP statuses, is drawn in
`fusenode.errors`). Peer-call errors live with the peer protocol (`fusenode.node.protocol`)."""

from fusenode.errors import Error


class NodeError(Error, http_status=409):
    """Base of the node layer's errors."""


class ConfigError(NodeError, exit_code=8, http_status=500):
    """Invalid configuration."""


class RepoError(NodeError, exit_code=8):
    """A problem with the repo folder (or a file it names, such as an identity)."""


class DaemonError(NodeError, exit_code=9, http_status=502):
    """A request to the daemon failed."""


class PlacementError(NodeError, exit_code=7, http_status=503):
    """Not enough reachable nodes for the requested placement."""


class NotFoundError(NodeError, exit_code=4, http_status=404):
    """The thing asked for does not exist."""


class BadRequest(NodeError, exit_code=2, http_status=400):
    """A request does not match the API's schema (a wrong type, a missing key, a bad
    pattern): the caller must change it."""


class CommandError(NodeError):
    """A command cannot do what it was asked (the CLI's own refusals)."""
