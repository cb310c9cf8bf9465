"""Erasure coding of one segment into n fragments, any k of which rebuild it.

The code is Reed-Solomon with a Cauchy matrix from Intel ISA-L, reached through pyeclib and
its bundled liberasurecode (no system library). Cauchy rather than ISA-L's Vandermonde
variant because the Cauchy matrix is MDS for every k/n, so *any* k fragments decode.
Fragments are liberasurecode's own format: an 80-byte header (index, sizes, a CRC-32 of the
header) and the data; docs/format.md section 4 gives the byte layout.

No CRC of the data (``chksum_type`` none) since format version 2: what proves a fragment's
bytes is its CID, recomputed from them (`storage.unixfs`) by every reader, and a CRC-32 on
top cost a put ~0.4 CPU s per GiB (liberasurecode computes it in software) and a get
another pass, for nothing the CID does not already catch. Version 1 fragments carry one
(``inline_crc32``); it is still checked when present.

pyeclib checks only the header by itself: ``decode`` silently decodes fragments of two
different segments, or a flipped data bit, into garbage. So
:meth:`ErasureCoder.check_fragment` checks everything it can (length, header, index, segment
size, the data CRC when there is one, and the CID recorded in the manifest), and
:meth:`ErasureCoder.decode` refuses any fragment whose header fails; a fragment's data is
the caller's to check against its CID before decoding (the readers in `storage.store` and
`node.service` do, on the fetching threads).

Threads: pyeclib's C calls hold the GIL for their whole duration (the extension never
releases it) and liberasurecode guards its instance table with a lock, so one cached driver
per (k, n) is safe to share between threads; but coding in several threads runs one at a
time, and a 64 MiB encode holds the GIL for 0.05-0.15 s, which stalls an asyncio loop in any
thread of the process. Use a process pool for parallel or latency-sensitive coding.

Speed: with glibc's default malloc policy page faults dominate; a daemon should call
:func:`tune_allocator` once at start-up (2-3x faster encode, same peak memory).
"""

from __future__ import annotations

import hashlib
import struct
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fusenode import defaults
from fusenode.storage.errors import IntegrityError, InvalidArgument, NotEnoughFragments


def _matches_cid(cid: str, data: bytes) -> bool:
    from fusenode.storage.unixfs import matches_cid  # here: reading k/n needs no hashing

    try:
        return matches_cid(cid, data)
    except ValueError as err:
        raise InvalidArgument(f"malformed CID {cid!r:.80}: {err}") from None


__all__ = [
    "ALGORITHM",
    "FRAGMENT_HEADER_SIZE",
    "ErasureCoder",
    "FragmentHeader",
    "fragment_size",
    "tune_allocator",
    "validate_parameters",
]

ALGORITHM = "isa_l_rs_cauchy"
"""The only algorithm of format versions 1 and 2; the name is pyeclib's ``ec_type``."""


FRAGMENT_HEADER_SIZE = 80

# liberasurecode's packed fragment_header_t (little-endian); see docs/format.md 4.3.
_HEADER = struct.Struct("<IIIQB32sBBIIII9s")
_MAGIC = 0x0B0C5ECC
_CHKSUM_NONE = 1  # format version 2
_CHKSUM_CRC32 = 2  # format version 1
_BACKEND_ISA_L_RS_CAUCHY = 7
_METADATA_LEN = 59  # bytes covered by metadata_chksum
assert _HEADER.size == FRAGMENT_HEADER_SIZE


