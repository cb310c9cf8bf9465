"""Manifests read block by block, bounded before anything big is fetched (node/blockread.py),
on the blocks of a real Kubo repo: local first, then peers; every block checked."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from fusenode.node.blockread import read_file
from fusenode.node.repo import Repo
from fusenode.storage.errors import IntegrityError, ManifestError, ManifestNotFound
from fusenode.storage.unixfs import CHUNK_SIZE, MAX_LINKS


@pytest.fixture(scope="module")
def kubo(tmp_path_factory):
    repo = Repo.init(tmp_path_factory.mktemp("blocks") / "node")
    with repo.open_backend() as node:
        yield node


def _add(kubo, tmp: Path, data: bytes) -> str:
    path = tmp / f"f{len(data)}"
    path.write_bytes(data)
    return kubo.add(path)


def _read(cid, *, local, remote, peers=("peer",), max_size=1 << 30, asked=None):
    async def loc(c):
        return local(c)

    async def rem(peer, c):
        if asked is not None:
            asked.append(c)
        return remote(peer, c)

    return asyncio.run(read_file(cid, max_size=max_size, local=loc, remote=rem, peers=list(peers)))


@pytest.mark.parametrize(
    "size", [0, 10, CHUNK_SIZE, CHUNK_SIZE * 3 + 1, CHUNK_SIZE * (MAX_LINKS + 2)]
)
def test_files_are_read_back_from_local_or_peer_blocks(kubo, tmp_path, size):
    data = os.urandom(size)
    cid = _add(kubo, tmp_path, data)
    assert _read(cid, local=kubo.read_block, remote=lambda p, c: None) == data
    asked: list[str] = []
    got = _read(cid, local=lambda c: None, remote=lambda p, c: kubo.read_block(c), asked=asked)
    assert got == data and asked[0] == cid


def test_a_file_over_the_bound_is_refused_from_its_root(kubo, tmp_path):
    cid = _add(kubo, tmp_path, os.urandom(CHUNK_SIZE * 4))
    asked: list[str] = []
    with pytest.raises(ManifestError, match="a manifest is at most 1000"):
        _read(
            cid,
            local=lambda c: None,
            remote=lambda p, c: kubo.read_block(c),
            max_size=1000,
            asked=asked,
        )
    assert asked == [cid]  # only the root was fetched


def test_bad_or_missing_blocks(kubo, tmp_path):
    data = os.urandom(CHUNK_SIZE * 2)
    cid = _add(kubo, tmp_path, data)
    with pytest.raises(ManifestNotFound, match="1 live peer"):
        _read(cid, local=lambda c: None, remote=lambda p, c: None)

    def corrupt_leaves(peer, c):
        block = kubo.read_block(c)
        return block if c == cid else block[:-1] + b"\0"

    with pytest.raises(IntegrityError, match="no source has it intact"):
        _read(cid, local=lambda c: None, remote=corrupt_leaves)
    # A peer that answers with a wrong root is not believed; another one is asked.
    answers = {"liar": lambda c: b"junk", "honest": kubo.read_block}
    got = _read(
        cid, local=lambda c: None, remote=lambda p, c: answers[p](c), peers=("liar", "honest")
    )
    assert got == data
    with pytest.raises(ManifestError, match="not a CIDv0"):
        _read(
            "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
            local=lambda c: None,
            remote=lambda p, c: None,
        )
