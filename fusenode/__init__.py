"""fusenode: decentralized storage and optimization for machine-learning models.

The ``fusenode`` command line is the main interface; this is the same for Python programs::

    import fusenode

    cid = fusenode.store("model.onnx", repo="~/node-a")    # through the repo's daemon, or offline
    fusenode.fetch(cid, "copy.onnx", repo="~/node-b", identity="me.key")
    report = fusenode.fuse("model.onnx", "fused.onnx", verify=True)
    node = fusenode.connect("~/node-a")                     # every operation: node.status(cid), ...

``store``, ``fetch`` and ``connect`` run on the daemon that serves the repo when one runs, else
in this process on the repo (as the CLI does); ``fuse`` runs here. Errors are
`fusenode.Error` subclasses, each with the CLI's exit code and the API's HTTP status.

Subpackages: `fusenode.storage` (encryption, erasure coding, manifests, the embedded IPFS
node), `fusenode.passes` (ONNX passes: BatchNorm fusion and its verification),
`fusenode.node` (the daemon, its API, the CLI). Importing this package loads none of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fusenode.errors import Error

if TYPE_CHECKING:
    from fusenode.node.local import Node
    from fusenode.passes.fuse import fuse_file as fuse

__version__ = "0.1.0"
__all__ = ["Error", "__version__", "connect", "fetch", "fuse", "store"]

PathLike = str | os.PathLike[str]


def connect(repo: PathLike | None = None) -> Node:
    """The node of ``repo`` (default: $FUSENODE_REPO, else ~/.fusenode): its daemon when one
    runs, else the same operations run in this process on the repo. Every API operation is a
    method: ``node.put(path)``, ``node.get(cid, output)``, ``node.status(cid)``, ..."""
    from fusenode.node.local import connect as connect_repo
    from fusenode.node.repo import default_repo_path

    return connect_repo(default_repo_path(None if repo is None else os.fspath(repo)))


def store(
    path: PathLike,
    *,
    repo: PathLike | None = None,
    k: int | None = None,
    n: int | None = None,
    recipients: Sequence[str] = (),
    public: bool = False,
) -> str:
    """Store a file (encrypted to ``recipients``, default the node's own key, unless
    ``public``; k of n erasure coding, default the repo's config); its manifest CID."""
    reply = connect(repo).put(os.fspath(path), k=k, n=n, recipients=list(recipients), public=public)
    return str(reply["cid"])


def fetch(
    cid: str,
    output: PathLike,
    *,
    repo: PathLike | None = None,
    identity: PathLike | None = None,
) -> dict[str, Any]:
    """Retrieve ``cid`` into ``output`` (every hash checked, decrypted with ``identity``,
    default the node's key); ``{"path", "size", "name", "sha256"}``."""
    key = None if identity is None else os.fspath(identity)
    return dict(connect(repo).get(cid, os.fspath(output), key))


def __getattr__(name: str) -> Any:
    # `fuse` is `fusenode.passes.fuse.fuse_file` itself (same signature and docs), imported on
    # first use so that `import fusenode` stays light.
    if name == "fuse":
        from fusenode.passes.fuse import fuse_file

        return fuse_file
    raise AttributeError(f"module 'fusenode' has no attribute {name!r}")
