"""Signed provenance (node/provenance.py) and `verify` (node/verifier.py) on in-memory fakes:
the envelope and statement code, an independent DSSE implementation checking our envelopes
(securesystemslib), and each refusal of verify with its reason and exit code."""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fusenode.errors import Error
from fusenode.node.aio import AsyncBlocks, Bridge
from fusenode.node.config import Config, StorageSection, TrustSection
from fusenode.node.context import NodeContext
from fusenode.node.network import Offline
from fusenode.node.peerkeys import PeerKey, private_key_from_protobuf, public_key_from_peer_id
from fusenode.node.provenance import (
    PAYLOAD_TYPE,
    BadSignature,
    NoProvenance,
    ProvenanceError,
    RecheckFailed,
    RecheckNotRun,
    SourceMismatch,
    SourceMissing,
    SubjectMismatch,
    UntrustedSigner,
    dumps,
    make_statement,
    open_envelope,
    pae,
    sign,
)
from fusenode.node.repo import Repo, identity_text, write_private
from fusenode.node.service import NodeService
from fusenode.node.state import State
from fusenode.passes.fuse import fuse_file
from fusenode.storage import age
from fusenode.storage.errors import InvalidArgument
from fusenode.storage.manifest import Metadata
from tests.support.fakes import FakeBackend, fake_cid
from tests.support.keys import ed25519_protobuf
from tests.support.onnx_models import conv_bn

SELF = "self"


def rsa_protobuf() -> bytes:
    """A libp2p PrivateKey protobuf of a new RSA key (what Kubo generates here)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    length = len(der)
    varint = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return b"\x08\x00\x12" + bytes(varint) + der


@pytest.fixture(scope="module")
def rsa_key() -> PeerKey:
    return private_key_from_protobuf(rsa_protobuf())


@pytest.fixture(scope="module")
def ed_key() -> PeerKey:
    return private_key_from_protobuf(ed25519_protobuf())


@pytest.fixture(scope="module")
def other_key() -> PeerKey:
    return private_key_from_protobuf(ed25519_protobuf())


def statement(subject: str = "a" * 64, source: str | None = None, signer: str = "x") -> dict:
    return make_statement(
        subject_name="m.fused.onnx",
        subject_sha256=subject,
        source_cid=source or fake_cid(b"source"),
        source_sha256="b" * 64,
        pass_name="fuse_bn",
        pass_version="3",
        options={"device": "cpu", "verify": True},
        signer=signer,
        tool_version="0.0.test",
        report={"n_fused": 1, "n_skipped": 0},
        verification={"engine": "onnxruntime", "rtol": 1e-4, "atol": 1e-5, "seed": 0},
        started="2026-01-01T00:00:00Z",
        finished="2026-01-01T00:00:01Z",
        invocation="job-1",
    )


# -- the envelope and the statement ----------------------------------------------------------


def test_pae_is_the_dsse_v1_encoding() -> None:
    # The example of the DSSE spec (protocol.md).
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


@pytest.mark.parametrize("which", ["ed25519", "rsa"])
def test_sign_and_open_round_trip(which: str, ed_key: PeerKey, rsa_key: PeerKey) -> None:
    key = ed_key if which == "ed25519" else rsa_key
    envelope = sign(statement(signer=key.peer_id), key)
    assert envelope["payloadType"] == PAYLOAD_TYPE
    [signature] = envelope["signatures"]
    assert signature["keyid"] == key.peer_id
    # An Ed25519 peer ID names its key; an RSA one is a hash, so the key travels along.
    assert ("publicKey" in signature) == (which == "rsa")
    assert (public_key_from_peer_id(key.peer_id) is None) == (which == "rsa")
    link = open_envelope(copy.deepcopy(envelope))
    assert link.signer == key.peer_id
    assert (link.subject_sha256, link.source_sha256) == ("a" * 64, "b" * 64)
    assert (link.pass_name, link.pass_version) == ("fuse_bn", "3")
    assert link.verification["engine"] == "onnxruntime"
    assert link.statement["predicate"]["runDetails"]["builder"]["id"] == f"urn:libp2p:{key.peer_id}"
    # The exported file is the same envelope.
    assert json.loads(dumps(envelope)) == envelope


@pytest.mark.parametrize("which", ["ed25519", "rsa"])
def test_an_independent_dsse_implementation_verifies_our_envelopes(
    which: str, ed_key: PeerKey, rsa_key: PeerKey, other_key: PeerKey
) -> None:
    """securesystemslib (the DSSE code in-toto and TUF use), given the signer's public key
    from the key itself, not from our envelope or peer-ID code."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    key = ed_key if which == "ed25519" else rsa_key
    envelope = json.loads(dumps(sign(statement(signer=key.peer_id), key)))
    public = key.private_key.public_key()
    if which == "ed25519":
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        theirs = SSlibKey(key.peer_id, "ed25519", "ed25519", {"public": raw.hex()})
    else:
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        theirs = SSlibKey(key.peer_id, "rsa", "rsa-pkcs1v15-sha256", {"public": pem})
    parsed = Envelope.from_dict(copy.deepcopy(envelope))
    assert parsed.payload_type == PAYLOAD_TYPE
    assert set(parsed.verify([theirs], 1)) == {key.peer_id}
    assert json.loads(parsed.payload)["_type"] == "https://in-toto.io/Statement/v1"
    # And it refuses what we refuse: a payload changed after signing.
    tampered = copy.deepcopy(envelope)
    tampered["payload"] = base64.b64encode(parsed.payload.replace(b'"3"', b'"4"')).decode()
    with pytest.raises(VerificationError):
        Envelope.from_dict(copy.deepcopy(tampered)).verify([theirs], 1)
    with pytest.raises(BadSignature, match="does not verify"):
        open_envelope(tampered)
    # A signature by another key under this keyid.
    raw_other = (
        other_key.private_key.public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        .hex()
    )
    stranger = SSlibKey(key.peer_id, "ed25519", "ed25519", {"public": raw_other})
    with pytest.raises(VerificationError):
        Envelope.from_dict(copy.deepcopy(envelope)).verify([stranger], 1)


