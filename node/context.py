"""What the components of one node share (`NodeContext`), so each takes it whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fusenode.node.aio import AsyncBlocks
from fusenode.node.state import State

if TYPE_CHECKING:
    from fusenode.node.gc import Gate


def _gate() -> Gate:
    from fusenode.node.gc import Gate

    return Gate()


@dataclass(frozen=True)
class NodeContext:
    """Who the node is (``peer_id``), its embedded IPFS node seen from the event loop
    (``blocks``), its state database, its scratch folder (REPO/tmp), and the gate that
    holds its operations out while a garbage collection runs (`fusenode.node.gc.Gate`)."""

    peer_id: str
    blocks: AsyncBlocks
    state: State
    tmp: Path
    gate: Gate = field(default_factory=_gate)
