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

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RepoLayout"]


@dataclass(frozen=True)
class RepoLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def identity(self) -> Path:
        return self.root / "identity.txt"

    @property
    def kubo(self) -> Path:
        return self.root / "kubo"

    @property
    def kubo_config(self) -> Path:
        return self.kubo / "config"

    @property
    def kubo_log(self) -> Path:
        return self.root / "kubo.log"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def state(self) -> Path:
        return self.root / "state.db"

    @property
    def api_token(self) -> Path:
        return self.root / "api.token"

    @property
    def api_json(self) -> Path:
        return self.root / "api.json"
