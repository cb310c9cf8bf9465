"""Sharing on an in-memory backend: new keys read the same fragments, nothing else changes."""

from __future__ import annotations

import dataclasses
import json
import os

import pyrage
import pytest

from fusenode.storage import age
from fusenode.storage.erasure import ErasureCoder
from fusenode.storage.errors import InvalidArgument, NoIdentityMatch
from fusenode.storage.manifest import Manifest, Metadata, padme
from fusenode.storage.share import share, share_cid
from fusenode.storage.store import get_file, load_manifest, open_metadata, put_file, seal_metadata
from tests.support.fakes import FakeBackend, as_version_1

SEG = 4096 + 17  # several segments, the last one short
SIZE = 3 * SEG + 100


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def owner() -> age.X25519Identity:
    return age.X25519Identity.generate()


@pytest.fixture
def stored(backend, owner, tmp_path):
    """A model put to ``owner``: (its CID, its manifest, the plaintext)."""
    data = os.urandom(SIZE)
    src = tmp_path / "model.onnx"
    src.write_bytes(data)
    parent = backend.add_bytes(b"the model this one was derived from")
    put = put_file(
        src,
        backend,
        recipients=[owner.recipient],
        segment_size=SEG,
        work_dir=tmp_path,
        parent=parent,
    )
    return put.cid, put.manifest, data


def recipients_of(manifest: Manifest, identity: age.X25519Identity) -> tuple[str, ...] | None:
    return open_metadata(manifest, [identity])[1].recipients


def test_new_and_old_key_read_the_same_fragments(backend, owner, stored, tmp_path):
    cid, old, data = stored
    friend = age.X25519Identity.generate()
    before = dict(backend.blocks)

    new_cid, new = share_cid(cid, backend, [owner], [friend.recipient])

    assert new_cid != cid
    assert set(backend.blocks) - set(before) == {new_cid}  # only the manifest was added
    assert all(backend.blocks[c] == b for c, b in before.items())
    assert Manifest.from_bytes(backend.blocks[new_cid]) == new
    assert new.fragment_cids() == old.fragment_cids()
    for field in ("segments", "erasure", "payload_size", "parent", "created", "encryption"):
        assert getattr(new, field) == getattr(old, field), field
    assert new.age_header != old.age_header and new.metadata != old.metadata
    for i, identity in enumerate([friend, owner]):
        get_file(new_cid, tmp_path / f"out{i}", backend, identities=[identity])
        assert (tmp_path / f"out{i}").read_bytes() == data
    with pytest.raises(NoIdentityMatch):  # the old manifest still has the old header
        get_file(cid, tmp_path / "x", backend, identities=[friend])


def test_shared_file_is_a_standard_age_file(backend, owner, stored):
    """pyrage, an independent age implementation, decrypts new header || old payload."""
    _, old, data = stored
    friend = age.X25519Identity.generate()
    new = share(old, [owner], [friend.recipient])
    assert new.age_header is not None and isinstance(new.metadata, bytes)
    coder = ErasureCoder(old.erasure.k, old.erasure.n)
    payload = b"".join(
        coder.decode({f.index: backend.blocks[f.cid] for f in s.fragments}, s.size)
        for s in old.segments
    )
    key = pyrage.x25519.Identity.from_str(friend.to_string())
    # Format version 3: the age plaintext is the model, then zeros up to its Padmé bucket.
    assert pyrage.decrypt(new.age_header + payload, [key]) == data + bytes(padme(SIZE) - SIZE)
    metadata = json.loads(pyrage.decrypt(new.age_header + new.metadata, [key]))
    assert metadata["recipients"] == [owner.recipient.to_string(), friend.recipient.to_string()]
    assert isinstance(old.metadata, bytes)
    # a fresh payload nonce: the same file key must never seal two payloads under one nonce
    assert new.metadata[:16] != old.metadata[:16]


def test_metadata_is_kept_but_for_recipients(owner, stored):
    _, old, _ = stored
    friend = age.X25519Identity.generate()
    new = share(old, [owner], [friend.recipient])
    before, after = open_metadata(old, [owner])[1], open_metadata(new, [friend])[1]
    assert after == dataclasses.replace(
        before, recipients=(owner.recipient.to_string(), friend.recipient.to_string())
    )


def test_sharing_twice_accumulates_recipients(backend, owner, stored):
    cid, _, _ = stored
    a, b, c = (age.X25519Identity.generate() for _ in range(3))
    cid1, m1 = share_cid(cid, backend, [owner], [a.recipient, b.recipient, a.recipient])
    cid2, m2 = share_cid(cid1, backend, [b], [c.recipient, b.recipient])
    expected = tuple(i.recipient.to_string() for i in (owner, a, b, c))
    assert recipients_of(m1, a) == expected[:3]
    assert recipients_of(m2, c) == recipients_of(load_manifest(cid2, backend), owner) == expected
    assert m2.age_header is not None
    stanzas = age.decode_header(m2.age_header).stanzas
    assert len(stanzas) == 4  # duplicates and already-listed keys get no extra stanza


