"""Erasure coding: any k of n fragments rebuild a segment, and bad fragments are caught.

The fragment layout pinned here is documented in docs/format.md section 4.3.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import platform
import random
import struct
import threading
import zlib

import pytest
from pyeclib.ec_iface import ECDriver

from fusenode.defaults import MAX_SEGMENT_SIZE
from fusenode.storage.erasure import (
    FRAGMENT_HEADER_SIZE,
    ErasureCoder,
    FragmentHeader,
    fragment_size,
    tune_allocator,
    validate_parameters,
)
from fusenode.storage.errors import IntegrityError, InvalidArgument, NotEnoughFragments
from fusenode.storage.unixfs import file_cid

CORNERS = [(1, 2), (1, 64), (63, 64), (4, 6), (10, 16), (29, 64)]


def _segment(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def version_1_fragments(k: int, n: int, segment: bytes) -> list[bytes]:
    """Fragments as format version 1 wrote them: with a CRC-32 of the data in the header."""
    return ECDriver(ec_type="isa_l_rs_cauchy", k=k, m=n - k, chksum_type="inline_crc32").encode(
        segment
    )


def _flip(data: bytes, position: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 0x01
    return bytes(out)


# --- parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n"), [(0, 1), (1, 1), (4, 4), (5, 4), (0, 6), (-1, 3), (1, 65), (64, 65), (64, 64)]
)
def test_out_of_range_parameters_are_refused(k: int, n: int) -> None:
    with pytest.raises(InvalidArgument, match="1 <= k < n <= 64"):
        ErasureCoder(k, n)


@pytest.mark.parametrize(("k", "n"), [("4", 6), (4.0, 6), (True, 6), (4, None)])
def test_non_integer_parameters_are_refused(k: object, n: object) -> None:
    with pytest.raises(InvalidArgument, match="must be an integer"):
        validate_parameters(k, n)  # type: ignore[arg-type]


def test_defaults_are_4_of_6() -> None:
    coder = ErasureCoder()
    assert (coder.k, coder.n) == (4, 6)


def test_driver_is_cached_per_k_n() -> None:
    assert ErasureCoder(4, 6)._driver is ErasureCoder(4, 6)._driver
    assert ErasureCoder(4, 6)._driver is not ErasureCoder(4, 7)._driver


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), CORNERS)
def test_range_corners_round_trip(k: int, n: int) -> None:
    coder = ErasureCoder(k, n)
    segment = _segment(10_007, seed=k * 100 + n)  # prime: never a multiple of k > 1
    fragments = coder.encode(segment)
    assert len(fragments) == n
    assert {len(f) for f in fragments} == {fragment_size(k, len(segment))}
    everything = dict(enumerate(fragments))
    first = {i: fragments[i] for i in range(k)}
    last = {i: fragments[i] for i in range(n - k, n)}
    rng = random.Random(n)
    samples = [{i: fragments[i] for i in rng.sample(range(n), k)} for _ in range(5)]
    for subset in [everything, first, last, *samples]:
        assert coder.decode(subset, len(segment)) == segment


def test_whole_range_round_trips() -> None:
    """All 2016 pairs 1 <= k < n <= 64 decode from their last k (mostly parity) fragments."""
    rng = random.Random(7)
    for n in range(2, 65):
        for k in range(1, n):
            coder = ErasureCoder(k, n)
            segment = rng.randbytes(rng.randint(1, 1000))
            fragments = coder.encode(segment)
            last = {i: fragments[i] for i in range(n - k, n)}
            assert coder.decode(last, len(segment)) == segment, (k, n)


@pytest.mark.parametrize(("k", "n"), [(1, 3), (2, 4), (3, 5), (4, 6), (10, 16)])
def test_every_k_subset_decodes(k: int, n: int) -> None:
    """The code is MDS. (10, 16) is where ISA-L's Vandermonde variant fails 46 of 8008."""
    coder = ErasureCoder(k, n)
    segment = _segment(1000 + k)
    fragments = coder.encode(segment)
    for subset in itertools.combinations(range(n), k):
        assert coder.decode({i: fragments[i] for i in subset}, len(segment)) == segment


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 9, 10, 11, 15, 16, 17, 4095, 65_537])
@pytest.mark.parametrize(("k", "n"), [(4, 6), (10, 16)])
def test_edge_sizes_round_trip_from_parity(size: int, k: int, n: int) -> None:
    coder = ErasureCoder(k, n)
    segment = _segment(size, seed=size)
    fragments = coder.encode(segment)
    assert len(fragments[0]) == FRAGMENT_HEADER_SIZE + -(-size // k)
    last = {i: fragments[i] for i in range(n - k, n)}
    assert coder.decode(last, size) == segment


def test_empty_segment_is_refused() -> None:
    # A payload is never empty, so neither is a segment (docs/format.md 4.1).
    with pytest.raises(InvalidArgument, match="empty segment"):
        ErasureCoder(4, 6).encode(b"")


def test_bytes_like_input_is_accepted() -> None:
    coder = ErasureCoder(3, 5)
    segment = _segment(999)
    expected = coder.encode(segment)
    assert coder.encode(bytearray(segment)) == expected
    assert coder.encode(memoryview(segment)) == expected


def test_code_is_systematic() -> None:
    """Data fragment i is the segment's i-th slice, zero-padded (format.md 4.3 says so)."""
    coder = ErasureCoder(4, 6)
    segment = _segment(1001)
    fragments = coder.encode(segment)
    width = -(-len(segment) // 4)
    for i in range(4):
        expected = segment[i * width : (i + 1) * width].ljust(width, b"\0")
        assert fragments[i][FRAGMENT_HEADER_SIZE:] == expected


@pytest.mark.parametrize("k", [1, 2, 3, 7, 13, 31, 63])
def test_fragment_size_formula_matches_library(k: int) -> None:
    coder = ErasureCoder(k, 64)
    for size in (1, k - 1 or 1, k, k + 1, 12_345):
        assert [len(f) for f in coder.encode(bytes(size))] == [fragment_size(k, size)] * 64


def test_segment_size_limit() -> None:
    coder = ErasureCoder(4, 6)
    with pytest.raises(InvalidArgument, match="out of range"):
        coder.decode({}, MAX_SEGMENT_SIZE + 1)
    with pytest.raises(InvalidArgument, match="out of range"):
        coder.check_fragment(0, b"", 0)


# --- the fragment layout ----------------------------------------------------------------


def test_header_layout_matches_format_doc() -> None:
    coder = ErasureCoder(4, 6)
    segment = _segment(1000)
    fragment = coder.encode(segment)[5]
    (
        idx,
        size,
        backend_meta,
        orig,
        chksum_type,
        chksum,
        mismatch,
        backend_id,
        _backend_version,
        magic,
        _libec_version,
        metadata_crc,
        padding,
    ) = struct.unpack("<IIIQB32sBBIIII9s", fragment[:80])
    assert (idx, size, backend_meta, orig) == (5, 250, 0, 1000)
    assert (chksum_type, mismatch, backend_id, magic) == (1, 0, 7, 0x0B0C5ECC)  # 1: none
    assert chksum == bytes(32)
    assert metadata_crc == zlib.crc32(fragment[:59])
    # Version 1 fragments (still read) carry a CRC-32 of the data in the same place.
    old = version_1_fragments(4, 6, segment)[5]
    assert old[80:] == fragment[80:] and old[20] == 2
    assert old[21:53] == zlib.crc32(old[80:]).to_bytes(4, "little") + bytes(28)
    assert padding == bytes(9)
    header = FragmentHeader.parse(fragment)
    library = coder._driver.get_metadata(fragment, 1)
    assert (header.index, header.data_size, header.segment_size) == (
        library["index"],
        library["size"],
        library["orig_data_size"],
    )
    assert header.backend_version == library["backend_version"]


def test_fragments_are_stable() -> None:
    """Golden bytes: fragments written today must decode tomorrow.

    If this fails after a pyeclib/liberasurecode/ISA-L upgrade, the code itself changed and
    stored fragments may no longer decode: that needs a new algorithm name (format.md 11),
    not a new hash here. The two version fields of the header (and the header CRC that
    covers one of them) are left out: they legitimately record the writer's versions.
    """
    segment = bytes(range(256)) * 4 + b"tail"
    for fragments, golden in (
        (ErasureCoder(4, 6).encode(segment), GOLDEN_FRAGMENTS_SHA256),
        (version_1_fragments(4, 6, segment), GOLDEN_VERSION_1_FRAGMENTS_SHA256),
    ):
        digest = hashlib.sha256()
        for f in fragments:
            digest.update(f[:55] + f[59:63] + f[71:])
        assert digest.hexdigest() == golden


GOLDEN_FRAGMENTS_SHA256 = "169a7f44f2b81ecc3c0ec2939060f4712b46211b85ca9d1e14a756ddee6522ab"
GOLDEN_VERSION_1_FRAGMENTS_SHA256 = (
    "6fb7c0936999916e5e6af8b808e8a0d265ccb036d54dfcb12e470f28dfad9ed7"
)


def test_fragments_written_by_pyeclib_1_8_still_decode() -> None:
    """Fragments 1 and 2 of b"fusenode, 1 of 3" at k=2 n=3, written with pyeclib 1.8.0
    (liberasurecode 1.8.0, ISA-L 2.14.1). Decoding needs the parity fragment, so this fails
    if the Cauchy matrix ever changes: stored models would become unreadable.
    """
    stored = {
        1: bytes.fromhex(
            "010000000800000000000000100000000000000002937fea0f00000000000000000000000000"
            "0000000000000000000000000000000007010e0200cc5e0c0b00080100480ccba70000000000"
            "000000002c2031206f662033"
        ),
        2: bytes.fromhex(
            "020000000800000000000000100000000000000002e025ef1200000000000000000000000000"
            "0000000000000000000000000000000007010e0200cc5e0c0b00080100925619b70000000000"
            "00000000dc5f5357129bd9ad"
        ),
    }
    assert ErasureCoder(2, 3).decode(stored, 16) == b"fusenode, 1 of 3"


# --- integrity --------------------------------------------------------------------------

# Bytes of the header that no CRC covers: libec_version (63..66) and padding (71..79).
# Only the CID from the manifest notices a change there (format.md 4.3), and in the data of
# a version 2 fragment (no data CRC).
_UNCOVERED = set(range(63, 67)) | set(range(71, 80))


@pytest.mark.parametrize("version", [1, 2])
def test_every_flipped_byte_is_detected(version: int) -> None:
    coder = ErasureCoder(3, 5)
    segment = _segment(20)
    fragments = coder.encode(segment) if version == 2 else version_1_fragments(3, 5, segment)
    good = fragments[4]
    cid, sha = file_cid(good), hashlib.sha256(good).hexdigest()
    coder.check_fragment(4, good, len(segment), cid=cid)
    coder.check_fragment(4, good, len(segment), cid=cid, sha256=sha)  # version 1 manifests
    uncovered = _UNCOVERED | (set(range(80, len(good))) if version == 2 else set())
    for position in range(len(good)):
        bad = _flip(good, position)
        with pytest.raises(IntegrityError, match="fragment 4"):
            coder.check_fragment(4, bad, len(segment), cid=cid)
        with pytest.raises(IntegrityError, match="fragment 4"):
            coder.check_fragment(4, bad, len(segment), sha256=sha)
        if position not in uncovered:
            with pytest.raises(IntegrityError, match="fragment 4"):
                coder.check_fragment(4, bad, len(segment))
            with pytest.raises(IntegrityError, match="fragment 4"):
                coder.decode({0: fragments[0], 1: fragments[1], 4: bad}, len(segment))


def test_corrupted_fragment_is_replaced_by_another() -> None:
    coder = ErasureCoder(4, 6)
    segment = _segment(100_000)
    fragments = coder.encode(segment)
    cids = [file_cid(f) for f in fragments]
    received = {i: fragments[i] for i in range(4)}
    received[2] = _flip(received[2], 5000)  # a node's disk rotted
    good = {}
    for index, data in received.items():
        try:
            coder.check_fragment(index, data, len(segment), cid=cids[index])
        except IntegrityError:
            continue
        good[index] = data
    assert sorted(good) == [0, 1, 3]
    with pytest.raises(NotEnoughFragments, match="needs 4 of its 6 fragments, got 3"):
        coder.decode(good, len(segment))
    coder.check_fragment(5, fragments[5], len(segment), cid=cids[5])
    good[5] = fragments[5]
    assert coder.decode(good, len(segment)) == segment


def test_decode_refuses_corrupt_fragment_even_when_enough_good_ones() -> None:
    coder = ErasureCoder(4, 6)
    segment = _segment(4096)
    fragments = dict(enumerate(coder.encode(segment)))
    fragments[5] = _flip(fragments[5], 20)  # its header; not even needed for decoding
    with pytest.raises(IntegrityError, match="fragment 5: fragment header checksum mismatch"):
        coder.decode(fragments, len(segment))
    old = dict(enumerate(version_1_fragments(4, 6, segment)))
    old[5] = _flip(old[5], 100)  # data: a version 1 fragment's CRC catches it
    with pytest.raises(IntegrityError, match="fragment 5 data checksum mismatch"):
        coder.decode(old, len(segment))
    old[5] = fragments[5] = coder.encode(segment)[5]
    assert coder.decode(old, len(segment)) == segment  # versions mix: same code, same data


def test_fragment_of_another_segment_is_caught_by_its_cid() -> None:
    """Same size, valid header and CRC: only the manifest's CID (or v1's SHA-256) can tell."""
    coder = ErasureCoder(4, 6)
    mine, other = coder.encode(_segment(4096, 1)), coder.encode(_segment(4096, 2))
    coder.check_fragment(2, other[2], 4096)  # indistinguishable without the manifest
    with pytest.raises(
        IntegrityError, match=f"fragment 2 does not hash to its CID {file_cid(mine[2])}"
    ):
        coder.check_fragment(2, other[2], 4096, cid=file_cid(mine[2]))
    with pytest.raises(IntegrityError, match="fragment 2 has sha256"):
        coder.check_fragment(2, other[2], 4096, sha256=hashlib.sha256(mine[2]).hexdigest())
    with pytest.raises(InvalidArgument, match="malformed CID"):
        coder.check_fragment(2, mine[2], 4096, cid="Qmnope")


def test_fragment_under_wrong_index_is_caught() -> None:
    coder = ErasureCoder(4, 6)
    segment = _segment(4096)
    fragments = coder.encode(segment)
    with pytest.raises(IntegrityError, match="fragment 1 carries index 2"):
        coder.check_fragment(1, fragments[2], len(segment))
    with pytest.raises(IntegrityError, match="fragment 1 carries index 2"):
        coder.decode({0: fragments[0], 1: fragments[2], 3: fragments[3], 4: fragments[4]}, 4096)


def test_wrong_segment_size_is_caught() -> None:
    coder = ErasureCoder(4, 6)
    fragments = coder.encode(_segment(4096))
    with pytest.raises(IntegrityError, match="belongs to a 4096-byte segment, expected 4095"):
        coder.check_fragment(0, fragments[0], 4095)  # same fragment length, other size
    with pytest.raises(IntegrityError, match="is 1104 bytes, expected 1105"):
        coder.check_fragment(0, fragments[0], 4097)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda f: b"",
        lambda f: f[:10],
        lambda f: f[:80],
        lambda f: f[:-1],
        lambda f: f + b"\0",
        lambda f: bytes(len(f)),
        lambda f: os.urandom(len(f)),
    ],
    ids=["empty", "10-bytes", "header-only", "truncated", "extended", "zeros", "random"],
)
def test_malformed_fragments_never_reach_pyeclib(mangle) -> None:  # type: ignore[no-untyped-def]
    coder = ErasureCoder(4, 6)
    segment = _segment(1000)
    fragments = dict(enumerate(coder.encode(segment)))
    fragments[0] = mangle(fragments[0])
    with pytest.raises(IntegrityError, match="fragment 0"):
        coder.check_fragment(0, fragments[0], len(segment))
    with pytest.raises(IntegrityError, match="fragment 0"):
        coder.decode(fragments, len(segment))


