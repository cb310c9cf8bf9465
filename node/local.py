"""Running operations without a daemon, and finding the node that runs them.

`connect` gives the CLI (and the public Python API) one interface whatever runs the node:
the daemon serving the repo, through its HTTP API (`fusenode.node.client.DaemonClient`), or,
when none runs, `LocalNode`: the same use cases (`fusenode.node.service.NodeService`) in this
process, on the repo's embedded Kubo node started for the one call, alone on the network
(`fusenode.node.network.Offline`: every fragment stays in this repo). Requests are checked by
the same declarations either way (`fusenode.node.operations`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fusenode.node.errors import CommandError
from fusenode.node.operations import by_name, has_operation
from fusenode.node.repo import Repo

__all__ = ["LocalNode", "Node", "connect"]


class Node(Protocol):
    """Runs operations by name: ``node.call("put", path, k=4)`` or ``node.put(path, k=4)``."""

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any: ...

    def __getattr__(self, name: str) -> Callable[..., Any]: ...


class LocalNode:
    """The use cases run in this process on a repo no daemon serves."""

    #: Options only a local call has (the daemon cannot draw on the caller's terminal).
    _LOCAL_OPTIONS = frozenset({"progress"})

    def __init__(self, repo: Repo) -> None:
        self.repo = repo

    def __repr__(self) -> str:
        return f"LocalNode({str(self.repo.path)!r})"

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_") or not has_operation(name):
            raise AttributeError(name)
        return functools.partial(self.call, name)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        op = by_name(name)
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k in self._LOCAL_OPTIONS}
        if op.daemon_only:
            raise CommandError(
                f"no daemon is running on {self.repo.path}: {name} needs one "
                "(start `fusenode daemon`)"
            )
        checked = op.check(op.bind(args, kwargs))
        if name == "health":
            return {"ok": True}
        if name == "identity":  # from the repo's files: no need to start the node
            node = self.repo.node_identity()
            return {
                "peer_id": node.peer_id,
                "addresses": list(node.addresses),
                "recipient": self.repo.recipient(),
            }
        import asyncio  # here: the CLI's other commands start faster without it

        return asyncio.run(self._run(name, {**checked, **extra}))

    async def _run(self, name: str, args: dict[str, Any]) -> Any:
        from fusenode.node.aio import AsyncBlocks, Bridge
        from fusenode.node.context import NodeContext
        from fusenode.node.network import Offline
        from fusenode.node.service import NodeService
        from fusenode.node.state import State

        bridge = Bridge()
        state = State(self.repo.files.state)
        try:
            kubo = await bridge.run(self.repo.open_backend)
            try:
                blocks = AsyncBlocks(kubo, bridge)
                ctx = NodeContext(kubo.identity().peer_id, blocks, state, self.repo.files.tmp)
                service = NodeService(self.repo, ctx, Offline(ctx))
                return await getattr(service, name)(**args)
            finally:
                await bridge.run(kubo.close)
        finally:
            state.close()
            bridge.close()


def connect(repo_path: Path) -> Node:
    """The daemon serving the repo at ``repo_path`` if one runs, else a `LocalNode` on it."""
    from fusenode.node.client import find_daemon

    repo = Repo.open(repo_path)
    client = find_daemon(repo.path)
    return client if client is not None else LocalNode(repo)
