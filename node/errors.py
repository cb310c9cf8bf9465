"""Errors of the node layer (the hierarchy, with exit codes and HTTP statuses, is drawn in
`fusenode.errors`). Peer-call errors live with the peer protocol (`fusenode.node.protocol`)."""

from fusenode.errors import Error


class NodeError(Error):
    """Base of the node layer's errors."""

    http_status = 409


class ConfigError(NodeError):
    """Invalid configuration."""

    exit_code = 8
    http_status = 500


class RepoError(NodeError):
    """A problem with the repo folder (or a file it names, such as an identity)."""

    exit_code = 8


class DaemonError(NodeError):
    """A request to the daemon failed."""

    exit_code = 9
    http_status = 502


class PlacementError(NodeError):
    """Not enough reachable nodes for the requested placement."""

    exit_code = 7
    http_status = 503


class NotFoundError(NodeError):
    """The thing asked for does not exist."""

    exit_code = 4
    http_status = 404


class BadRequest(NodeError):
    """A request does not match the API's schema (a wrong type, a missing key, a bad
    pattern): the caller must change it."""

    exit_code = 2
    http_status = 400


class CommandError(NodeError):
    """A command cannot do what it was asked (the CLI's own refusals)."""
