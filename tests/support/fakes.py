"""In-memory stand-ins for unit tests of the logic above them: an IpfsBackend, a peer
network's health checks and placements.

Never used by the product: acceptance tests run on real embedded Kubo nodes.
"""

from __future__ import annotations

from pathlib import Path

from fusenode import defaults
from fusenode.node.protocol import Health, PeerList, PeerUnreachable
from fusenode.storage.backend import IpfsBackend, NodeIdentity, validate_cid
from fusenode.storage.errors import BackendTimeout
from fusenode.storage.kubo.gc import Usage
from fusenode.storage.unixfs import file_cid


def fake_cid(data: bytes) -> str:
    """The CID Kubo's add gives these bytes (readers check fragments and manifests by it)."""
    return file_cid(data)


class FakeBackend(IpfsBackend):
    def __init__(self) -> None:
        self.blocks: dict[str, bytes] = {}
        self.pinned: set[str] = set()
        self.fetches: list[str] = []

    def add(self, path: Path) -> str:
        return self.add_bytes(Path(path).read_bytes())

    def add_bytes(self, data: bytes) -> str:
        cid = fake_cid(data)
        self.blocks[cid] = bytes(data)
        self.pinned.add(cid)
        return cid

    def hash_only(self, path: Path) -> str:
        return fake_cid(Path(path).read_bytes())

    def pin(self, cid: str, timeout: float) -> None:
        self.fetch_bytes(cid, timeout)
        self.pinned.add(cid)

    def unpin(self, cid: str) -> None:
        self.pinned.discard(cid)

    def pins(self) -> set[str]:
        return set(self.pinned)

    def fetch(self, cid: str, dest: Path, timeout: float) -> None:
        Path(dest).write_bytes(self.fetch_bytes(cid, timeout))

    def fetch_bytes(self, cid: str, timeout: float) -> bytes:
        validate_cid(cid)
        self.fetches.append(cid)
        if cid not in self.blocks:  # like Kubo after its deadline: nobody provided it
            raise BackendTimeout(f"timed out after {timeout} s fetching {cid}")
        return self.blocks[cid]

    def connect(self, multiaddr: str, timeout: float) -> None:
        raise NotImplementedError

    def peers(self) -> list[str]:
        return []

    def identity(self) -> NodeIdentity:
        return NodeIdentity("12D3KooWFake", ())

    def disk_usage(self, roots) -> Usage:
        """Like the Kubo backend's (blocks read from its store): every block, and the roots."""
        stored = sum(len(b) for b in self.blocks.values())
        reached = {cid for cid in roots if cid in self.blocks}
        pinned = sum(len(self.blocks[cid]) for cid in reached)
        return Usage(stored, pinned, len(self.blocks), len(reached))

    def close(self) -> None:
        pass


def as_version_1(backend, manifest):
    """The same model as a format version 1 manifest (a SHA-256 beside each fragment CID),
    the way fusenode wrote manifests before version 2; returns its CID."""
    import dataclasses
    import hashlib

    segments = tuple(
        dataclasses.replace(
            seg,
            fragments=tuple(
                dataclasses.replace(f, sha256=hashlib.sha256(backend.blocks[f.cid]).hexdigest())
                for f in seg.fragments
            ),
        )
        for seg in manifest.segments
    )
    return backend.add_bytes(dataclasses.replace(manifest, segments=segments, version=1).to_bytes())


class FakeHealth:
    """A peer client's health checks and peer lists: the peers in ``answers`` answer, with
    those addresses; any other does not. ``lists[peer]``: the peers that one knows."""

    def __init__(self, answers: dict[str, tuple[str, ...]]) -> None:
        self.answers = dict(answers)
        self.lists: dict[str, list[Health]] = {}
        self.unpinned: list[tuple[str, list[str]]] = []

    async def peers(self, peer_id: str) -> PeerList:
        if peer_id not in self.answers:
            raise PeerUnreachable(f"peer {peer_id} did not answer")
        return PeerList(tuple(self.lists.get(peer_id, ())))

    async def unpin(self, peer_id: str, cids: list[str]) -> set[str]:
        if peer_id not in self.answers:
            raise PeerUnreachable(f"peer {peer_id} did not answer")
        self.unpinned.append((peer_id, list(cids)))
        return set(cids)

    async def health(self, peer_id: str, timeout: float = defaults.HEALTH_TIMEOUT) -> Health:
        if peer_id not in self.answers:
            raise PeerUnreachable(f"peer {peer_id} did not answer")
        return Health(peer_id, tuple(self.answers[peer_id]))