def test_fragment_header_parse_refuses_garbage() -> None:
    with pytest.raises(IntegrityError, match="shorter than its 80-byte header"):
        FragmentHeader.parse(b"abc")
    with pytest.raises(IntegrityError, match="bad magic"):
        FragmentHeader.parse(bytes(80))


# --- not enough, bad indexes ------------------------------------------------------------


def test_fewer_than_k_fragments() -> None:
    coder = ErasureCoder(4, 6)
    segment = _segment(1000)
    fragments = coder.encode(segment)
    with pytest.raises(NotEnoughFragments, match=r"got 3 \(indexes: 1, 4, 5\)"):
        coder.decode({1: fragments[1], 4: fragments[4], 5: fragments[5]}, len(segment))
    with pytest.raises(NotEnoughFragments, match=r"got 0 \(indexes: none\)"):
        coder.decode({}, len(segment))


@pytest.mark.parametrize("index", [-1, 6, 64, True, "0"])
def test_index_out_of_range(index: object) -> None:
    coder = ErasureCoder(4, 6)
    fragments = coder.encode(b"x" * 100)
    with pytest.raises(InvalidArgument, match=r"out of range 0\.\.5"):
        coder.check_fragment(index, fragments[0], 100)  # type: ignore[arg-type]
    given = {index: fragments[0], 1: fragments[1], 2: fragments[2], 3: fragments[3]}
    with pytest.raises(InvalidArgument, match=r"out of range 0\.\.5"):
        coder.decode(given, 100)  # type: ignore[arg-type]


