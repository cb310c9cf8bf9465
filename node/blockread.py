"""Reading a small file (a manifest) block by block, bounded before anything big is fetched.

Kubo's Download fetches a whole object into memory (RSS ~4.5x its size) and cannot be told a
limit, so a CID handed to `get` as a "manifest" could make the node download gigabytes
before anything looks at them. Instead the daemon reads a manifest one block at a time: from
its own blockstore when it has the block, else from live fusenode peers (``GET
/peer/v1/block``, at most `unixfs.MAX_BLOCK_SIZE` bytes each). The root block comes first and
is checked against the CID; it declares the file's size, which must be within ``max_size``
before any other block is asked for; every further block is checked against the CID its
parent lists and must hold the bytes the parent says; the blocks are walked depth first, one
in memory at a time, and their number is bounded by what that size needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from fusenode.storage.errors import IntegrityError, ManifestError, ManifestNotFound
from fusenode.storage.unixfs import CHUNK_SIZE, DagNode, block_cid, parse_dag_node

__all__ = ["read_file"]

LocalBlock = Callable[[str], Awaitable[bytes | None]]
#: (peer, cid) -> the block from that peer, or None; raises when the peer does not answer.
RemoteBlock = Callable[[str, str], Awaitable[bytes | None]]

#: Peers asked at once for the root block.
_ASK_AT_ONCE = 8


async def _root(
    cid: str, local: LocalBlock, remote: RemoteBlock, peers: Sequence[str]
) -> tuple[bytes, list[str]]:
    """The root block, checked, and the peers that had it (none when it was local)."""
    block = await local(cid)
    if block is not None and block_cid(block) == cid:
        return block, []
    gate = asyncio.Semaphore(_ASK_AT_ONCE)

    async def ask(peer: str) -> bytes | None:
        async with gate:
            try:
                got = await remote(peer, cid)
            except Exception:
                return None
            return got if got is not None and block_cid(got) == cid else None

    answers = await asyncio.gather(*(ask(p) for p in peers))
    having = [p for p, got in zip(peers, answers, strict=True) if got is not None]
    if not having:
        raise ManifestNotFound(
            f"manifest {cid} not found: neither this node nor any of the {len(peers)} live "
            "peer(s) has it"
        )
    first = next(got for got in answers if got is not None)
    return first, having


async def read_file(
    cid: str,
    *,
    max_size: int,
    local: LocalBlock,
    remote: RemoteBlock,
    peers: Sequence[str],
) -> bytes:
    """The bytes of the UnixFS file ``cid`` (CIDv0, as Kubo's add makes), at most
    ``max_size`` of them; `ManifestError` for a bigger or malformed one, `IntegrityError`
    when a block does not match, `ManifestNotFound` when nobody has it."""
    if not cid.startswith("Qm"):
        raise ManifestError(f"manifest CID {cid} is not a CIDv0 (Qm...), the form Kubo's add gives")
    root, sources = await _root(cid, local, remote, peers)
    try:
        node = parse_dag_node(root)
    except ValueError as e:
        raise ManifestError(f"{cid} is not a UnixFS file: {e}") from None
    if node.filesize > max_size:
        raise ManifestError(
            f"{cid} declares {node.filesize} bytes; a manifest is at most {max_size}"
        )
    budget = 2 * (node.filesize // CHUNK_SIZE + 1) + 8  # blocks Kubo's add would make, and more

    async def block(want: str) -> bytes:
        got = await local(want)
        if got is not None and block_cid(got) == want:
            return got
        for peer in sources:
            try:
                got = await remote(peer, want)
            except Exception:
                continue
            if got is not None and block_cid(got) == want:
                return got
        raise IntegrityError(f"block {want} of {cid}: no source has it intact")

    # Depth first, one block in memory at a time; each child must hold the bytes its parent
    # says it does, so nothing beyond the declared size is ever asked for.
    out = bytearray()
    stack: list[tuple[str, int]] = []
    current: DagNode | None = node
    while True:
        if current is not None:
            if not current.links:
                out += current.data
            else:
                stack.extend(reversed(list(zip(current.links, current.blocksizes, strict=True))))
        if not stack:
            break
        want, expected = stack.pop()
        budget -= 1
        if budget < 0:
            raise ManifestError(f"{cid}: more blocks than a file of its size needs")
        try:
            current = parse_dag_node(await block(want))
        except ValueError as e:
            raise ManifestError(f"{cid}: block {want} is not a UnixFS node: {e}") from None
        if current.filesize != expected:
            raise ManifestError(
                f"{cid}: block {want} holds {current.filesize} bytes, its parent says {expected}"
            )
    if len(out) != node.filesize:
        raise ManifestError(f"{cid}: its blocks hold {len(out)} bytes, it declares {node.filesize}")
    return bytes(out)