def validate_parameters(k: int, n: int) -> None:
    """Refuse k/n outside 1 <= k < n <= 64 with a message the user can act on."""
    for name, value in (("k", k), ("n", n)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgument(f"erasure {name} must be an integer, got {value!r}")
    if not 1 <= k < n <= defaults.MAX_FRAGMENTS:
        raise InvalidArgument(
            f"erasure parameters k={k} n={n} are invalid: need 1 <= k < n <= {defaults.MAX_FRAGMENTS} "
            "(k fragments rebuild a segment, n are written)"
        )


def _validate_segment_size(segment_size: int) -> None:
    if not isinstance(segment_size, int) or isinstance(segment_size, bool):
        raise InvalidArgument(f"segment size must be an integer, got {segment_size!r}")
    if not 1 <= segment_size <= defaults.MAX_SEGMENT_SIZE:
        raise InvalidArgument(
            f"segment size {segment_size} is out of range 1..{defaults.MAX_SEGMENT_SIZE} bytes"
        )


def fragment_size(k: int, segment_size: int) -> int:
    """Size in bytes of every fragment of a ``segment_size``-byte segment.

    A pure function of the format (header + ceil(segment_size / k) data bytes), so the
    manifest can check recorded sizes without pyeclib; the tests pin it against the library.
    """
    return FRAGMENT_HEADER_SIZE + -(-segment_size // k)


@dataclass(frozen=True)
class FragmentHeader:
    """The fields of a fragment's 80-byte header that fusenode relies on."""

    index: int
    data_size: int
    segment_size: int
    checksum_type: int
    crc32: int
    backend_id: int
    backend_version: int
    libec_version: int

    @classmethod
    def parse(cls, fragment: bytes) -> FragmentHeader:
        """Read and check the header (magic, header CRC, length) without trusting pyeclib.

        Done in Python before pyeclib sees the bytes because liberasurecode reads ``size``
        bytes past the header without checking the buffer's length.
        """
        if len(fragment) < FRAGMENT_HEADER_SIZE:
            raise IntegrityError(
                f"fragment is {len(fragment)} bytes, shorter than its "
                f"{FRAGMENT_HEADER_SIZE}-byte header"
            )
        (
            index,
            data_size,
            _backend_metadata_size,
            segment_size,
            checksum_type,
            checksums,
            _mismatch,
            backend_id,
            backend_version,
            magic,
            libec_version,
            metadata_crc,
            _padding,
        ) = _HEADER.unpack_from(fragment)
        if magic != _MAGIC:
            raise IntegrityError("fragment header has a bad magic number (not a fragment)")
        if zlib.crc32(fragment[:_METADATA_LEN]) != metadata_crc:
            raise IntegrityError("fragment header checksum mismatch (header corrupted)")
        if len(fragment) != FRAGMENT_HEADER_SIZE + data_size:
            raise IntegrityError(
                f"fragment {index} is {len(fragment)} bytes, its header says "
                f"{FRAGMENT_HEADER_SIZE + data_size} (truncated or extended)"
            )
        return cls(
            index=index,
            data_size=data_size,
            segment_size=segment_size,
            checksum_type=checksum_type,
            crc32=int.from_bytes(checksums[:4], "little"),
            backend_id=backend_id,
            backend_version=backend_version,
            libec_version=libec_version,
        )


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Make glibc keep big buffers for reuse instead of mapping fresh pages for each segment.

    Each encode allocates about 3 segments' worth of new buffers (liberasurecode's aligned
    copies, then one Python bytes object per fragment). With glibc's defaults, blocks of a
    few MiB come from mmap and go back to the kernel on free, so every encode page-faults
    ~200 MiB of zeroed memory: that, not Reed-Solomon, dominates (measured at 64 MiB, k=4
    n=6, one core: ~400-600 MB/s before, ~1.2-1.3 GB/s after, same peak RSS). It sets a
    process-wide malloc policy (mmap only above 32 MiB; keep up to 1 GiB of freed heap), so
    it is for the daemon or CLI to call once at start-up, not done on import. Returns False
    where glibc's ``mallopt`` is unavailable (musl, macOS, Windows).
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
    return mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and ok


_drivers: dict[tuple[int, int, bool], Any] = {}
_drivers_lock = threading.Lock()


def _ec_error() -> type[Exception]:
    from pyeclib.ec_iface import ECDriverError

    return ECDriverError


def _driver(k: int, n: int, crc32: bool = False) -> Any:
    """One driver per (k, n, checksum) for the whole process: creating one builds ISA-L
    tables. Any driver decodes fragments of either checksum type. pyeclib is imported here,
    at first use: validating k/n or reading a fragment header (the config, manifests, the
    CLI's start) needs none of it."""
    key = (k, n, crc32)
    driver = _drivers.get(key)
    if driver is None:
        with _drivers_lock:
            driver = _drivers.get(key)
            if driver is None:
                from pyeclib.ec_iface import ECDriver

                chksum = "inline_crc32" if crc32 else "none"
                driver = ECDriver(ec_type=ALGORITHM, k=k, m=n - k, chksum_type=chksum)
                _drivers[key] = driver
    return driver


class ErasureCoder:
    """Encode a segment into n fragments and decode it from any k of them.

    Cheap to create (the pyeclib driver is cached per (k, n)) and safe to share between
    threads; see the module docstring for why threads do not code in parallel.
    """

    def __init__(self, k: int = defaults.K, n: int = defaults.N) -> None:
        validate_parameters(k, n)
        self.k = k
        self.n = n
        self._driver = _driver(k, n)

    def __repr__(self) -> str:
        return f"ErasureCoder(k={self.k}, n={self.n})"

    def encode(
        self, segment: bytes | bytearray | memoryview, *, crc32: bool = False
    ) -> list[bytes]:
        """Return the n fragments of ``segment``; fragment i is at position i.

        ``crc32`` writes version 1 fragments (a CRC-32 of the data in each header): only for
        rebuilding fragments of a version 1 model, whose CIDs depend on those bytes (see
        :meth:`rebuild`). Empty segments are refused: a payload is never empty
        (docs/format.md 4.1), so an empty segment means a bug in the caller's segmenting.
        """
        if not isinstance(segment, bytes):
            segment = bytes(segment)  # pyeclib accepts only bytes; this copies
        if not segment:
            raise InvalidArgument("cannot erasure-code an empty segment")
        _validate_segment_size(len(segment))
        driver = _driver(self.k, self.n, crc32) if crc32 else self._driver
        try:
            fragments = driver.encode(segment)
        except _ec_error() as err:  # pragma: no cover - would be a pyeclib bug
            raise InvalidArgument(f"erasure encoding failed: {err}") from err
        if len(fragments) != self.n:  # pragma: no cover - would be a pyeclib bug
            raise InvalidArgument(f"pyeclib returned {len(fragments)} fragments, not {self.n}")
        return fragments

    def fragment_size(self, segment_size: int) -> int:
        """Size of each fragment of a segment of ``segment_size`` bytes."""
        return fragment_size(self.k, segment_size)

    def check_fragment(
        self,
        index: int,
        data: bytes,
        segment_size: int,
        *,
        cid: str | None = None,
        sha256: str | None = None,
    ) -> None:
        """Raise IntegrityError unless ``data`` is good fragment ``index`` of such a segment.

        Meant to be called on each fragment as it arrives, so a bad one is discarded and
        another index fetched in its place. ``cid`` (from the manifest) is the check that
        holds against a deliberate forger: the bytes must hash to it, the way Kubo's ``add``
        hashes a file (`storage.unixfs`). Version 1 manifests list a ``sha256`` too: when it
        is given, it is the check instead (a version 1 fragment CID may be any CID form,
        which cannot always be recomputed).
        Without them only the header is checked (and the data CRC of a version 1 fragment):
        enough for mix-ups of index or segment, not for damaged data.
        """
        self._check_index(index)
        _validate_segment_size(segment_size)
        expected_len = self.fragment_size(segment_size)
        if len(data) != expected_len:
            raise IntegrityError(
                f"fragment {index} is {len(data)} bytes, expected {expected_len} for a "
                f"{segment_size}-byte segment at k={self.k}"
            )
        try:
            header = FragmentHeader.parse(data)
        except IntegrityError as err:
            raise IntegrityError(f"fragment {index}: {err}") from None
        if header.index != index:
            raise IntegrityError(f"fragment {index} carries index {header.index} in its header")
        if header.segment_size != segment_size:
            raise IntegrityError(
                f"fragment {index} belongs to a {header.segment_size}-byte segment, "
                f"expected {segment_size}"
            )
        if header.backend_id != _BACKEND_ISA_L_RS_CAUCHY:
            raise IntegrityError(
                f"fragment {index} was made by erasure backend {header.backend_id}, not {ALGORITHM}"
            )
        if header.checksum_type == _CHKSUM_CRC32:
            if zlib.crc32(memoryview(data)[FRAGMENT_HEADER_SIZE:]) != header.crc32:
                raise IntegrityError(f"fragment {index} data checksum mismatch (data corrupted)")
        elif header.checksum_type != _CHKSUM_NONE:
            raise IntegrityError(
                f"fragment {index} has checksum type {header.checksum_type}, neither none "
                "nor CRC-32"
            )
        if sha256 is not None:  # version 1: the SHA-256 is the check, the CID may be any form
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise IntegrityError(
                    f"fragment {index} has sha256 {actual}, manifest says {sha256}"
                )
        elif cid is not None and not _matches_cid(cid, data):
            raise IntegrityError(f"fragment {index} does not hash to its CID {cid}")

    def decode(self, fragments: Mapping[int, bytes], segment_size: int) -> bytes:
        """Rebuild a segment of ``segment_size`` bytes from k or more of its fragments.

        ``fragments`` maps fragment index to bytes. Every fragment given is checked as
        :meth:`check_fragment` does without a CID (header, index, segment size; the data CRC
        of a version 1 fragment), and a bad one raises IntegrityError naming it rather than
        being skipped. The data of a version 2 fragment is checked only by its CID: check
        each with :meth:`check_fragment` as it arrives, before decoding. Fewer than
        k fragments raise NotEnoughFragments. Data fragments are preferred: with all of
        0..k-1, decoding is a copy.
        """
        _validate_segment_size(segment_size)
        for index in fragments:
            self._check_index(index)
        if len(fragments) < self.k:
            have = ", ".join(str(i) for i in sorted(fragments)) or "none"
            raise NotEnoughFragments(
                f"a segment needs {self.k} of its {self.n} fragments, got {len(fragments)} "
                f"(indexes: {have})"
            )
        for index, data in fragments.items():
            self.check_fragment(index, data, segment_size)
        chosen = [fragments[i] for i in sorted(fragments)[: self.k]]
        try:
            segment = self._driver.decode(chosen)
        except _ec_error() as err:
            raise IntegrityError(f"erasure decoding failed: {err}") from err
        if len(segment) != segment_size:  # pragma: no cover - would be a pyeclib bug
            raise IntegrityError(
                f"decoded segment is {len(segment)} bytes, expected {segment_size}"
            )
        return segment

    def rebuild(self, fragments: Mapping[int, bytes], segment_size: int) -> list[bytes]:
        """All n fragments of a segment, byte for byte as they were written, from k of them.

        Erasure coding is deterministic, so a lost fragment re-encoded from the others has
        the bytes, and so the CID, its manifest lists: what repair relies on. That holds only
        if the fragments are re-encoded the way they were written, with or without a data
        CRC (format version 1 or 2): the given fragments' headers say which.
        """
        types = {FragmentHeader.parse(data).checksum_type for data in fragments.values()}
        if len(types) > 1:
            raise IntegrityError("the fragments of this segment mix checksum types")
        segment = self.decode(fragments, segment_size)
        return self.encode(segment, crc32=types == {_CHKSUM_CRC32})

    def _check_index(self, index: int) -> None:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.n:
            raise InvalidArgument(f"fragment index {index!r} is out of range 0..{self.n - 1}")
