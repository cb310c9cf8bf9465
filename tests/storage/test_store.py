"""The put/get pipeline's logic on an in-memory backend: round trips, damage, wrong keys."""

from __future__ import annotations

import os

import pyrage
import pytest

from fusenode.storage import age
from fusenode.storage.errors import (
    BackendError,
    IntegrityError,
    InvalidArgument,
    ManifestError,
    NoIdentityMatch,
    NotEnoughFragments,
)
from fusenode.storage.manifest import Manifest, padme
from fusenode.storage.store import get_file, load_manifest, put_file
from tests.support.fakes import FakeBackend, as_version_1

SEG = 4096 + 17  # small segments: many of them, the last one short


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def ident():
    return age.X25519Identity.generate()


def write(tmp_path, size, name="model.onnx"):
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.parametrize("size", [1, 100, SEG, 3 * SEG, 65536, 65536 * 2 + 5])
@pytest.mark.parametrize(("k", "n"), [(4, 6), (1, 2), (3, 7)])
def test_round_trip_encrypted(backend, ident, tmp_path, size, k, n):
    src = write(tmp_path, size)
    put = put_file(
        src, backend, recipients=[ident.recipient], k=k, n=n, segment_size=SEG, work_dir=tmp_path
    )
    assert put.manifest.erasure.k == k and len(put.manifest.segments[0].fragments) == n
    got = get_file(put.cid, tmp_path / "out.bin", backend, identities=[ident])
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    assert got.metadata.name == "model.onnx" and got.metadata.size == size


def test_round_trip_public(backend, tmp_path):
    src = write(tmp_path, 3 * SEG + 1)
    put = put_file(src, backend, public=True, segment_size=SEG, work_dir=tmp_path)
    assert not put.manifest.encrypted
    get_file(put.cid, tmp_path / "o", backend)
    assert (tmp_path / "o").read_bytes() == src.read_bytes()


def test_name_size_hash_not_in_clear(backend, ident, tmp_path):
    src = write(tmp_path, 5000, name="secret-model-name.onnx")
    put = put_file(src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path)
    raw = backend.blocks[put.cid]
    assert b"secret-model-name" not in raw
    import hashlib

    assert hashlib.sha256(src.read_bytes()).hexdigest().encode() not in raw


def test_fresh_file_key_per_put(backend, ident, tmp_path):
    src = write(tmp_path, 10000)
    a = put_file(src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path)
    b = put_file(src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path)
    assert not set(a.manifest.fragment_cids()) & set(b.manifest.fragment_cids())


def test_reassembled_ciphertext_is_a_standard_age_file(backend, ident, tmp_path):
    """header || fragments decoded: pyrage (an independent implementation) decrypts it."""
    from fusenode.storage.erasure import ErasureCoder

    src = write(tmp_path, 3 * SEG)
    put = put_file(src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path)
    m = put.manifest
    coder = ErasureCoder(m.erasure.k, m.erasure.n)
    payload = b"".join(
        coder.decode({f.index: backend.blocks[f.cid] for f in s.fragments}, s.size)
        for s in m.segments
    )
    rage_id = pyrage.x25519.Identity.from_str(ident.to_string())
    # Version 3: the model, then zeros up to its Padmé bucket, all inside the age plaintext.
    size = 3 * SEG
    assert m.version == 3 and padme(size) > size
    plain = pyrage.decrypt(m.age_header + payload, [rage_id])
    assert plain == src.read_bytes() + bytes(padme(size) - size)


def test_corrupted_and_missing_fragments_replaced(backend, ident, tmp_path):
    src = write(tmp_path, 3 * SEG)
    put = put_file(src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path)
    seg0 = put.manifest.segments[0].fragments
    corrupt = bytearray(backend.blocks[seg0[0].cid])
    corrupt[-1] ^= 1
    backend.blocks[seg0[0].cid] = bytes(corrupt)  # bad data fragment
    del backend.blocks[seg0[2].cid]  # missing data fragment (n - k = 2 losses)
    get_file(put.cid, tmp_path / "o", backend, identities=[ident], fetch_timeout=0.1)
    assert (tmp_path / "o").read_bytes() == src.read_bytes()
    # the parity fragments were fetched to replace the two bad ones
    assert seg0[4].cid in backend.fetches and seg0[5].cid in backend.fetches


