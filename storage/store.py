"""Put and get: the storage pipeline (docs/format.md describes what it reads and writes).

put::

    file -> sha256 + age payload (streamed) -> segments -> n fragments each (erasure code)
         -> each fragment handed to a *sink* (default: add + pin on the local node), in
            parallel, at most two segments in flight -> sealed metadata + age header
         -> manifest (canonical JSON) added last: the manifest is the commit point

get::

    manifest CID -> manifest (checked against its CID) -> file key from the age header
      -> per segment: fetch data fragments 0..k-1 in parallel (next segment prefetched),
         check each against its sha256, replace a bad or missing one by another index
      -> decode -> decrypt -> plaintext sha256 and size checked -> atomic rename

Memory stays bounded by a few segments whatever the file size. This module knows nothing of
peers: the node layer passes a sink that places fragments on other nodes, and a fragment
order that puts live holders first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from storage import age
from storage.backend import IpfsBackend, validate_cid
from storage.erasure import ErasureCoder
from storage.errors import (
    BackendError,
    BackendTimeout,
    CryptoError,
    IntegrityError,
    InvalidArgument,
    NotEnoughFragments,
    StorageError,
)
from storage.manifest import (
    ENCRYPTION_AGE,
    ENCRYPTION_NONE,
    ErasureParams,
    FragmentRef,
    Manifest,
    Metadata,
    SegmentRef,
    utc_now,
)

DEFAULT_SEGMENT_SIZE = 64 * 2**20
DEFAULT_K, DEFAULT_N = 4, 6
DEFAULT_FETCH_TIMEOUT = 60.0
_READ_CHUNK = 4 * 2**20
_SEGMENTS_IN_FLIGHT = 2

#: Stores one fragment (a file) and returns its CID once it is durably held (pinned, and
#: confirmed by whichever peer must hold it). Called from worker threads.
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


def put_file(
    path: str | os.PathLike,
    backend: IpfsBackend,
    *,
    recipients: Sequence[age.Recipient] = (),
    public: bool = False,
    k: int = DEFAULT_K,
    n: int = DEFAULT_N,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    work_dir: str | os.PathLike | None = None,
    sink: FragmentSink | None = None,
    progress: Progress | None = None,
    name: str | None = None,
    provenance: dict | None = None,
    parent: str | None = None,
) -> PutResult:
    """Store a file; return its manifest CID once every fragment is stored.

    Encrypted to ``recipients`` (a fresh random file key per call, never derived from the
    content) unless ``public``.
    """
    path = Path(path)
    coder = ErasureCoder(k, n)
    if segment_size < k or segment_size > 2**30:
        raise InvalidArgument(f"segment size {segment_size} out of range ({k} .. 1 GiB)")
    if not public and not recipients:
        raise InvalidArgument("no recipient: give at least one age recipient, or store public")
    fd, size = _open_input(path)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir())
    sink = sink or _local_sink(backend)
    file_key = age.new_file_key() if not public else b""
    encryptor = age.PayloadEncryptor(file_key) if not public else None
    digest = hashlib.sha256()
    segments: list[SegmentRef] = []
    pending: list[tuple[int, int, list[Future[FragmentRef]]]] = []
    stored = 0
    buffer = bytearray()
    payload_size = 0

    with (
        contextlib.closing(_Fd(fd)),
        ThreadPoolExecutor(max_workers=max(2, n), thread_name_prefix="fusenode-put") as pool,
        tempfile.TemporaryDirectory(dir=work, prefix=".fusenode-put-") as tmp,
    ):

        def collect(oldest_only: bool) -> None:
            nonlocal stored
            while pending and (not oldest_only or len(pending) >= _SEGMENTS_IN_FLIGHT):
                index, seg_len, futures = pending.pop(0)
                refs = tuple(f.result() for f in futures)
                stored += sum(r.size for r in refs)
                segments.append(SegmentRef(index, seg_len, refs))

        def emit(segment: bytes) -> None:
            index = len(segments) + len(pending)
            fragments = coder.encode(segment)
            futures = [
                pool.submit(_store_fragment, sink, Path(tmp), index, i, frag)
                for i, frag in enumerate(fragments)
            ]
            pending.append((index, len(segment), futures))
            collect(oldest_only=True)  # backpressure: at most two segments in flight

        def feed(data: bytes) -> None:
            nonlocal buffer, payload_size
            payload_size += len(data)
            buffer += data
            while len(buffer) >= segment_size:
                emit(bytes(buffer[:segment_size]))
                del buffer[:segment_size]

        try:
            while True:
                chunk = os.read(fd, _READ_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                feed(encryptor.update(chunk) if encryptor else chunk)
                if progress:
                    progress(len(chunk))
            if encryptor:
                feed(encryptor.finalize())
            if buffer:
                emit(bytes(buffer))
            collect(oldest_only=False)
        except BaseException:
            for _, _, futures in pending:
                for f in futures:
                    f.cancel()
            raise

    metadata = Metadata(
        name=name or path.name,
        size=size,
        sha256=digest.hexdigest(),
        created=utc_now(),
        media_type="application/onnx" if path.suffix.lower() == ".onnx" else None,
        provenance=provenance,
    )
    if public:
        sealed: bytes | Metadata = metadata
        header = None
    else:
        header = age.encode_header(file_key, recipients)
        sealer = age.PayloadEncryptor(file_key)
        sealed = sealer.update(metadata.to_json()) + sealer.finalize()
    manifest = Manifest(
        created=metadata.created,
        encryption=ENCRYPTION_NONE if public else ENCRYPTION_AGE,
        erasure=ErasureParams(k, n, segment_size),
        payload_size=payload_size,
        segments=tuple(segments),
        metadata=sealed,
        age_header=header,
        parent=parent,
    )
    cid = backend.add_bytes(manifest.to_bytes())
    return PutResult(cid, manifest, size, stored)


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _local_sink(backend: IpfsBackend) -> FragmentSink:
    def sink(segment: int, index: int, path: Path) -> str:
        return backend.add(path)

    return sink


def _store_fragment(
    sink: FragmentSink, tmp: Path, segment: int, index: int, data: bytes
) -> FragmentRef:
    path = tmp / f"s{segment}-f{index}"
    path.write_bytes(data)
    try:
        sha = hashlib.sha256(data).hexdigest()
        cid = sink(segment, index, path)
    finally:
        path.unlink(missing_ok=True)
    return FragmentRef(index, cid, len(data), sha)


# -- get ---------------------------------------------------------------------------------------


def load_manifest(
    cid: str, backend: IpfsBackend, *, timeout: float = DEFAULT_FETCH_TIMEOUT, work_dir=None
) -> Manifest:
    """Fetch a manifest and check its bytes against its CID before parsing them."""
    validate_cid(cid)
    try:
        data = backend.fetch_bytes(cid, timeout)
    except BackendTimeout as e:
        raise BackendTimeout(f"manifest {cid} not found: no reachable node has it ({e})") from e
    if cid.startswith("Qm"):
        # Kubo does not re-verify blocks of its own blockstore; recompute the CID ourselves.
        with tempfile.NamedTemporaryFile(dir=work_dir, prefix=".fusenode-manifest-") as f:
            f.write(data)
            f.flush()
            actual = backend.hash_only(Path(f.name))
        if actual != cid:
            raise IntegrityError(f"manifest {cid} is corrupted: its bytes hash to {actual}")
    return Manifest.from_bytes(data)


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
    return file_key, Metadata.from_json(plain)


def get_file(
    cid: str,
    out: str | os.PathLike,
    backend: IpfsBackend,
    *,
    identities: Sequence[age.Identity] = (),
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
    order: FragmentOrder | None = None,
    progress: Progress | None = None,
    fetch: Callable[[str, float], bytes] | None = None,
) -> GetResult:
    """Retrieve, verify, decrypt and write a stored file atomically to ``out``."""
    out = Path(out)
    folder = out.parent
    if out.is_dir():
        raise InvalidArgument(f"{out}: is a directory")
    if not folder.is_dir():
        raise InvalidArgument(f"{out}: folder {folder} does not exist")
    manifest = load_manifest(cid, backend, timeout=fetch_timeout, work_dir=folder)
    file_key, metadata = open_metadata(manifest, identities)
    decryptor = age.PayloadDecryptor(file_key) if manifest.encrypted else None
    fetch = fetch or backend.fetch_bytes
    digest = hashlib.sha256()
    written = 0
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".part")
    except OSError as e:
        raise InvalidArgument(f"{out}: cannot write in {folder}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            for segment in _segments(manifest, fetch, fetch_timeout, order):
                plain = decryptor.update(segment) if decryptor else segment
                digest.update(plain)
                f.write(plain)
                written += len(plain)
                if progress:
                    progress(len(plain))
            if decryptor:
                tail = decryptor.finalize()
                digest.update(tail)
                f.write(tail)
                written += len(tail)
            f.flush()
            os.fsync(f.fileno())
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
) -> Iterator[bytes]:
    """Decoded segments in order; the next segment's fragments are fetched meanwhile."""
    coder = ErasureCoder(manifest.erasure.k, manifest.erasure.n)
    k = manifest.erasure.k
    with ThreadPoolExecutor(max_workers=2 * k, thread_name_prefix="fusenode-get") as pool:
        gatherers = [
            _SegmentFetch(seg, coder, pool, fetch, timeout, order) for seg in manifest.segments
        ]
        for i, gatherer in enumerate(gatherers):
            gatherer.start()
            if i + 1 < len(gatherers):
                gatherers[i + 1].start()
            yield gatherer.result()
            gatherers[i] = None  # type: ignore[call-overload]  # free the segment's memory