def test_malformed_envelopes_are_refused_with_their_reason(
    ed_key: PeerKey, rsa_key: PeerKey, other_key: PeerKey
) -> None:
    good = sign(statement(signer=ed_key.peer_id), ed_key)

    def changed(**kw: Any) -> dict:
        env = copy.deepcopy(good)
        env.update(kw)
        return env

    cases = [
        ("not a DSSE envelope", []),
        ("payloadType", changed(payloadType="application/json")),
        ("not valid base64", changed(payload="%%%")),
        ("1 to 8 signatures", changed(signatures=[])),
        ("names no signer", changed(signatures=[{"sig": good["signatures"][0]["sig"]}])),
        ("not a peer ID", changed(signatures=[{**good["signatures"][0], "keyid": "0OIl"}])),
    ]
    for reason, envelope in cases:
        with pytest.raises(BadSignature, match=reason):
            open_envelope(envelope)
    # The keyid of one node over another's signature: the optimizer's name, a forger's key.
    forged = sign(statement(signer=ed_key.peer_id), other_key)
    forged["signatures"][0]["keyid"] = ed_key.peer_id
    with pytest.raises(BadSignature, match="does not verify"):
        open_envelope(forged)
    # RSA: the key carried must be the one the peer ID hashes.
    forged = sign(statement(signer=rsa_key.peer_id), private_key_from_protobuf(rsa_protobuf()))
    forged["signatures"][0]["keyid"] = rsa_key.peer_id
    with pytest.raises(BadSignature, match="signed by another node"):
        open_envelope(forged)
    no_key = sign(statement(signer=rsa_key.peer_id), rsa_key)
    del no_key["signatures"][0]["publicKey"]
    with pytest.raises(BadSignature, match="carries no publicKey"):
        open_envelope(no_key)
    # A valid signature over a statement whose builder is someone else.
    lying = sign(statement(signer=other_key.peer_id), ed_key)
    with pytest.raises(ProvenanceError, match="names builder"):
        open_envelope(lying)
    # Odd but signed byproducts are read as none (no crash on a signer's junk).
    odd = statement(signer=ed_key.peer_id)
    odd["predicate"]["runDetails"]["byproducts"] = 5
    assert open_envelope(sign(odd, ed_key)).verification == {}
    # A valid signature over something that is not fusenode's statement.
    other = statement(signer=ed_key.peer_id)
    other["predicateType"] = "https://example.org/other"
    with pytest.raises(ProvenanceError, match="predicate"):
        open_envelope(sign(other, ed_key))