def test_too_many_losses_fail_cleanly(backend, ident, tmp_path):
    src = write(tmp_path, 3 * SEG)
    put = put_file(src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path)
    for f in put.manifest.segments[1].fragments[:3]:  # 3 > n - k
        del backend.blocks[f.cid]
    out = tmp_path / "out"
    with pytest.raises(NotEnoughFragments, match="segment 1"):
        get_file(put.cid, out, backend, identities=[ident], fetch_timeout=0.1)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_truncated_fragment_detected(backend, ident, tmp_path):
    src = write(tmp_path, SEG)
    put = put_file(src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path)
    for f in put.manifest.segments[0].fragments:
        backend.blocks[f.cid] = backend.blocks[f.cid][:-10]
    with pytest.raises(NotEnoughFragments):
        get_file(put.cid, tmp_path / "o", backend, identities=[ident])
    assert not (tmp_path / "o").exists()


def test_wrong_or_missing_identity(backend, ident, tmp_path):
    src = write(tmp_path, 1000)
    put = put_file(src, backend, recipients=[ident.recipient], work_dir=tmp_path)
    with pytest.raises(NoIdentityMatch):
        get_file(put.cid, tmp_path / "o", backend, identities=[age.X25519Identity.generate()])
    with pytest.raises(InvalidArgument, match="identity"):
        get_file(put.cid, tmp_path / "o", backend)
    assert not (tmp_path / "o").exists()


def test_several_recipients(backend, tmp_path):
    ids = [age.X25519Identity.generate() for _ in range(3)]
    src = write(tmp_path, 2000)
    put = put_file(src, backend, recipients=[i.recipient for i in ids], work_dir=tmp_path)
    for i, ident in enumerate(ids):
        get_file(put.cid, tmp_path / f"o{i}", backend, identities=[ident])
        assert (tmp_path / f"o{i}").read_bytes() == src.read_bytes()


def test_corrupted_manifest(backend, ident, tmp_path):
    src = write(tmp_path, 1000)
    put = put_file(src, backend, recipients=[ident.recipient], work_dir=tmp_path)
    raw = bytearray(backend.blocks[put.cid])
    raw[10] ^= 0x20
    backend.blocks[put.cid] = bytes(raw)
    with pytest.raises(IntegrityError, match="manifest"):
        get_file(put.cid, tmp_path / "o", backend, identities=[ident])


def test_not_a_manifest(backend, tmp_path):
    cid = backend.add_bytes(b"just some bytes")
    with pytest.raises(ManifestError):
        load_manifest(cid, backend)


def test_malformed_and_unknown_cid(backend, tmp_path):
    with pytest.raises(InvalidArgument):
        get_file("not-a-cid", tmp_path / "o", backend)
    from fusenode.storage.errors import BackendTimeout

    unknown = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
    with pytest.raises(BackendTimeout, match="not found"):
        get_file(unknown, tmp_path / "o", backend, fetch_timeout=0.1)


@pytest.mark.parametrize(("k", "n"), [(4, 4), (0, 3), (5, 65), (6, 4)])
def test_invalid_k_n(backend, ident, tmp_path, k, n):
    with pytest.raises(InvalidArgument):
        put_file(write(tmp_path, 10), backend, recipients=[ident.recipient], k=k, n=n)
    assert not backend.blocks


