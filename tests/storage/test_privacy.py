"""Format version 3 (hidden sizes) and post-quantum recipients, on an in-memory backend.

What a holder of the manifest CID without a key may learn: the Padmé bucket of the size, not
the size; no name, creation time or parent. What a key holder must refuse: padding or a
declared size that differ from what the writer made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import pyrage
import pytest

from fusenode.storage import age
from fusenode.storage.erasure import ErasureCoder
from fusenode.storage.errors import IntegrityError, InvalidArgument, ManifestError
from fusenode.storage.manifest import (
    MAX_AGE_HEADER_SIZE,
    METADATA_MIN_BUCKET,
    PAYLOAD_MIN_BUCKET,
    Manifest,
    Metadata,
    canonical_json,
    pad_metadata,
    padded_size,
    padme,
    unpad_metadata,
)
from fusenode.storage.share import share
from fusenode.storage.store import get_file, open_metadata, put_file, seal_metadata
from tests.support.fakes import FakeBackend

SEG = 8192 + 5


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def owner() -> age.X25519Identity:
    return age.X25519Identity.generate()


@pytest.fixture(scope="module")
def pq() -> age.MLKEM768X25519Identity:
    return age.MLKEM768X25519Identity.generate()


def _put(backend, tmp_path, data: bytes, recipients, name: str = "model.onnx", **kw):
    src = tmp_path / name
    src.write_bytes(data)
    return put_file(src, backend, recipients=recipients, segment_size=SEG, work_dir=tmp_path, **kw)


# -- Padmé --------------------------------------------------------------------------------------


def test_padme_matches_the_purb_definition() -> None:
    # Values worked out by hand from the paper's algorithm: E = floor(log2 L),
    # S = floor(log2 E) + 1, the low E - S bits cleared (rounding up).
    assert [padme(n) for n in (0, 1, 2, 3, 7, 8, 9, 100)] == [0, 1, 2, 3, 7, 8, 10, 104]
    assert padme(1000) == 1024 and padme(1025) == 1088 and padme(10**6) == 1_015_808
    for n in [*range(1, 5000), 2**20 + 1, 123_456_789, 2**32 + 12345]:
        p = padme(n)
        assert n <= p <= n * 1.12 + 1 and padme(p) == p  # bounded overhead, a fixed point
    with pytest.raises(InvalidArgument):
        padme(-1)


def test_metadata_padding_round_trips_and_is_strict() -> None:
    body = b'{"name":"x"}'
    padded = pad_metadata(body)
    assert len(padded) == METADATA_MIN_BUCKET and json.loads(padded) == {"name": "x"}
    assert unpad_metadata(padded) == body
    for bad in (padded[:-1], padded + b" ", padded[:-1] + b"\0", body):
        with pytest.raises(ManifestError, match="padding"):
            unpad_metadata(bad)


def test_metadata_has_no_second_spelling() -> None:
    """Whitespace before the JSON, or inside it, is another spelling of the same object in a
    bucket of the same length (a key holder's side channel): refused."""
    padded = pad_metadata(b'{"name":"x"}')
    for bad in (b" " + padded[:-1], b"\n" + padded[:-1], b'{"name": "x"}' + padded[13:]):
        assert len(bad) == len(padded) and json.loads(bad) == {"name": "x"}
        with pytest.raises(ManifestError, match="canonical"):
            unpad_metadata(bad)


def test_the_metadata_minimum_grows_by_the_recipient_list_only() -> None:
    """The minimum bucket is 4096 bytes plus the recipient list's length (public: one length
    per key type, types and count in the header), so whatever else the JSON holds up to
    4096 bytes looks the same."""
    keys = [age.MLKEM768X25519Identity.generate().recipient.to_string() for _ in range(2)]
    listed = len(canonical_json(keys))
    sizes = set()
    for name in ("m", "n" * 300):
        body = canonical_json({"name": name, "recipients": keys, "size": 1})
        assert len(body) > METADATA_MIN_BUCKET or name == "m"
        padded = pad_metadata(body)
        assert unpad_metadata(padded) == body
        sizes.add(len(padded))
    assert sizes == {padme(METADATA_MIN_BUCKET + listed)}


# -- one bucket, one shape ---------------------------------------------------------------------


def test_sizes_in_one_bucket_give_identical_manifest_and_fragment_sizes(
    backend, owner, tmp_path
) -> None:
    top = padme(300_000)  # a bucket [low, top] of sizes that all pad to top
    sizes = [top, top - 1, top - 5000]  # the bucket is 8192 wide here
    assert len({padme(s) for s in sizes}) == 1 and padme(top - 8192) != top
    shapes = set()
    for i, size in enumerate(sizes):
        put = _put(backend, tmp_path, os.urandom(size), [owner.recipient], name=f"m{i}.onnx")
        m = put.manifest
        raw = backend.blocks[put.cid]
        assert m.version == 3 and b'"created"' not in raw and b'"parent"' not in raw
        assert str(size) not in json.loads(raw).values()
        shapes.add(
            (
                len(raw),
                m.payload_size,
                len(m.metadata),
                tuple(len(backend.blocks[f.cid]) for s in m.segments for f in s.fragments),
            )
        )
        got = get_file(put.cid, tmp_path / f"o{i}", backend, identities=[owner])
        assert got.metadata.size == size and (tmp_path / f"o{i}").stat().st_size == size
    assert len(shapes) == 1, shapes
    # A size in the next bucket has another shape.
    put = _put(backend, tmp_path, os.urandom(top + 1), [owner.recipient], name="m9.onnx")
    assert put.manifest.payload_size > next(iter(shapes))[1]


def test_tiny_files_share_the_minimum_bucket(backend, owner, tmp_path) -> None:
    """Below 4096 bytes a Padmé bucket is a few bytes wide (a 1-byte file would be a 33-byte
    payload): every file up to 4096 bytes is padded to 4096 and looks the same."""
    assert padded_size(1) == padded_size(PAYLOAD_MIN_BUCKET) == PAYLOAD_MIN_BUCKET
    shapes = set()
    for i, size in enumerate((1, 100, 333, PAYLOAD_MIN_BUCKET)):
        data = os.urandom(size)
        put = _put(backend, tmp_path, data, [owner.recipient], name=f"t{i}.onnx")
        m = put.manifest
        assert m.plaintext_size() == PAYLOAD_MIN_BUCKET
        frags = tuple(len(backend.blocks[f.cid]) for s in m.segments for f in s.fragments)
        shapes.add((len(backend.blocks[put.cid]), m.payload_size, len(m.metadata), frags))
        got = get_file(put.cid, tmp_path / f"o{i}", backend, identities=[owner])
        assert got.metadata.size == size and (tmp_path / f"o{i}").read_bytes() == data
    assert len(shapes) == 1, shapes
    # A version 3 manifest with an unpadded tiny payload is not one a writer makes.
    put = _put(backend, tmp_path, b"x", [owner.recipient], format_version=2)
    obj = json.loads(backend.blocks[put.cid])
    del obj["created"]
    obj["version"] = 3
    with pytest.raises(ManifestError, match="not a padded size"):
        Manifest.from_bytes(json.dumps(obj).encode())


def test_two_post_quantum_recipients_keep_one_shape_per_bucket(backend, tmp_path) -> None:
    """Two age1pq1 keys make a recipient list of ~3900 bytes: the name's length must still not
    move the metadata (or anything else) to another bucket."""
    keys = [age.MLKEM768X25519Identity.generate() for _ in range(2)]
    recipients = [k.recipient for k in keys]
    shapes = set()
    for i, (size, name) in enumerate(((5000, "a.onnx"), (5100, "b" * 250 + ".onnx"))):
        src = tmp_path / f"p{i}.onnx"
        src.write_bytes(os.urandom(size))
        put = put_file(src, backend, recipients=recipients, segment_size=SEG, name=name)
        m = put.manifest
        frags = tuple(len(backend.blocks[f.cid]) for s in m.segments for f in s.fragments)
        shapes.add((len(backend.blocks[put.cid]), m.payload_size, len(m.metadata), frags))
        _, metadata = open_metadata(m, [keys[i]])
        assert metadata.name == name and metadata.size == size
    assert len(shapes) == 1, shapes


def test_created_name_and_parent_are_sealed(backend, owner, tmp_path) -> None:
    parent = backend.add_bytes(b"the source model")
    put = _put(backend, tmp_path, os.urandom(5000), [owner.recipient], parent=parent)
    assert put.manifest.parent is None and put.manifest.created is None
    assert parent.encode() not in backend.blocks[put.cid]
    assert b"model.onnx" not in backend.blocks[put.cid]
    _, metadata = open_metadata(put.manifest, [owner])
    assert metadata.parent == parent and metadata.size == 5000 and metadata.name == "model.onnx"


def test_public_models_stay_version_2(backend, tmp_path) -> None:
    src = tmp_path / "p.onnx"
    src.write_bytes(os.urandom(5000))
    put = put_file(src, backend, public=True, segment_size=SEG)
    assert put.manifest.version == 2 and put.manifest.payload_size == 5000
    with pytest.raises(InvalidArgument, match="format version 3"):
        put_file(src, backend, public=True, format_version=3)


def test_version_2_manifests_are_still_written_on_request_and_read(
    backend, owner, tmp_path
) -> None:
    data = os.urandom(5000)
    put = _put(backend, tmp_path, data, [owner.recipient], format_version=2)
    assert put.manifest.version == 2 and put.manifest.plaintext_size() == 5000
    get_file(put.cid, tmp_path / "o", backend, identities=[owner])
    assert (tmp_path / "o").read_bytes() == data


# -- authenticated padding and size ------------------------------------------------------------


def _reseal(backend, manifest: Manifest, owner, **changes) -> str:
    """A manifest whose sealed metadata a key holder rewrote (the only one who can)."""
    file_key, metadata = open_metadata(manifest, [owner])
    sealed = seal_metadata(file_key, dataclasses.replace(metadata, **changes), 3)
    return backend.add_bytes(dataclasses.replace(manifest, metadata=sealed).to_bytes())


def test_altered_declared_size_is_refused(backend, owner, tmp_path) -> None:
    data = os.urandom(5000)
    put = _put(backend, tmp_path, data, [owner.recipient])
    # Outside the bucket: refused before any fragment is fetched.
    cid = _reseal(backend, put.manifest, owner, size=2000)
    backend.fetches.clear()
    with pytest.raises(IntegrityError, match="declares 2000 bytes"):
        get_file(cid, tmp_path / "o", backend, identities=[owner])
    assert backend.fetches == [cid]
    # Inside the bucket: the bytes past it are not zeros (or the hash differs).
    cid = _reseal(backend, put.manifest, owner, size=4999)
    with pytest.raises(IntegrityError):
        get_file(cid, tmp_path / "o", backend, identities=[owner])
    assert not (tmp_path / "o").exists()


def test_non_zero_padding_is_refused(backend, owner, tmp_path) -> None:
    """A payload whose bytes after the declared size are not zeros: the stored plaintext is
    ``data + b"\\x01"...`` of an exact Padmé size (so nothing is added), and the sealed
    metadata then claims only ``data``, with its own hash."""
    data = os.urandom(4990)
    total = padme(5000)
    put = _put(backend, tmp_path, data + b"\x01" * (total - len(data)), [owner.recipient])
    assert put.manifest.plaintext_size() == total
    cid = _reseal(
        backend, put.manifest, owner, size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    with pytest.raises(IntegrityError, match="padding"):
        get_file(cid, tmp_path / "o", backend, identities=[owner])
    assert not (tmp_path / "o").exists()


def test_altered_metadata_padding_is_refused(backend, owner, tmp_path) -> None:
    put = _put(backend, tmp_path, os.urandom(5000), [owner.recipient])
    file_key, metadata = open_metadata(put.manifest, [owner])
    sealer = age.PayloadEncryptor(file_key)
    unpadded = sealer.update(metadata.to_json()) + sealer.finalize()  # version 2 style
    bad = dataclasses.replace(put.manifest, metadata=unpadded)
    with pytest.raises(ManifestError, match="padding"):
        open_metadata(bad, [owner])


def test_payload_size_must_be_a_padme_size_in_version_3(backend, owner, tmp_path) -> None:
    put = _put(backend, tmp_path, os.urandom(5000), [owner.recipient], format_version=2)
    obj = json.loads(backend.blocks[put.cid])
    del obj["created"]
    obj["version"] = 3
    with pytest.raises(ManifestError, match="not a padded size"):
        Manifest.from_bytes(json.dumps(obj).encode())


def test_extension_members_of_sealed_metadata_are_kept(backend, owner, tmp_path) -> None:
    put = _put(backend, tmp_path, os.urandom(3000), [owner.recipient])
    signed = {"signature": "c2lnbmVk", "signer": "someone"}
    cid = _reseal(backend, put.manifest, owner, extra={"signed_provenance": signed})
    friend = age.X25519Identity.generate()
    manifest = Manifest.from_bytes(backend.blocks[cid])
    shared = share(manifest, [owner], [friend.recipient])
    _, metadata = open_metadata(shared, [friend])
    assert metadata.extra == {"signed_provenance": signed}
    with pytest.raises(ManifestError, match="redefines"):
        Metadata(**{**dataclasses.asdict(metadata), "extra": {"name": "x"}})


# -- post-quantum recipients -------------------------------------------------------------------


def test_post_quantum_put_get_and_standard_age_file(backend, pq, tmp_path) -> None:
    data = os.urandom(70_000)
    put = _put(backend, tmp_path, data, [pq.recipient])
    header = age.decode_header(put.manifest.age_header)
    assert [s.type for s in header.stanzas] == ["mlkem768x25519"]
    _, metadata = open_metadata(put.manifest, [pq])
    assert metadata.recipients == (pq.recipient.to_string(),)
    get_file(put.cid, tmp_path / "o", backend, identities=[pq])
    assert (tmp_path / "o").read_bytes() == data
    # header || payload is an age file: our own whole-file decrypt reads it.
    m = put.manifest
    coder = ErasureCoder(m.erasure.k, m.erasure.n)
    payload = b"".join(
        coder.decode({f.index: backend.blocks[f.cid] for f in s.fragments}, s.size)
        for s in m.segments
    )
    assert age.decrypt(m.age_header + payload, [pq]) == data + bytes(padme(70_000) - 70_000)


def test_post_quantum_and_classic_recipients_are_not_mixed(backend, owner, pq, tmp_path) -> None:
    with pytest.raises(InvalidArgument, match="post-quantum"):
        _put(backend, tmp_path, b"x" * 100, [pq.recipient, owner.recipient])


def test_too_many_post_quantum_recipients_are_refused_before_anything_is_stored(
    backend, pq, tmp_path
) -> None:
    many = [pq.recipient] + [
        age.MLKEM768X25519Identity.generate().recipient for _ in range(MAX_AGE_HEADER_SIZE // 1500)
    ]
    with pytest.raises(InvalidArgument, match=r"at most (\d+) post-quantum recipients fit") as e:
        _put(backend, tmp_path, os.urandom(5000), many)
    assert backend.blocks == {}  # nothing encoded or placed
    fit = int(re.search(r"at most (\d+)", str(e.value)).group(1))
    assert 10 < fit < len(many)
    put = _put(backend, tmp_path, os.urandom(5000), many[:fit])  # the number is right
    assert len(put.manifest.age_header) <= MAX_AGE_HEADER_SIZE
    with pytest.raises(InvalidArgument, match="at most"):
        _put(backend, tmp_path, os.urandom(5000), many[: fit + 1])
    # share checks the same limit (before writing a manifest)
    small = _put(backend, tmp_path, os.urandom(5000), [pq.recipient])
    with pytest.raises(InvalidArgument, match="at most"):
        share(small.manifest, [pq], many[1:])


def test_the_same_key_twice_is_one_stanza(backend, owner, tmp_path) -> None:
    put = _put(backend, tmp_path, os.urandom(5000), [owner.recipient, owner.recipient])
    assert len(age.decode_header(put.manifest.age_header).stanzas) == 1
    _, metadata = open_metadata(put.manifest, [owner])
    assert metadata.recipients == (owner.recipient.to_string(),)


def test_share_to_post_quantum_keys(backend, owner, pq, tmp_path) -> None:
    data = os.urandom(20_000)
    # A post-quantum model gains another post-quantum reader...
    put = _put(backend, tmp_path, data, [pq.recipient])
    friend = age.MLKEM768X25519Identity.generate()
    shared = share(put.manifest, [pq], [friend.recipient])
    cid = backend.add_bytes(shared.to_bytes())
    get_file(cid, tmp_path / "o1", backend, identities=[friend])
    assert (tmp_path / "o1").read_bytes() == data
    assert open_metadata(shared, [friend])[1].recipients == (
        pq.recipient.to_string(),
        friend.recipient.to_string(),
    )
    # ...but not a classic one (that stanza would undo the quantum resistance).
    with pytest.raises(InvalidArgument, match="post-quantum keys only"):
        share(put.manifest, [pq], [owner.recipient])
    # A classic model may gain a post-quantum reader (access, not protection).
    classic = _put(backend, tmp_path, data, [owner.recipient], name="c.onnx")
    cid = backend.add_bytes(share(classic.manifest, [owner], [pq.recipient]).to_bytes())
    get_file(cid, tmp_path / "o2", backend, identities=[pq])
    assert (tmp_path / "o2").read_bytes() == data


def test_pyrage_reads_a_shared_classic_stanza_of_a_version_3_model(backend, owner, tmp_path):
    """rage has no mlkem768x25519 (pyrage 1.4): it still reads the X25519 stanza of a
    version 3 file, padding and all."""
    data = os.urandom(3000)
    put = _put(backend, tmp_path, data, [owner.recipient])
    m = put.manifest
    coder = ErasureCoder(m.erasure.k, m.erasure.n)
    payload = b"".join(
        coder.decode({f.index: backend.blocks[f.cid] for f in s.fragments}, s.size)
        for s in m.segments
    )
    key = pyrage.x25519.Identity.from_str(owner.to_string())
    plain = pyrage.decrypt(m.age_header + payload, [key])
    assert plain[:3000] == data and not any(plain[3000:])
    sealed = json.loads(pyrage.decrypt(m.age_header + m.metadata, [key]))
    assert sealed["size"] == 3000


def test_a_republish_may_keep_mixed_recipients(backend, owner, pq, tmp_path) -> None:
    """A classic model shared to a PQ key has both kinds of readers; the optimizer's
    republish to "the same recipients" must not fail on the mix a share allowed."""
    put = _put(
        backend, tmp_path, b"y" * 500, [owner.recipient, pq.recipient], mixed_recipients=True
    )
    for identity in (owner, pq):
        assert open_metadata(put.manifest, [identity])[1].size == 500