def test_metadata_keeps_the_envelope_and_checks_its_shape(ed_key: PeerKey) -> None:
    from fusenode.storage.errors import ManifestError
    from fusenode.storage.manifest import utc_now

    envelope = sign(statement(signer=ed_key.peer_id), ed_key)
    meta = Metadata("m.onnx", 1, "c" * 64, utc_now(), attestation=envelope)
    again = Metadata.from_json(meta.to_json())
    assert again.attestation == envelope
    assert open_envelope(dict(again.attestation)).signer == ed_key.peer_id
    for bad in ([], {"payload": "", "payloadType": ""}, {**envelope, "extra": 1}):
        with pytest.raises(ManifestError, match="attestation"):
            Metadata("m.onnx", 1, "c" * 64, utc_now(), attestation=bad)


# -- verify on fakes ---------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    (tmp_path / "tmp").mkdir()
    write_private(tmp_path / "identity.txt", identity_text(age.X25519Identity.generate()))
    return Repo(tmp_path, Config(storage=StorageSection(k=2, n=3, segment_size=1 << 16)))


def run(repo: Repo, scenario: Any) -> Any:
    async def main() -> Any:
        state = State(repo.files.state)
        ctx = NodeContext(SELF, AsyncBlocks(FakeBackend(), Bridge()), state, repo.files.tmp)
        try:
            return await scenario(NodeService(repo, ctx, Offline(ctx)))
        finally:
            state.close()

    return asyncio.run(main())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """A Conv+BN model, its fused copy (as the optimizer makes it), and a wrong 'fused' one."""
    model, _ = conv_bn()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    fused = tmp_path / "m.fused.onnx"
    report = fuse_file(src, fused, device="cpu", verify=True)
    wrong = onnx.load(fused)
    weight = next(t for t in wrong.graph.initializer if len(t.dims) == 4)
    data = onnx.numpy_helper.to_array(weight).copy()
    data *= 2.0
    weight.CopyFrom(onnx.numpy_helper.from_array(data, weight.name))
    bad = tmp_path / "m.wrong.onnx"
    onnx.save(wrong, bad)
    (tmp_path / "report.json").write_text(json.dumps(report))
    return {"source": src, "fused": fused, "wrong": bad}


def attest(key: PeerKey, made: Path, source_cid: str, source_sha: str, **kw: Any) -> dict:
    report = json.loads((made.parent / "report.json").read_text())["verify"]
    st = make_statement(
        subject_name=made.name,
        subject_sha256=kw.get("subject", sha256(made)),
        source_cid=source_cid,
        source_sha256=source_sha,
        pass_name="fuse_bn",
        pass_version="test",
        options={"device": "cpu", "verify": True},
        signer=key.peer_id,
        tool_version="0.0.test",
        report={"n_fused": 1},
        verification={k: report[k] for k in ("engine", "rtol", "atol", "seed", "inputs")},
        started="2026-01-01T00:00:00Z",
        finished="2026-01-01T00:00:01Z",
        invocation="job-1",
    )
    return sign(st, kw.get("signed_by", key))


