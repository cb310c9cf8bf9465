"""The files of a node repo: the one place their names are spelled.

    REPO/
      config.toml     the node's configuration (documented defaults + chosen ports)
      identity.txt    the node's age identity (mode 0600); its recipient is public
      kubo/           the embedded Kubo repo (fusenode.storage.kubo), loopback-only by default
      kubo.log        Kubo's log (rotated to kubo.log.1 past 16 MiB, at start)
      tmp/            scratch space (fragments on their way into Kubo, partial downloads)
      state.db        the node's state (SQLite: placements, holds, peers, jobs)
      api.token       the local API's bearer token (mode 0600, kept across restarts)
      api.json        how clients find a running daemon (written last, removed at stop)

The storage layer uses ``kubo/``, ``kubo.log`` and ``tmp/`` of a folder it is given; the node
layer owns the rest.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RepoLayout"]


class RepoLayout:
    """The paths of the repo at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "config.toml"
        self.identity = root / "identity.txt"
        self.kubo = root / "kubo"
        self.kubo_config = self.kubo / "config"
        self.kubo_log = root / "kubo.log"
        self.tmp = root / "tmp"
        self.state = root / "state.db"
        self.api_token = root / "api.token"
        self.api_json = root / "api.json"

    def __repr__(self) -> str:
        return f"RepoLayout({str(self.root)!r})"
