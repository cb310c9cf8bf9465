"""What the components of one node share (`NodeContext`), so each takes it whole."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fusenode.node.aio import AsyncBlocks
from fusenode.node.state import State


@dataclass(frozen=True)
class NodeContext:
    """Who the node is (``peer_id``), its embedded IPFS node seen from the event loop
    (``blocks``), its state database, and its scratch folder (REPO/tmp)."""

    peer_id: str
    blocks: AsyncBlocks
    state: State
    tmp: Path