async def store(service: NodeService, path: Path, attestation: dict | None = None) -> str:
    reply = await service.store(path, None, None, [], False, attestation=attestation)
    return reply["cid"]


def failure(result: dict) -> tuple[str, int, str]:
    assert result["verified"] is False
    f = result["failure"]
    return f["type"], f["exit_code"], f["message"]


def test_verify_passes_names_the_signer_and_checks_trust(
    repo: Repo, models: dict[str, Path], rsa_key: PeerKey, other_key: PeerKey
) -> None:
    async def scenario(service: NodeService) -> None:
        src = await store(service, models["source"])
        cid = await store(
            service,
            models["fused"],
            attest(rsa_key, models["fused"], src, sha256(models["source"])),
        )
        result = await service.verify(cid, None, [], False)
        assert result["verified"] and result["failure"] is None
        assert result["signer"] == rsa_key.peer_id and result["trusted"] is None
        assert result["origin"] == src and len(result["links"]) == 1
        assert result["links"][0]["source"] == {"cid": src, "sha256": sha256(models["source"])}
        trusted = await service.verify(cid, None, [rsa_key.peer_id], False)
        assert trusted["verified"] and trusted["trusted"] is True
        # Unknown signer: a valid signature by a peer not among those trusted.
        kind, code, message = failure(await service.verify(cid, None, [other_key.peer_id], False))
        assert (kind, code) == ("UntrustedSigner", UntrustedSigner.exit_code) == (kind, 16)
        assert rsa_key.peer_id in message and "not a trusted signer" in message
        # [trust] signers in config.toml counts as --trust.
        service.config = dataclasses.replace(
            service.config, trust=TrustSection(signers=(other_key.peer_id,))
        )
        kind, _, _ = failure(await service.verify(cid, None, [], False))
        assert kind == "UntrustedSigner"
        assert (await service.verify(cid, None, [rsa_key.peer_id], False))["verified"]
        # The exported envelope is the stored one.
        exported = await service.provenance(cid, None)
        assert exported["signer"] == rsa_key.peer_id
        assert open_envelope(exported["envelope"]).source_cid == src

    run(repo, scenario)


def test_a_plain_put_has_no_provenance(repo: Repo, models: dict[str, Path]) -> None:
    async def scenario(service: NodeService) -> None:
        cid = await store(service, models["source"])
        kind, code, message = failure(await service.verify(cid, None, [], False))
        assert (kind, code) == ("NoProvenance", NoProvenance.exit_code) == (kind, 11)
        assert "has no provenance" in message
        with pytest.raises(NoProvenance):
            await service.provenance(cid, None)

    run(repo, scenario)


