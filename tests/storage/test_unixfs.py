"""Fragment and manifest CIDs computed in Python, pinned against a real embedded Kubo node.

Readers trust a fragment only if its bytes hash to the CID in the manifest, so
`storage.unixfs.file_cid` must give exactly the CID Kubo's ``add`` gives: every size class of
the balanced layout is checked against the node's own ``hash_only``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusenode.storage.kubo import KuboNode
from fusenode.storage.multiformats import b58decode
from fusenode.storage.unixfs import CHUNK_SIZE, MAX_LINKS, file_cid, matches_cid

# One chunk, chunk boundaries, the widest one-level tree (174 leaves), the first two-level
# one (175), a fragment of a 64 MiB segment at k=4 (16 MiB + the 80-byte header), and a
# two-level tree with a short last subtree.
SIZES = [
    0,
    1,
    1000,
    CHUNK_SIZE - 1,
    CHUNK_SIZE,
    CHUNK_SIZE + 1,
    5 * CHUNK_SIZE + 17,
    MAX_LINKS * CHUNK_SIZE,
    MAX_LINKS * CHUNK_SIZE + 1,
    16 * 2**20 + 80,
    (2 * MAX_LINKS + 3) * CHUNK_SIZE - 5,
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KuboNode]:
    with KuboNode(tmp_path_factory.mktemp("unixfs") / "repo") as kubo:
        yield kubo


@pytest.mark.parametrize("size", SIZES)
def test_file_cid_is_kubos_cid(node: KuboNode, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    cid = file_cid(data)
    assert cid == node.hash_only(path)
    assert matches_cid(cid, data)
    assert file_cid(memoryview(data)) == file_cid(bytearray(data)) == cid


def test_every_changed_byte_changes_the_cid() -> None:
    data = bytearray(os.urandom(3 * CHUNK_SIZE + 10))
    cid = file_cid(data)
    for position in (0, CHUNK_SIZE - 1, CHUNK_SIZE, 2 * CHUNK_SIZE + 5, len(data) - 1):
        data[position] ^= 1
        assert not matches_cid(cid, data)
        data[position] ^= 1
    assert matches_cid(cid, data)
    assert not matches_cid(cid, data[:-1])  # truncated
    assert not matches_cid(cid, data + b"\0")  # extended


def _cid_v1(codec: int, digest: bytes, hash_code: bytes = b"\x12") -> str:
    raw = bytes([1, codec]) + hash_code + bytes([len(digest)]) + digest
    return "b" + base64.b32encode(raw).decode().rstrip("=").lower()


def test_cidv1_forms() -> None:
    data = os.urandom(CHUNK_SIZE + 3)
    digest = b58decode(file_cid(data))[2:]
    assert matches_cid(_cid_v1(0x70, digest), data)  # same tree, CIDv1 spelling
    assert matches_cid(_cid_v1(0x55, hashlib.sha256(data).digest()), data)  # raw block
    assert not matches_cid(_cid_v1(0x55, digest), data)
    blake = hashlib.blake2b(data, digest_size=32).digest()
    assert not matches_cid(_cid_v1(0x70, blake, b"\xa0\xe4\x02"), data)  # not checkable
    with pytest.raises(ValueError):
        matches_cid("Qmnope", data)
