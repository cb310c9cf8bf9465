"""Manifest and metadata: canonical bytes, round trips, and one test per validation rule.

Every malformed manifest must raise ManifestError (never KeyError, TypeError, ...), with a
message that names the offending field; docs/format.md sections 5 and 6 are the rules.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from fusenode.storage.age import ScryptPassphrase, X25519Identity
from fusenode.storage.erasure import fragment_size
from fusenode.storage.errors import ManifestError
from fusenode.storage.manifest import (
    FORMAT_VERSION,
    MAX_MANIFEST_SIZE,
    ErasureParams,
    FragmentRef,
    Manifest,
    Metadata,
    SegmentRef,
    age_plaintext_size,
    canonical_json,
    format_time,
    is_valid_cid,
    parse_time,
    utc_now,
)

CREATED = datetime(2025, 11, 25, 12, 0, 0, tzinfo=UTC)
AGE_HEADER = (
    b"age-encryption.org/v1\n"
    b"-> X25519 8qcna1pLAonXqsZTKHFjLkW4EmwIqXiW2ejXMQPvIyw\n"
    b"v5QQOBExLTWSmdmwb8eczIZHtFLAgE6xSoCLVpUPdGg\n"
    b"--- tQcqLMMLA2aGQzOUI4PQ6CgdY1XjjJROZCly7NWeSMk\n"
)
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
#: Fixed (throwaway) X25519 recipients, so that expected bytes can be written down.
KEY_A, KEY_B = (X25519Identity(bytes([seed]) * 32).recipient for seed in (1, 2))
AGE_A, AGE_B = KEY_A.to_string(), KEY_B.to_string()


def _b58(raw: bytes) -> str:
    number, out = int.from_bytes(raw, "big"), ""
    while number:
        number, digit = divmod(number, 58)
        out = _B58[digit] + out
    return out


def cid_v0(seed: str) -> str:
    return _b58(b"\x12\x20" + hashlib.sha256(seed.encode()).digest())


def cid_v1(seed: str, codec: int = 0x70) -> str:
    raw = bytes([1, codec, 0x12, 0x20]) + hashlib.sha256(seed.encode()).digest()
    return "b" + base64.b32encode(raw).decode().rstrip("=").lower()


def _cid_blake2b(seed: str) -> str:
    """A well-formed dag-pb CIDv1 whose multihash is blake2b-256 (code 0xb220)."""
    digest = hashlib.blake2b(seed.encode(), digest_size=32).digest()
    raw = bytes([1, 0x70, 0xA0, 0xE4, 0x02, 0x20]) + digest
    return "b" + base64.b32encode(raw).decode().rstrip("=").lower()


def _sha(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def make_manifest(
    plaintext_size: int = 100,
    k: int = 2,
    n: int = 3,
    segment_size: int = 64,
    encrypted: bool = True,
    parent: str | None = None,
    version: int = 2,
) -> Manifest:
    """A well-formed manifest with fake (but syntactically valid) CIDs and hashes; version 1
    lists a SHA-256 beside each fragment CID."""
    if encrypted:
        payload_size = 16 + plaintext_size + 16 * max(1, -(-plaintext_size // 65536))
    else:
        payload_size = plaintext_size
    segments = []
    for i, start in enumerate(range(0, payload_size, segment_size)):
        size = min(segment_size, payload_size - start)
        fragments = tuple(
            FragmentRef(
                index=j,
                cid=cid_v0(f"{i}/{j}"),
                size=fragment_size(k, size),
                sha256=_sha(f"{i}/{j}") if version == 1 else None,
            )
            for j in range(n)
        )
        segments.append(SegmentRef(index=i, size=size, fragments=fragments))
    metadata = Metadata(
        name="tiny-model.onnx",
        size=plaintext_size,
        sha256=_sha("plaintext"),
        created=CREATED,
        media_type="application/onnx",
    )
    return Manifest(
        created=CREATED,
        encryption="age-v1" if encrypted else "none",
        erasure=ErasureParams(k=k, n=n, segment_size=segment_size),
        payload_size=payload_size,
        segments=tuple(segments),
        metadata=bytes(range(16)) * 2 + b"x" * 50 if encrypted else metadata,
        age_header=AGE_HEADER if encrypted else None,
        parent=parent,
        version=version,
    )


def _obj(manifest: Manifest) -> dict[str, Any]:
    return json.loads(manifest.to_bytes())


# --- round trips and canonical bytes ----------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("encrypted", [True, False])
@pytest.mark.parametrize(("k", "n", "segment_size"), [(2, 3, 64), (4, 6, 1000), (1, 2, 1)])
def test_round_trip(encrypted: bool, k: int, n: int, segment_size: int, version: int) -> None:
    manifest = make_manifest(
        100, k, n, segment_size, encrypted, parent=cid_v1("parent"), version=version
    )
    data = manifest.to_bytes()
    again = Manifest.from_bytes(data)
    assert again == manifest and again.version == version
    assert again.to_bytes() == data
    fragment = json.loads(data)["segments"][0]["fragments"][0]
    assert ("sha256" in fragment) == (version == 1)


def test_canonical_bytes_shape() -> None:
    data = make_manifest().to_bytes()
    assert b" " not in data and b"\n" not in data
    assert data.startswith(b'{"age_header":"YWdlLWVuY3J5cHRpb24ub3JnL3Yx')
    assert data.endswith(b',"version":2}')
    obj = json.loads(data)
    assert list(obj) == sorted(obj)
    assert "parent" not in obj  # optional members are omitted, never null


def test_non_canonical_input_is_read_and_rewritten_canonically() -> None:
    manifest = make_manifest()
    pretty = json.dumps(_obj(manifest), indent=3).encode()  # insertion order, whitespace
    assert Manifest.from_bytes(pretty) == manifest
    assert Manifest.from_bytes(pretty).to_bytes() == manifest.to_bytes()


def test_golden_bytes() -> None:
    """The format must not change silently: the same manifest must keep the same bytes.

    If this fails, every existing manifest CID would change for the same content. Change the
    format on purpose (new version, docs/format.md 11), never by accident. Version 1's
    bytes are pinned too: a version-1 manifest re-sealed by `share` must keep its layout.
    """
    for version, (length, digest, public_digest) in GOLDEN.items():
        manifest = make_manifest(parent=cid_v0("parent"), version=version)
        data = manifest.to_bytes()
        assert len(data) == length
        assert hashlib.sha256(data).hexdigest() == digest
        public = make_manifest(encrypted=False, version=version)
        assert isinstance(public.metadata, Metadata)
        metadata = dataclasses.replace(
            public.metadata, name="modèle.onnx", provenance={"atol": 1e-05, "passes": ["fuse_bn"]}
        )
        public_bytes = dataclasses.replace(public, metadata=metadata).to_bytes()
        assert '"name":"modèle.onnx"'.encode() in public_bytes  # raw UTF-8, not \u00e8
        assert b'"provenance":{"atol":1e-05,"passes":["fuse_bn"]}' in public_bytes
        assert hashlib.sha256(public_bytes).hexdigest() == public_digest


GOLDEN = {
    1: (
        2115,
        "44e4145a49d2b5bea13ffb08e9a8891206a0b4d487cf733db3cf2c8d2f5921b1",
        "ec6a6c6070ef7ffd2fcb49741e3d8711b7103da29bf9399af52ce76f4cb5a5fa",
    ),
    2: (
        1431,
        "73f36e753f75dfadc6c307d8f711790826e4046bc28fa4d28e81b42ccb3c34bc",
        "6b54d42fb0898ce85d4418f2b7b7fe94c81fb85c46d185ba8b7c299ca67e172e",
    ),
}


def test_example_in_format_doc_is_valid(project_root: Path) -> None:
    """docs/format.md 5.5 shows a real manifest; keep it in step with the code."""
    doc = (project_root / "docs" / "format.md").read_text("utf-8")
    section = doc.split("### 5.5 Example", 1)[1].split("### 5.6", 1)[0]
    block = re.search(r"\n    (\{\n.*?\n    \})\n", section, re.S)
    assert block is not None
    obj = json.loads(block.group(1))
    manifest = Manifest.from_bytes(canonical_json(obj))
    assert manifest.version == FORMAT_VERSION
    stated = re.search(r"one line of (\d+) bytes", section)
    assert stated is not None and len(manifest.to_bytes()) == int(stated.group(1))
    assert manifest.age_header is not None
    assert manifest.age_header.decode() in re.sub(r"\n    ", "\n", section)
    assert manifest.plaintext_size() == 100


def test_helpers() -> None:
    manifest = make_manifest(100, 2, 3, 64)
    assert manifest.encrypted
    assert manifest.plaintext_size() == 100
    assert manifest.fragment_cids()[:2] == [cid_v0("0/0"), cid_v0("0/1")]
    assert len(manifest.fragment_cids()) == 3 * 3
    public = make_manifest(100, encrypted=False)
    assert not public.encrypted and public.plaintext_size() == 100


def test_segments_given_as_list_become_tuple() -> None:
    manifest = make_manifest()
    rebuilt = Manifest(
        created=manifest.created,
        encryption=manifest.encryption,
        erasure=manifest.erasure,
        payload_size=manifest.payload_size,
        segments=list(manifest.segments),  # type: ignore[arg-type]
        metadata=manifest.metadata,
        age_header=manifest.age_header,
    )
    assert rebuilt == manifest and isinstance(rebuilt.segments, tuple)


# --- validation: one rule, one test -----------------------------------------------------

Mutation = Callable[[dict[str, Any]], Any]


def _set(path: str, value: Any) -> Mutation:
    """A mutation that sets obj[a][b]... (path 'a.b.0.c') to value, or deletes it."""

    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = obj
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key: Any = int(last) if isinstance(target, list) else last
        if value is _DELETE:
            del target[key]
        else:
            target[key] = value

    return mutate


_DELETE = object()
_SEG0 = "segments.0"
_FRAG = "segments.0.fragments.1"

INVALID: dict[str, tuple[Mutation, str]] = {
    "format-wrong": (_set("format", "restic"), "not a fusenode manifest"),
    "format-missing": (_set("format", _DELETE), "not a fusenode manifest"),
    "version-4": (_set("version", 4), "version 4 is not supported .* reads versions 1, 2, 3"),
    "version-3-created": (_set("version", 3), "unknown key.*created"),
    "version-0": (_set("version", 0), "version 0 is not supported"),
    "version-string": (_set("version", "1"), "version must be an integer"),
    "version-bool": (_set("version", True), "version must be an integer"),
    "version-missing": (_set("version", _DELETE), "version must be an integer"),
    "unknown-top-key": (_set("owner", "me"), "unknown key.*: owner"),
    "unknown-erasure-key": (_set("erasure.w", 1), r"erasure: erasure has unknown key.*: w"),
    "unknown-segment-key": (_set(f"{_SEG0}.hash", "x"), r"segments\[0\]: .*unknown.*hash"),
    "unknown-fragment-key": (
        _set(f"{_FRAG}.peer", "x"),
        r"segments\[0\]: fragments\[1\]: .*unknown.*peer",
    ),
    "missing-created": (_set("created", _DELETE), "lacks required key.*created"),
    "missing-segments": (_set("segments", _DELETE), "lacks required key.*segments"),
    "missing-erasure-k": (_set("erasure.k", _DELETE), "erasure.*lacks required key.*k"),
    "missing-fragment-cid": (_set(f"{_FRAG}.cid", _DELETE), "lacks required key.*cid"),
    "k-equals-n": (_set("erasure.k", 3), "k=3 n=3 are invalid"),
    "k-above-n": (_set("erasure.k", 4), "k 4 is out of range|k=4 n=3 are invalid"),
    "k-zero": (_set("erasure.k", 0), "k 0 is out of range"),
    "n-65": (_set("erasure.n", 65), "n 65 is out of range"),
    "k-float": (_set("erasure.k", 2.0), "k must be an integer, got a number"),
    "k-bool": (_set("erasure.k", True), "k must be an integer, got a boolean"),
    "k-string": (_set("erasure.k", "2"), "k must be an integer, got a string"),
    "algorithm": (_set("erasure.algorithm", "zfec"), "algorithm 'zfec' is not supported"),
    "segment-size-0": (_set("erasure.segment_size", 0), "segment_size 0 is out of range"),
    "segment-size-huge": (_set("erasure.segment_size", 2**31), "segment_size .* out of range"),
    "payload-size-too-big": (_set("payload_size", 2**53), "payload_size .* out of range"),
    "payload-size-negative": (_set("payload_size", -1), "payload_size -1 is out of range"),
    "payload-size-vs-segments": (_set("payload_size", 200), "2 listed|3 listed"),
    "payload-size-not-age": (_set("payload_size", 20), "not a possible age payload length"),
    "segment-count": (lambda o: o["segments"].pop(), "2 listed, but payload_size 132"),
    "segment-size-wrong": (_set(f"{_SEG0}.size", 63), r"segments\[0\]: size 63, expected 64"),
    "last-segment-size": (_set("segments.2.size", 5), r"segments\[2\]: size 5, expected 4"),
    "segment-index": (_set(f"{_SEG0}.index", 1), "index 1 differs from its position 0"),
    "segments-not-list": (_set("segments", {}), "segments must be an array"),
    "fragment-count": (lambda o: o["segments"][0]["fragments"].pop(), "2 fragments listed, n"),
    "fragment-order": (
        lambda o: o["segments"][0]["fragments"].reverse(),
        r"fragments\[0\] has index 2",
    ),
    "fragment-size": (_set(f"{_FRAG}.size", 113), r"fragments\[1\].size 113, expected 112"),
    "fragment-size-zero": (_set(f"{_FRAG}.size", 0), "size 0 is out of range"),
    "fragment-not-object": (_set(_FRAG, []), "fragment must be a JSON object, got an array"),
    "cid-short": (_set(f"{_FRAG}.cid", "QmShort"), "cid 'QmShort' is not a valid CID"),
    "cid-bad-char": (_set(f"{_FRAG}.cid", "Qm" + "0" * 44), "is not a valid CID"),
    "cid-v0-not-sha256": (_set(f"{_FRAG}.cid", _b58(b"\x13\x20" + bytes(32))), "not a valid"),
    "cid-v1-upper": (_set(f"{_FRAG}.cid", cid_v1("x").upper()), "is not a valid CID"),
    "cid-v1-codec": (_set(f"{_FRAG}.cid", cid_v1("x", codec=0x71)), "is not a valid CID"),
    "cid-v1-truncated": (_set(f"{_FRAG}.cid", cid_v1("x")[:-4]), "is not a valid CID"),
    "cid-int": (_set(f"{_FRAG}.cid", 5), "cid 5 is not a valid CID"),
    "sha-in-version-2": (
        _set(f"{_FRAG}.sha256", _sha("x")),
        r"fragments\[1\] has unknown key.*sha256 \(version 2 checks fragments by their CID\)",
    ),
    "cid-not-checkable": (
        _set(f"{_FRAG}.cid", _cid_blake2b("x")),
        r"fragments\[1\].cid .* is not a sha2-256 CID",
    ),
    "version-1-without-sha": (
        _set("version", 1),
        r"segments\[0\]: fragments\[0\] lacks required key.*sha256",
    ),
    "parent-bad": (_set("parent", "Qmnope"), "parent 'Qmnope' is not a valid CID"),
    "parent-null": (_set("parent", None), "parent None is not a valid CID"),
    "created-offset": (_set("created", "2025-11-25T12:00:00+00:00"), "must look like"),
    "created-space": (_set("created", "2025-11-25 12:00:00Z"), "must look like"),
    "created-fraction": (_set("created", "2025-11-25T12:00:00.5Z"), "must look like"),
    "created-feb-30": (_set("created", "2025-02-30T12:00:00Z"), "not a valid date"),
    "created-int": (_set("created", 1764072000), "must look like"),
    "encryption-unknown": (_set("encryption", "aes"), "encryption 'aes' is not supported"),
    "age-header-missing": (_set("age_header", _DELETE), "age_header is required"),
    "age-header-not-base64": (_set("age_header", "%%%%"), "age_header is not valid base64"),
    "age-header-no-padding": (_set("age_header", "QQ"), "age_header is not valid base64"),
    "age-header-trailing-bits": (_set("age_header", "QR=="), "not canonical base64"),
    "age-header-wrong-intro": (
        _set("age_header", base64.b64encode(b"age-encryption.org/v2\n--- x\n").decode()),
        "does not start with",
    ),
    "age-header-no-mac": (
        _set("age_header", base64.b64encode(b"age-encryption.org/v1\n").decode()),
        "does not end with the '--- MAC' line",
    ),
    "sealed-metadata-object": (_set("metadata", {"name": "x"}), "sealed metadata must be a str"),
    "sealed-metadata-length": (
        _set("metadata", base64.b64encode(bytes(20)).decode()),
        "metadata: sealed metadata is 20 bytes, not an age payload length",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_manifest_is_refused(case: str) -> None:
    mutate, message = INVALID[case]
    obj = _obj(make_manifest(100, 2, 3, 64))
    mutate(obj)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(canonical_json(obj))


VERSION_1_INVALID: dict[str, tuple[Mutation, str]] = {
    "sha-upper": (_set(f"{_FRAG}.sha256", _sha("x").upper()), "64 lowercase hex digits"),
    "sha-short": (_set(f"{_FRAG}.sha256", _sha("x")[:63]), "64 lowercase hex digits"),
    "sha-not-hex": (_set(f"{_FRAG}.sha256", "g" * 64), "64 lowercase hex digits"),
    "sha-missing": (_set(f"{_FRAG}.sha256", _DELETE), r"fragments\[1\] lacks.*sha256"),
}


@pytest.mark.parametrize("case", sorted(VERSION_1_INVALID))
def test_invalid_version_1_manifest_is_refused(case: str) -> None:
    mutate, message = VERSION_1_INVALID[case]
    obj = _obj(make_manifest(100, 2, 3, 64, version=1))
    mutate(obj)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(canonical_json(obj))


PUBLIC_INVALID: dict[str, tuple[Mutation, str]] = {
    "age-header-present": (
        _set("age_header", base64.b64encode(AGE_HEADER).decode()),
        "age_header must be absent",
    ),
    "metadata-string": (_set("metadata", "c2VhbGVk"), "metadata must be a JSON object"),
    "metadata-size": (_set("metadata.size", 99), "metadata.size 99 differs from payload_size"),
    "metadata-unknown-key": (_set("metadata.owner", "x"), "metadata has unknown key.*owner"),
    "metadata-name-path": (_set("metadata.name", "../x"), "is a path"),
    "metadata-recipients": (
        _set("metadata.recipients", [AGE_A]),
        "metadata.recipients must be absent when encryption is 'none'",
    ),
}


@pytest.mark.parametrize("case", sorted(PUBLIC_INVALID))
def test_invalid_public_manifest_is_refused(case: str) -> None:
    mutate, message = PUBLIC_INVALID[case]
    obj = _obj(make_manifest(100, 2, 3, 64, encrypted=False))
    mutate(obj)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(canonical_json(obj))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff{}", "not valid UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # a BOM
        (b"[]", "must be a JSON object, got an array"),
        (b"null", "must be a JSON object, got null"),
        (b'{"format":"a","format":"b"}', "duplicate key 'format'"),
        (b'{"x":NaN}', "NaN is not allowed"),
        (b'{"x":-Infinity}', "-Infinity is not allowed"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"format":"fusenode-manifest","version":1}', "lacks required key"),
    ],
    ids=[
        "empty",
        "truncated",
        "not-utf8",
        "bom",
        "array",
        "null",
        "duplicate",
        "nan",
        "infinity",
        "deep",
        "almost-empty",
    ],
)
def test_malformed_json_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(data)


def test_oversized_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(ManifestError, match="larger than the"):
        Manifest.from_bytes(b" " * (MAX_MANIFEST_SIZE + 1))


def test_cid_v1_fragments_are_accepted() -> None:
    obj = _obj(make_manifest())
    obj["segments"][0]["fragments"][0]["cid"] = cid_v1("raw", codec=0x55)
    assert Manifest.from_bytes(canonical_json(obj)).segments[0].fragments[0].cid.startswith("b")


# --- construction in code validates too -------------------------------------------------


def test_construction_validates() -> None:
    good = make_manifest()
    with pytest.raises(ManifestError, match="age_header is required"):
        Manifest(
            created=good.created,
            encryption="age-v1",
            erasure=good.erasure,
            payload_size=good.payload_size,
            segments=good.segments,
            metadata=good.metadata,
        )
    with pytest.raises(ManifestError, match="must be in UTC"):
        Manifest(
            created=datetime(2025, 1, 1, tzinfo=timezone(timedelta(hours=1))),
            encryption="age-v1",
            erasure=good.erasure,
            payload_size=good.payload_size,
            segments=good.segments,
            metadata=good.metadata,
            age_header=AGE_HEADER,
        )
    with pytest.raises(ManifestError, match="k=5 n=5 are invalid"):
        ErasureParams(k=5, n=5, segment_size=64)
    with pytest.raises(ManifestError, match="must be listed in index order"):
        SegmentRef(index=0, size=4, fragments=(good.segments[0].fragments[1],))
    with pytest.raises(ManifestError, match="cid"):
        FragmentRef(index=0, cid="nope", size=82, sha256=_sha("x"))


# --- CIDs, times, age lengths -----------------------------------------------------------


@pytest.mark.parametrize(
    "cid",
    [
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o",  # "hello world\n", Kubo default
        "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH",  # the empty file
        "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",  # dag-pb CIDv1
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",  # raw CIDv1
    ],
)
def test_real_cids_are_valid(cid: str) -> None:
    assert is_valid_cid(cid)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Qm",
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5",  # 45 characters
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5oo",  # 47
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ffIo",  # I is not base58
        "zdj7WWeQ43G6JJvLWQWZpyHuAMq6uYWRjkBXFad11vE2LHhQ7",  # base58 CIDv1, not canonical
        "BAFYBEIGDYRZT5SFP7UDM7HU76UH7Y26NF3EFUYLQABF3OCLGTQY55FBZDI",  # base32 upper
        "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzd",  # truncated
        "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdj",  # trailing bits
        "b" + base64.b32encode(bytes([1, 0x70, 0, 32]) + bytes(32)).decode().rstrip("=").lower(),
        "b" + base64.b32encode(bytes([2, 0x70, 0x12, 32]) + bytes(32)).decode().rstrip("=").lower(),
        "b" + base64.b32encode(bytes([1, 0xF0, 0, 0x12, 32]) + bytes(32)).decode().rstrip("="),
    ],
)
def test_invalid_cids(text: str) -> None:
    assert not is_valid_cid(text)


def test_non_minimal_varint_cid_is_invalid() -> None:
    raw = bytes([0x81, 0x00, 0x70, 0x12, 32]) + bytes(32)  # version 1 spelled in two bytes
    assert not is_valid_cid("b" + base64.b32encode(raw).decode().rstrip("=").lower())


def test_times() -> None:
    assert format_time(CREATED) == "2025-11-25T12:00:00Z"
    assert parse_time("2025-11-25T12:00:00Z") == CREATED
    now = utc_now()
    assert now.microsecond == 0 and now.tzinfo is UTC
    assert parse_time(format_time(now)) == now
    with pytest.raises(ManifestError, match="whole seconds"):
        format_time(datetime(2025, 1, 1, 0, 0, 0, 5, tzinfo=UTC))
    with pytest.raises(ManifestError, match="must be in UTC"):
        format_time(datetime(2025, 1, 1))


@pytest.mark.parametrize(
    ("payload", "plaintext"),
    [
        (32, 0),
        (33, 1),
        (16 + 65536 + 16, 65536),
        (16 + 65536 + 16 + 17, 65537),
        (16 + 2 * (65536 + 16), 131072),
        (0, None),
        (31, None),
        (16 + 65552 + 16, None),  # an empty final chunk after a full one
        (16 + 65552 + 5, None),  # a final chunk shorter than its tag
    ],
)
def test_age_plaintext_size(payload: int, plaintext: int | None) -> None:
    assert age_plaintext_size(payload) == plaintext


# --- metadata ---------------------------------------------------------------------------


def _metadata(**changes: Any) -> Metadata:
    fields: dict[str, Any] = {
        "name": "resnet50.onnx",
        "size": 102_400,
        "sha256": _sha("model"),
        "created": CREATED,
        "media_type": "application/onnx",
        "provenance": {"source": cid_v0("src"), "passes": ["fuse_bn"], "atol": 1e-5},
    }
    fields.update(changes)
    return Metadata(**fields)


def test_metadata_round_trip() -> None:
    metadata = _metadata()
    data = metadata.to_json()
    assert data == (
        b'{"created":"2025-11-25T12:00:00Z","media_type":"application/onnx",'
        b'"name":"resnet50.onnx","provenance":{"atol":1e-05,"passes":["fuse_bn"],'
        b'"source":"' + cid_v0("src").encode() + b'"},'
        b'"sha256":"' + _sha("model").encode() + b'","size":102400}'
    )
    assert Metadata.from_json(data) == metadata
    minimal = _metadata(media_type=None, provenance=None)
    assert set(json.loads(minimal.to_json())) == {"created", "name", "sha256", "size"}
    assert Metadata.from_json(minimal.to_json()) == minimal


def test_metadata_recipients_round_trip() -> None:
    metadata = _metadata(media_type=None, provenance=None, recipients=[AGE_B, AGE_A])
    assert metadata.recipients == (AGE_B, AGE_A)  # a tuple, order kept (not sorted)
    data = metadata.to_json()
    assert data == (
        b'{"created":"2025-11-25T12:00:00Z","name":"resnet50.onnx",'
        b'"recipients":["' + AGE_B.encode() + b'","' + AGE_A.encode() + b'"],'
        b'"sha256":"' + _sha("model").encode() + b'","size":102400}'
    )
    assert Metadata.from_json(data) == metadata
    assert "recipients" not in json.loads(_metadata().to_json())  # omitted, never null
    obj = json.loads(data)
    with pytest.raises(ManifestError, match="recipients must be an array"):
        Metadata.from_json(canonical_json({**obj, "recipients": None}))


def test_metadata_recipient_strings() -> None:
    """What put_file records: X25519 keys only, deduplicated, order kept; None if none."""
    assert Metadata.recipient_strings([KEY_B, KEY_A, KEY_B]) == (AGE_B, AGE_A)
    assert Metadata.recipient_strings([ScryptPassphrase("pw", log_n=2)]) is None
    assert Metadata.recipient_strings([]) is None


def test_metadata_unicode_name_is_raw_utf8() -> None:
    metadata = _metadata(name="modèle-ü.onnx")
    assert "modèle-ü.onnx".encode() in metadata.to_json()
    assert Metadata.from_json(metadata.to_json()).name == "modèle-ü.onnx"


def test_metadata_provenance_is_copied() -> None:
    provenance = {"passes": ["a"]}
    metadata = _metadata(provenance=provenance)
    provenance["passes"].append("b")
    assert metadata.provenance == {"passes": ["a"]}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": ""}, "allowed 1..255"),
        ({"name": "x" * 256}, "allowed 1..255"),
        ({"name": "é" * 128}, "256 UTF-8 bytes"),
        ({"name": "."}, "is a path"),
        ({"name": ".."}, "is a path"),
        ({"name": "a/b"}, "is a path"),
        ({"name": "..\\evil"}, "is a path"),
        ({"name": "a\nb"}, "control characters"),
        ({"name": "a\x00b"}, "control characters"),
        ({"name": "\ud800"}, "lone surrogate"),
        ({"name": 5}, "name must be a string"),
        ({"size": -1}, "size -1 is out of range"),
        ({"size": True}, "size must be an integer"),
        ({"sha256": "abc"}, "64 lowercase hex"),
        ({"created": "2025-11-25T12:00:00Z"}, "must be a datetime"),
        ({"media_type": "onnx"}, "is not 'type/subtype'"),
        ({"media_type": "a/b; charset=x"}, "is not 'type/subtype'"),
        ({"provenance": ["not", "an", "object"]}, "provenance must be an object"),
        ({"provenance": {"x": float("nan")}}, "provenance: value cannot be encoded"),
        ({"provenance": {"a": {1: "x"}}}, "provenance.a has a non-string key 1"),
        ({"provenance": {"x": [b"raw"]}}, r"provenance.x\[0\] holds a bytes"),
        ({"provenance": {"x": "y" * (1024 * 1024)}}, "larger than"),
        ({"recipients": ()}, "recipients must not be empty"),
        ({"recipients": AGE_A}, "recipients must be an array of strings, got a string"),
        ({"recipients": {AGE_A: 1}}, "recipients must be an array of strings, got an object"),
        ({"recipients": (AGE_A, 5)}, r"recipients\[1\] must be a string"),
        ({"recipients": (AGE_A, AGE_A)}, r"recipients\[1\] .* is listed twice"),
        ({"recipients": (AGE_A.upper(),)}, "is not an age recipient"),
        ({"recipients": (f" {AGE_A}",)}, "is not an age recipient"),  # not canonical
        ({"recipients": (AGE_A[:-1] + "q",)}, "is not an age recipient"),  # checksum
        ({"recipients": ("age1" + "q" * 58,)}, "is not an age recipient"),
        ({"recipients": (X25519Identity(bytes(32)).to_string(),)}, "not an age recipient"),
    ],
)
def test_invalid_metadata_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        _metadata(**changes)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{", "metadata is not valid JSON"),
        (b"[]", "metadata must be a JSON object"),
        (b'{"name":"a","name":"b"}', "duplicate key 'name'"),
        (b'{"name":"a"}', "lacks required key.*created, sha256, size"),
        (b"x" * (1024 * 1024 + 1), "larger than"),
    ],
)
def test_malformed_metadata_json_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Metadata.from_json(data)


def test_metadata_unknown_key_and_bad_time_in_json() -> None:
    obj = json.loads(_metadata().to_json())
    with pytest.raises(ManifestError, match=r"unknown key.*owner"):
        Metadata.from_json(canonical_json({**obj, "owner": "me"}))
    with pytest.raises(ManifestError, match="created must look like"):
        Metadata.from_json(canonical_json({**obj, "created": "yesterday"}))
    with pytest.raises(ManifestError, match="media_type must be a string"):
        Metadata.from_json(canonical_json({**obj, "media_type": None}))


@pytest.mark.parametrize("where", ["same-segment", "other-segment"])
def test_a_fragment_cid_listed_twice_is_refused(where: str) -> None:
    """Without this a small manifest could name the same fragments over and over and make a
    reader fetch and write far more than anyone stored (docs/format.md 5.4)."""
    obj = _obj(make_manifest(300, 2, 3, 100, True))
    first = obj["segments"][0]["fragments"][0]["cid"]
    if where == "same-segment":
        obj["segments"][0]["fragments"][1]["cid"] = first
    else:
        obj["segments"][2]["fragments"][0]["cid"] = first
    with pytest.raises(ManifestError, match="listed twice"):
        Manifest.from_bytes(json.dumps(obj).encode())
