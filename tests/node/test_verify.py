"""The provenance contract on a real 3-node network (separate daemons, 127.0.0.1 only):
node1 optimizes a model node0 stored; node2, which made neither, verifies the result with
--trust node1, exports its provenance for an independent DSSE implementation, and refuses a
model stored with a plain put and a signer it was not told to trust."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import serialization

from fusenode.node import examples
from fusenode.node.peerkeys import load_private_key
from fusenode.storage import age
from tests.support.cli import assert_clean_error, assert_ok

pytestmark = pytest.mark.slow

CONFIG = {
    ("storage", "segment_size"): str(1 << 20),
    ("storage", "fetch_timeout"): "20.0",
}
ok = assert_ok


def last_line(proc) -> str:
    return ok(proc).stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def net(network):
    return network(3, CONFIG)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    identity = age.X25519Identity.generate()
    path = tmp_path_factory.mktemp("keys") / "user.txt"
    path.write_text(identity.to_string() + "\n")
    return path, identity.recipient.to_string()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return examples.mobilenetv2_like(tmp_path_factory.mktemp("m") / "mobilenet.onnx")


@pytest.fixture(scope="module")
def stored(net, user, model):
    optimizer = json.loads(ok(net.cli(1, "id", "--json")).stdout)["recipient"]
    put = ("put", str(model), "-k", "2", "-n", "3")
    return last_line(net.cli(0, *put, "--recipient", optimizer, "--recipient", user[1]))


@pytest.fixture(scope="module")
def optimized(net, stored):
    return last_line(net.cli(1, "optimize", stored))


def test_a_receiver_verifies_a_fused_model(net, user, model, stored, optimized):
    signer = net.nodes[1].peer_id
    proc = ok(net.cli(2, "verify", optimized, "--identity", str(user[0]), "--trust", signer))
    assert proc.returncode == 0
    assert f"signed by {signer}" in proc.stdout and "(trusted)" in proc.stdout
    assert f"made from {stored}" in proc.stdout
    # --json: the structured result.
    result = json.loads(
        ok(
            net.cli(2, "verify", optimized, "--identity", str(user[0]), "--trust", signer, "--json")
        ).stdout
    )
    assert result["verified"] and result["signer"] == signer and result["trusted"] is True
    assert result["origin"] == stored and len(result["links"]) == 1
    link = result["links"][0]
    assert link["source"] == {
        "cid": stored,
        "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
    }
    assert link["verification"]["ok"] and link["verification"]["inputs"]
    info = ok(net.cli(2, "info", optimized, "--identity", str(user[0]))).stdout
    assert f"signed provenance: signed by {signer}" in info
    # Without a trust list the signature is still checked and the signer named: exit 0.
    proc = ok(net.cli(2, "verify", optimized, "--identity", str(user[0])))
    assert f"signed by {signer}" in proc.stdout and "no trusted signers given" in proc.stderr


def test_an_untrusted_signer_and_a_plain_put_are_refused(net, user, model, stored, optimized):
    proc = net.cli(
        2, "verify", optimized, "--identity", str(user[0]), "--trust", net.nodes[0].peer_id
    )
    assert proc.returncode == 16, proc.stderr
    assert "not a trusted signer" in proc.stderr and net.nodes[1].peer_id in proc.stderr
    assert_clean_error(
        net.cli(2, "verify", stored, "--identity", str(user[0])), "has no provenance", 11
    )
    proc = net.cli(2, "verify", stored, "--identity", str(user[0]), "--json")
    assert proc.returncode == 11
    assert json.loads(proc.stdout)["failure"]["type"] == "NoProvenance"


def test_a_plain_put_no_key_here_opens_has_no_provenance_this_node_can_read(net, model):
    """A plain put on node0 (sealed to node0's own key), verified on node2 with its own key:
    no provenance this node can read (11), not a bare "no identity matches" (5)."""
    plain = last_line(net.cli(0, "put", str(model), "-k", "2", "-n", "3"))
    proc = net.cli(2, "verify", plain)
    assert_clean_error(proc, "no provenance this node can read", 11)
    assert f"{plain}: no provenance this node can read: no key given opens it" in proc.stderr
    # A --trust that is not a peer ID is a usage error, not a distrusted signer.
    proc = net.cli(2, "verify", plain, "--trust", "12D3KooW")
    assert proc.returncode == 2 and "not a peer ID" in proc.stderr, proc.stderr


def test_recheck_runs_the_models_on_the_receiver(net, user, optimized):
    signer = net.nodes[1].peer_id
    result = json.loads(
        ok(
            net.cli(
                2,
                "verify",
                optimized,
                "--identity",
                str(user[0]),
                "--trust",
                signer,
                "--recheck",
                "--json",
            )
        ).stdout
    )
    recheck = result["links"][0]["recheck"]
    assert result["verified"] and recheck["ok"] and recheck["engine"] == "onnxruntime"


def test_the_exported_provenance_checks_with_standard_dsse_tooling(net, user, optimized, tmp_path):
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    out = tmp_path / "provenance.json"
    ok(net.cli(2, "provenance", optimized, "--identity", str(user[0]), "-o", str(out)))
    envelope = json.loads(out.read_text())
    # "-o -": the same envelope on stdout (and no file named "-").
    piped = ok(net.cli(2, "provenance", optimized, "--identity", str(user[0]), "-o", "-"))
    assert json.loads(piped.stdout) == envelope and "wrote stdout" in piped.stderr
    # The optimizer's public key, from its own Kubo config (not from the envelope).
    key = load_private_key(net.nodes[1].repo)
    assert key.peer_id == net.nodes[1].peer_id
    pem = (
        key.private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    scheme = "rsa-pkcs1v15-sha256" if key.key_type == 0 else "ed25519"
    if key.key_type == 0:
        theirs = SSlibKey(key.peer_id, "rsa", scheme, {"public": pem})
    else:
        raw = key.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        theirs = SSlibKey(key.peer_id, "ed25519", scheme, {"public": raw.hex()})
    parsed = Envelope.from_dict(copy.deepcopy(envelope))
    assert set(parsed.verify([theirs], 1)) == {key.peer_id}
    statement = json.loads(parsed.payload)
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert deps[0]["uri"].startswith("ipfs://")
    # Without a key that opens the sealed metadata there is nothing to export.
    proc = net.cli(2, "provenance", optimized, "-o", str(tmp_path / "x.json"))
    assert proc.returncode == 5, proc.stderr


def test_verify_without_a_daemon(cli, tmp_path):
    """The offline runner: the same use case on the repo's own embedded node."""
    repo = tmp_path / "repo"
    cli.ok("init", "--repo", repo)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not signed by anyone" * 100)
    cid = cli.ok("put", model, "--repo", repo).stdout.strip().splitlines()[-1]
    cli.fails("verify", cid, "--repo", repo, text="has no provenance", code=11)
    cli.fails("provenance", cid, "-o", tmp_path / "p.json", "--repo", repo, code=11)
    assert not (tmp_path / "p.json").exists()


def test_a_chain_is_verified_link_by_link_on_the_network(net, user, stored, optimized):
    """node2 optimizes node1's output again: two signers, two links, down to the upload. The
    user first shares the output with node2 (a new CID, the same bytes: its provenance still
    holds)."""
    node2 = json.loads(ok(net.cli(2, "id", "--json")).stdout)["recipient"]
    shared = last_line(
        net.cli(0, "share", optimized, "--recipient", node2, "--identity", str(user[0]))
    )
    again = last_line(net.cli(2, "optimize", shared, "--recipient", user[1]))
    assert again not in (optimized, shared, stored)
    signers = [net.nodes[2].peer_id, net.nodes[1].peer_id]
    result = json.loads(
        ok(
            net.cli(
                0,
                "verify",
                again,
                "--identity",
                str(user[0]),
                "--json",
                "--trust",
                signers[0],
                "--trust",
                signers[1],
            )
        ).stdout
    )
    assert result["verified"] and result["origin"] == stored
    assert [link["cid"] for link in result["links"]] == [again, shared]
    assert [link["signer"] for link in result["links"]] == signers
    # Trusting only the last optimizer is not enough.
    proc = net.cli(0, "verify", again, "--identity", str(user[0]), "--trust", signers[0])
    assert proc.returncode == 16 and shared in proc.stderr