def test_bad_input_files(backend, ident, tmp_path):
    with pytest.raises(InvalidArgument, match="no such file"):
        put_file(tmp_path / "missing", backend, recipients=[ident.recipient])
    (tmp_path / "empty").touch()
    with pytest.raises(InvalidArgument, match="empty"):
        put_file(tmp_path / "empty", backend, recipients=[ident.recipient])
    with pytest.raises(InvalidArgument, match="directory"):
        put_file(tmp_path, backend, recipients=[ident.recipient])
    with pytest.raises(InvalidArgument, match="recipient"):
        put_file(write(tmp_path, 10), backend)
    assert not backend.blocks


def test_manifest_parses_back(backend, ident, tmp_path):
    put = put_file(
        write(tmp_path, 7000),
        backend,
        recipients=[ident.recipient],
        segment_size=SEG,
        work_dir=tmp_path,
    )
    assert Manifest.from_bytes(backend.blocks[put.cid]) == put.manifest


def test_output_file_gets_the_usual_mode(backend, ident, tmp_path):
    import stat

    put = put_file(write(tmp_path, 1000), backend, recipients=[ident.recipient])
    old = os.umask(0o022)
    try:
        get_file(put.cid, tmp_path / "o", backend, identities=[ident])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o644


def test_version_1_manifests_are_still_read_and_checked(backend, ident, tmp_path):
    src = write(tmp_path, 3 * SEG)
    put = put_file(
        src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path,
        format_version=2,
    )  # fmt: skip
    assert put.manifest.version == 2
    assert all(f.sha256 is None for s in put.manifest.segments for f in s.fragments)
    old = as_version_1(backend, put.manifest)
    assert b'"version":1' in backend.blocks[old] and b'"sha256"' in backend.blocks[old]
    got = get_file(old, tmp_path / "o", backend, identities=[ident])
    assert got.manifest.version == 1
    assert (tmp_path / "o").read_bytes() == src.read_bytes()
    # A damaged fragment is still caught and replaced (both its CID and its SHA-256 differ).
    frag = put.manifest.segments[1].fragments[1]
    backend.blocks[frag.cid] = backend.blocks[frag.cid][:-1] + b"\0"
    backend.fetches.clear()
    get_file(old, tmp_path / "o2", backend, identities=[ident])
    assert (tmp_path / "o2").read_bytes() == src.read_bytes()
    assert put.manifest.segments[1].fragments[4].cid in backend.fetches


def test_fragment_not_matching_its_cid_is_replaced(backend, ident, tmp_path):
    """A holder returning other bytes under a fragment's CID (a forger, or a blockstore
    that is not verified, like Kubo's own): same length, valid header and CRC, only the CID
    can tell."""
    src = write(tmp_path, 2 * SEG)
    put = put_file(src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path)
    first, second = put.manifest.segments[:2]  # both full-size segments
    backend.blocks[first.fragments[0].cid] = backend.blocks[second.fragments[0].cid]
    get_file(put.cid, tmp_path / "o", backend, identities=[ident])
    assert (tmp_path / "o").read_bytes() == src.read_bytes()
    assert first.fragments[4].cid in backend.fetches


def test_version_1_fragments_under_any_cid_form_are_read(backend, ident, tmp_path):
    """Version 1 allowed any CID form for a fragment (its SHA-256 was the check), e.g. one
    another IPFS backend made with blake2b: such a model must still read."""
    import base64
    import dataclasses
    import hashlib

    src = write(tmp_path, 2 * SEG)
    put = put_file(
        src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path,
        format_version=2,
    )  # fmt: skip

    def blake_cid(data):
        raw = (
            bytes([1, 0x55, 0xA0, 0xE4, 0x02, 0x20])
            + hashlib.blake2b(data, digest_size=32).digest()
        )
        return "b" + base64.b32encode(raw).decode().rstrip("=").lower()

    segments = []
    for seg in put.manifest.segments:
        refs = []
        for f in seg.fragments:
            data = backend.blocks[f.cid]
            cid = blake_cid(data)
            backend.blocks[cid] = data
            refs.append(dataclasses.replace(f, cid=cid, sha256=hashlib.sha256(data).hexdigest()))
        segments.append(dataclasses.replace(seg, fragments=tuple(refs)))
    old = dataclasses.replace(put.manifest, segments=tuple(segments), version=1)
    cid = backend.add_bytes(old.to_bytes())
    get_file(cid, tmp_path / "o", backend, identities=[ident])
    assert (tmp_path / "o").read_bytes() == src.read_bytes()