def test_each_refusal_has_its_reason_and_code(
    repo: Repo, models: dict[str, Path], ed_key: PeerKey, other_key: PeerKey
) -> None:
    async def scenario(service: NodeService) -> None:
        src = await store(service, models["source"])
        src_sha = sha256(models["source"])
        fused = models["fused"]

        async def verdict(attestation: dict, trust: tuple = ()) -> tuple[str, int, str]:
            cid = await store(service, fused, attestation)
            return failure(await service.verify(cid, None, list(trust), False))

        # Tampered envelope: the statement changed after signing (another source named).
        envelope = attest(ed_key, fused, src, src_sha)
        payload = json.loads(base64.b64decode(envelope["payload"]))
        payload["predicate"]["buildDefinition"]["externalParameters"]["version"] = "99"
        envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
        kind, code, message = await verdict(envelope)
        assert (kind, code) == ("BadSignature", BadSignature.exit_code) == (kind, 12)
        assert "altered after it was signed" in message

        # Wrong subject: a valid signature for other bytes (the source's own digest).
        kind, code, message = await verdict(attest(ed_key, fused, src, src_sha, subject=src_sha))
        assert (kind, code) == (
            "SubjectMismatch",
            SubjectMismatch.exit_code,
        ) and "not this model's" in message

        # Missing parent: the source named does not resolve.
        nowhere = fake_cid(b"a manifest nobody stored")
        kind, code, message = await verdict(attest(ed_key, fused, nowhere, src_sha))
        assert (kind, code) == ("SourceMissing", 14) and nowhere in message

        # A source that resolves but is another model.
        other = await store(service, models["wrong"])
        kind, code, message = await verdict(attest(ed_key, fused, other, src_sha))
        assert (kind, code) == ("SourceMismatch", 15) and "not made from it" in message

        # A forged provenance by a key holder who is not the optimizer: under the optimizer's
        # name (its keyid) but signed with the forger's key, the signature fails; under the
        # forger's own name it is valid but not trusted.
        forged = attest(ed_key, fused, src, src_sha, signed_by=other_key)
        kind, code, message = await verdict(forged, (ed_key.peer_id,))
        assert (kind, code) == ("ProvenanceError", 10) and "names builder" in message
        forged["signatures"][0]["keyid"] = ed_key.peer_id
        kind, code, _ = await verdict(forged, (ed_key.peer_id,))
        assert (kind, code) == ("BadSignature", 12)
        kind, code, message = await verdict(
            attest(other_key, fused, src, src_sha), (ed_key.peer_id,)
        )
        assert (kind, code) == ("UntrustedSigner", 16) and other_key.peer_id in message
        # SourceMismatch and SourceMissing are their own classes.
        assert (SourceMissing.exit_code, SourceMismatch.exit_code) == (14, 15)

    run(repo, scenario)


def test_recheck_runs_the_models_here(repo: Repo, models: dict[str, Path], ed_key: PeerKey) -> None:
    async def scenario(service: NodeService) -> None:
        src = await store(service, models["source"])
        src_sha = sha256(models["source"])
        good = await store(service, models["fused"], attest(ed_key, models["fused"], src, src_sha))
        result = await service.verify(good, None, [ed_key.peer_id], True)
        assert result["verified"], result["failure"]
        recheck = result["links"][0]["recheck"]
        assert recheck["ok"] and recheck["engine"] == "onnxruntime"
        assert recheck["max_abs_error"] <= 1e-4
        # A signed but wrong model: every check but the recheck passes.
        wrong = models["wrong"]
        bad = await store(service, wrong, attest(ed_key, wrong, src, src_sha))
        assert (await service.verify(bad, None, [ed_key.peer_id], False))["verified"]
        kind, code, message = failure(await service.verify(bad, None, [ed_key.peer_id], True))
        assert (kind, code) == ("RecheckFailed", RecheckFailed.exit_code) == (kind, 17)
        assert "outputs differ" in message

    run(repo, scenario)


def test_a_chain_is_verified_link_by_link(
    repo: Repo, models: dict[str, Path], ed_key: PeerKey, other_key: PeerKey
) -> None:
    async def scenario(service: NodeService) -> None:
        src = await store(service, models["source"])
        fused = models["fused"]
        first = await store(service, fused, attest(ed_key, fused, src, sha256(models["source"])))
        # A second optimizer re-optimizes the first's output (a copy, other bytes).
        again = fused.with_name("m.fused.fused.onnx")
        model = onnx.load(fused)
        model.doc_string = "optimized again"
        onnx.save(model, again)
        second = await store(service, again, attest(other_key, again, first, sha256(fused)))
        result = await service.verify(second, None, [], False)
        assert result["verified"], result["failure"]
        assert [link["cid"] for link in result["links"]] == [second, first]
        assert [link["signer"] for link in result["links"]] == [
            other_key.peer_id,
            ed_key.peer_id,
        ]
        assert result["origin"] == src
        # Trusting only the last link's signer is not enough: each link is checked.
        kind, _, message = failure(await service.verify(second, None, [other_key.peer_id], False))
        assert kind == "UntrustedSigner" and first in message
        both = [other_key.peer_id, ed_key.peer_id]
        assert (await service.verify(second, None, both, False))["verified"]
        # A broken link further down fails the whole chain.
        third_src = await store(
            service, fused, attest(ed_key, fused, fake_cid(b"gone"), sha256(models["source"]))
        )
        top = await store(service, again, attest(other_key, again, third_src, sha256(fused)))
        kind, _, _ = failure(await service.verify(top, None, [], False))
        assert kind == "SourceMissing"

    run(repo, scenario)