def test_sharing_to_listed_recipients_is_a_no_op(backend, owner, stored):
    cid, old, _ = stored
    assert share(old, [owner], [owner.recipient]) is old
    blocks = dict(backend.blocks)
    assert share_cid(cid, backend, [owner], [owner.recipient]) == (cid, old)
    assert backend.blocks == blocks


def test_wrong_or_missing_identity(backend, stored):
    cid, old, _ = stored
    stranger = age.X25519Identity.generate()
    blocks = dict(backend.blocks)
    with pytest.raises(NoIdentityMatch):
        share_cid(cid, backend, [stranger], [stranger.recipient])
    with pytest.raises(InvalidArgument, match="identity"):
        share(old, [], [stranger.recipient])
    assert backend.blocks == blocks


def test_bad_new_recipients(owner, stored):
    _, old, _ = stored
    with pytest.raises(InvalidArgument, match="at least one"):
        share(old, [owner], [])
    with pytest.raises(InvalidArgument, match="age public keys"):
        share(old, [owner], [age.ScryptPassphrase("pw", log_n=2)])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="age public keys"):
        share(old, [owner], [owner.recipient.to_string()])  # type: ignore[list-item]


def test_public_manifest_cannot_be_shared(backend, tmp_path):
    src = tmp_path / "public.onnx"
    src.write_bytes(os.urandom(1000))
    put = put_file(src, backend, public=True, work_dir=tmp_path)
    assert isinstance(put.manifest.metadata, Metadata) and put.manifest.metadata.recipients is None
    someone = age.X25519Identity.generate()
    with pytest.raises(InvalidArgument, match=r"public.*can already read"):
        share_cid(put.cid, backend, [someone], [someone.recipient])


def test_passphrase_manifest_cannot_be_shared(backend, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(os.urandom(1000))
    passphrase = age.ScryptPassphrase("correct horse", log_n=2)
    put = put_file(src, backend, recipients=[passphrase], work_dir=tmp_path)
    assert open_metadata(put.manifest, [passphrase])[1].recipients is None  # not listed
    someone = age.X25519Identity.generate()
    with pytest.raises(InvalidArgument, match="passphrase"):
        share(put.manifest, [passphrase], [someone.recipient])


def test_put_records_its_x25519_recipients(backend, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(os.urandom(1000))
    ids = [age.X25519Identity.generate() for _ in range(3)]
    keys = [i.recipient for i in ids]
    put = put_file(src, backend, recipients=[*keys, keys[0]], work_dir=tmp_path)
    expected = tuple(k.to_string() for k in keys)  # order kept, the duplicate dropped
    for identity in ids:
        assert recipients_of(load_manifest(put.cid, backend), identity) == expected


def test_unrecorded_recipients_stay_unrecorded(backend, owner, stored, tmp_path):
    """A manifest without the list (older writer): a share must not invent a partial one."""
    _, old, data = stored
    file_key, metadata = open_metadata(old, [owner])
    unlisted = dataclasses.replace(metadata, recipients=None)
    legacy = dataclasses.replace(old, metadata=seal_metadata(file_key, unlisted, old.version))
    friend = age.X25519Identity.generate()
    new = share(legacy, [owner], [friend.recipient])
    assert recipients_of(new, friend) is None
    cid = backend.add_bytes(new.to_bytes())
    get_file(cid, tmp_path / "out", backend, identities=[friend])
    assert (tmp_path / "out").read_bytes() == data


def test_version_1_manifest_stays_version_1(backend, owner, stored, tmp_path):
    """Sharing re-seals the metadata and keeps the fragments, so their refs (with version
    1's SHA-256s) and the manifest's version stay as they were."""

    data = os.urandom(SIZE)
    src = tmp_path / "model.onnx"
    src.write_bytes(data)
    put = put_file(src, backend, recipients=[owner.recipient], format_version=2)
    assert put.manifest.version == 2
    old = as_version_1(backend, put.manifest)
    friend = age.X25519Identity.generate()
    new_cid, shared = share_cid(old, backend, [owner], [friend.recipient])
    assert shared.version == 1 and shared.segments == load_manifest(old, backend).segments
    assert load_manifest(new_cid, backend).version == 1
    get_file(new_cid, tmp_path / "o", backend, identities=[friend])
    assert (tmp_path / "o").read_bytes() == data