def test_put_fails_when_the_node_adds_files_another_way(ident, tmp_path):
    """A node whose add builds another DAG (say raw leaves) gives CIDs readers cannot
    recompute: the put must fail before publishing anything, not every later get."""
    from fusenode.storage.multiformats import SHA2_256, b58encode, encode_multihash

    class OtherLayout(FakeBackend):
        def add_bytes(self, data):
            import hashlib

            cid = b58encode(encode_multihash(SHA2_256, hashlib.sha256(data).digest()))
            self.blocks[cid] = bytes(data)
            return cid

    backend = OtherLayout()
    src = write(tmp_path, 3 * SEG)
    with pytest.raises(BackendError, match=r"hash to \S+ the way readers check them"):
        put_file(src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path)
    assert not any(b'"fusenode-manifest"' in data for data in backend.blocks.values())


def test_a_manifest_already_loaded_is_not_fetched_again(backend, ident, tmp_path):
    src = write(tmp_path, 2 * SEG)
    put = put_file(src, backend, recipients=[ident.recipient], segment_size=SEG, work_dir=tmp_path)
    manifest = load_manifest(put.cid, backend)
    backend.fetches.clear()
    get_file(put.cid, tmp_path / "o", backend, identities=[ident], manifest=manifest)
    assert put.cid not in backend.fetches
    assert (tmp_path / "o").read_bytes() == src.read_bytes()


def test_a_silent_holder_costs_a_hedge_not_the_deadline(backend, ident, tmp_path):
    """A fragment whose holder never answers (a partition: Kubo would wait the whole fetch
    deadline): with hedge_after the get asks the next fragment and decodes from the fastest
    k, so it waits seconds, not the deadline; without it, the failure waits it out."""
    import threading
    import time

    from fusenode.storage.errors import BackendTimeout

    src = write(tmp_path, 3 * SEG)
    put = put_file(src, backend, recipients=[ident.recipient], k=2, n=4, segment_size=SEG)
    silent = {seg.fragments[0].cid for seg in put.manifest.segments}
    released = threading.Event()

    def fetch(cid: str, deadline: float) -> bytes:
        if cid in silent:  # answers only at its deadline, with nothing
            released.wait(deadline)
            raise BackendTimeout(f"timed out after {deadline} s fetching {cid}")
        return backend.fetch_bytes(cid, deadline)

    start = time.monotonic()
    got = get_file(
        put.cid, tmp_path / "o", backend, identities=[ident], fetch=fetch, fetch_timeout=30,
        hedge_after=0.2,
    )  # fmt: skip
    took = time.monotonic() - start
    released.set()  # let the abandoned fetches end
    assert (tmp_path / "o").read_bytes() == src.read_bytes() and got.manifest.version == 3
    assert took < 5, took


def test_public_files_with_identical_segments_are_stored_encrypted_only(backend, tmp_path):
    """Identical plaintext segments would give identical fragments, which a manifest may
    not list twice: refused with the way out, and nothing published."""
    src = tmp_path / "zeros.bin"
    src.write_bytes(bytes(3 * SEG))
    with pytest.raises(InvalidArgument, match=r"segments 0 and 1 .* identical.*encrypted"):
        put_file(src, backend, public=True, segment_size=SEG, work_dir=tmp_path)
    put = put_file(
        src,
        backend,
        recipients=[age.X25519Identity.generate().recipient],
        segment_size=SEG,
        work_dir=tmp_path,
    )
    assert len(set(put.manifest.fragment_cids())) == len(put.manifest.fragment_cids())