def test_a_public_model_verifies_without_a_key(
    repo: Repo, models: dict[str, Path], ed_key: PeerKey
) -> None:
    async def scenario(service: NodeService) -> None:
        src = (await service.store(models["source"], None, None, [], True))["cid"]
        envelope = attest(ed_key, models["fused"], src, sha256(models["source"]))
        cid = (await service.store(models["fused"], None, None, [], True, attestation=envelope))[
            "cid"
        ]
        # In clear in the manifest: anyone may read and check it.
        manifest = await service.manifest(cid)
        assert manifest.metadata.attestation == envelope
        result = await service.verify(cid, None, [ed_key.peer_id], True)
        assert result["verified"] and result["links"][0]["recheck"]["ok"]

    run(repo, scenario)


# -- the reviewer's findings: recheck by local judgement, unreadable models, bad inputs -------


def attest_with(key: PeerKey, made: Path, source_cid: str, source_sha: str, **evidence: Any):
    """`attest` whose signed verification evidence has ``evidence`` written over it."""
    report = json.loads((made.parent / "report.json").read_text())["verify"]
    verification = {k: report[k] for k in ("engine", "rtol", "atol", "seed", "inputs")}
    verification.update(evidence)
    st = make_statement(
        subject_name=made.name,
        subject_sha256=sha256(made),
        source_cid=source_cid,
        source_sha256=source_sha,
        pass_name="fuse_bn",
        pass_version="test",
        options={"device": "cpu", "verify": True},
        signer=key.peer_id,
        tool_version="0.0.test",
        report={"n_fused": 1},
        verification=verification,
        started="2026-01-01T00:00:00Z",
        finished="2026-01-01T00:00:01Z",
        invocation="job-1",
    )
    return sign(st, key)


def test_recheck_judges_by_this_nodes_tolerances_not_the_signed_ones(
    repo: Repo, models: dict[str, Path], ed_key: PeerKey
) -> None:
    async def scenario(service: NodeService) -> None:
        src = await store(service, models["source"])
        src_sha = sha256(models["source"])
        wrong = models["wrong"]
        loose = attest_with(ed_key, wrong, src, src_sha, rtol=1e9, atol=1e9)
        bad = await store(service, wrong, loose)
        kind, code, message = failure(await service.verify(bad, None, [ed_key.peer_id], True))
        assert (kind, code) == ("RecheckFailed", 17)
        assert "outputs differ" in message and "this node's tolerances" in message
        assert "1e-05" in message  # float32's own atol, not the signed 1e9
        # Tighter signed tolerances are kept (the signer may only tighten).
        fused = models["fused"]
        tight = attest_with(ed_key, fused, src, src_sha, rtol=1e-5, atol=1e-6)
        good = await store(service, fused, tight)
        result = await service.verify(good, None, [ed_key.peer_id], True)
        assert result["verified"], result["failure"]
        assert result["links"][0]["recheck"]["atol"] == 1e-6

    run(repo, scenario)