class _SegmentFetch:
    """Gets k good fragments of one segment: data fragments first, others on failure."""

    def __init__(self, segment, coder, pool, fetch, timeout, order) -> None:
        self.segment = segment
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
            ref = self.segment.fragments[index]
            self.running[self.pool.submit(self.fetch, ref.cid, self.timeout)] = index
            count -= 1

    def result(self) -> bytes:
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
            done, _ = wait(self.running, return_when=FIRST_COMPLETED)
            for future in done:
                index = self.running.pop(future)
                ref = self.segment.fragments[index]
                try:
                    data = future.result()
                    self.coder.check_fragment(index, data, self.segment.size, ref.sha256)
                except (BackendError, IntegrityError, InvalidArgument) as e:
                    self.errors.append(f"fragment {index}: {e}")
                    continue
                self.good[index] = data
        for future in self.running:  # enough: drop the stragglers
            future.cancel()
        chosen = dict(sorted(self.good.items())[:k])
        return self.coder.decode(chosen, self.segment.size)


__all__ = [
    "DEFAULT_FETCH_TIMEOUT",
    "DEFAULT_K",
    "DEFAULT_N",
    "DEFAULT_SEGMENT_SIZE",
    "FragmentOrder",
    "FragmentSink",
    "GetResult",
    "PutResult",
    "StorageError",
    "get_file",
    "load_manifest",
    "open_metadata",
    "put_file",
]