# --- threads ----------------------------------------------------------------------------


def test_one_coder_shared_by_threads() -> None:
    coder = ErasureCoder(4, 6)
    segments = [_segment(50_000 + i, seed=i) for i in range(4)]
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            segment = rng.choice(segments)
            fragments = coder.encode(segment)
            chosen = {i: fragments[i] for i in rng.sample(range(6), 4)}
            if coder.decode(chosen, len(segment)) != segment:
                errors.append(f"thread {seed}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_tune_allocator_is_idempotent_and_harmless() -> None:
    first, second = tune_allocator(), tune_allocator()
    assert first == second
    if platform.libc_ver()[0] == "glibc":
        assert first is True
    coder = ErasureCoder(4, 6)
    segment = _segment(300_000)
    assert coder.decode(dict(enumerate(coder.encode(segment))), len(segment)) == segment


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(("k", "n"), [(1, 2), (2, 3), (4, 6), (10, 16)])
def test_rebuild_gives_back_the_same_bytes(version: int, k: int, n: int) -> None:
    """Repair re-creates lost fragments under the CIDs the manifest lists, so rebuilding
    must reproduce every byte, also for version 1 fragments (with a data CRC)."""
    coder = ErasureCoder(k, n)
    segment = _segment(10_000 + k)
    written = coder.encode(segment) if version == 2 else version_1_fragments(k, n, segment)
    survivors = {i: written[i] for i in range(n - k, n)}  # the first n - k are lost
    assert coder.rebuild(survivors, len(segment)) == written
    assert [file_cid(f) for f in coder.rebuild(survivors, len(segment))] == [
        file_cid(f) for f in written
    ]


def test_rebuild_refuses_mixed_checksum_types() -> None:
    coder = ErasureCoder(2, 3)
    segment = _segment(1000)
    mixed = {0: coder.encode(segment)[0], 1: version_1_fragments(2, 3, segment)[1]}
    with pytest.raises(IntegrityError, match="mix checksum types"):
        coder.rebuild(mixed, len(segment))