def test_recheck_that_cannot_run_here_is_not_outputs_differ(
    repo: Repo, models: dict[str, Path], ed_key: PeerKey
) -> None:
    async def scenario(service: NodeService) -> None:
        src = await store(service, models["source"])
        src_sha = sha256(models["source"])
        fused = models["fused"]
        inputs = json.loads((fused.parent / "report.json").read_text())["verify"]["inputs"]
        huge = {name: [1, 4, 1 << 14, 1 << 14] for name in inputs}  # 2^30 elements
        cid = await store(service, fused, attest_with(ed_key, fused, src, src_sha, inputs=huge))
        kind, code, message = failure(await service.verify(cid, None, [], True))
        assert (kind, code) == ("RecheckNotRun", RecheckNotRun.exit_code) == (kind, 18)
        assert "could not run here" in message and "input elements" in message
        assert "differ" not in message
        # A memory limit hit while running: not a verdict on the outputs either.
        good = await store(service, fused, attest(ed_key, fused, src, src_sha))
        optimizer = dataclasses.replace(service.config.optimizer, max_memory=1 << 20)
        service.config = dataclasses.replace(service.config, optimizer=optimizer)
        kind, code, message = failure(await service.verify(good, None, [], True))
        assert (kind, code) == ("RecheckNotRun", 18)
        assert "could not run here" in message and "max_memory" in message

    run(repo, scenario)


def test_a_model_no_key_opens_has_no_provenance_this_node_can_read(
    repo: Repo, models: dict[str, Path], ed_key: PeerKey, tmp_path: Path
) -> None:
    stranger = age.X25519Identity.generate()

    async def scenario(service: NodeService) -> None:
        reply = await service.store(
            models["source"], None, None, [stranger.recipient.to_string()], False
        )
        cid = reply["cid"]
        kind, code, message = failure(await service.verify(cid, None, [], False))
        assert (kind, code) == ("NoProvenance", 11)
        assert message.startswith(f"{cid}: no provenance this node can read: no key given opens")
        assert "recipient stanza" in message
        # With the key it is sealed to: a plain put, so still no provenance (but readable).
        key_file = tmp_path / "stranger.txt"
        write_private(key_file, identity_text(stranger))
        kind, code, message = failure(await service.verify(cid, str(key_file), [], False))
        assert (kind, code) == ("NoProvenance", 11) and "has no provenance" in message

    run(repo, scenario)


def test_a_bad_identity_or_trust_leaves_no_temp_folder(
    repo: Repo, models: dict[str, Path], tmp_path: Path
) -> None:
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("hello\n")

    async def scenario(service: NodeService) -> None:
        cid = await store(service, models["source"])
        before = sorted(repo.files.tmp.iterdir())
        for path in (str(tmp_path / "missing.txt"), str(not_a_key)):
            with pytest.raises(Error):
                await service.verify(cid, path, [], False)
        for bad in ("garbage", "12D3KooW", "Qm" + "1" * 44):
            with pytest.raises(InvalidArgument, match="peer ID"):
                await service.verify(cid, None, [bad], False)
        assert sorted(repo.files.tmp.iterdir()) == before
        assert not [p for p in repo.files.tmp.iterdir() if p.name.startswith(".verify-")]

    run(repo, scenario)


@pytest.mark.parametrize("bad", ["garbage", "12D3KooW", "QmNotAPeerId"])
def test_trust_must_name_peer_ids(bad: str, tmp_path: Path, ed_key: PeerKey) -> None:
    from fusenode.node.cli import main
    from fusenode.node.config import load_config
    from fusenode.node.errors import ConfigError
    from fusenode.node.peerkeys import PeerAuthError, check_peer_id

    with pytest.raises(PeerAuthError):
        check_peer_id(bad)
    assert check_peer_id(ed_key.peer_id) == ed_key.peer_id
    path = tmp_path / "config.toml"
    path.write_text(f'[trust]\nsigners = ["{ed_key.peer_id}", "{bad}"]\n')
    with pytest.raises(ConfigError, match=r"\[trust\] signers: .*not"):
        load_config(path, env={})
    path.write_text(f'[trust]\nsigners = ["{ed_key.peer_id}"]\n')
    assert load_config(path, env={}).trust.signers == (ed_key.peer_id,)
    with pytest.raises(SystemExit) as stop:
        main(["verify", fake_cid(b"x"), "--trust", bad, "--repo", str(tmp_path / "r")])
    assert stop.value.code == 2
