"""Optimize, share and announce on a real 4-node network (separate daemons, 127.0.0.1 only).

node1 is the optimizer the user names explicitly; node3 is configured as an optimizer that
picks up the models node0 announces by itself (and nobody else's); node2 optimizes nothing
over 20 kB. The scenario tests run in order on one network.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import onnx
import pytest

from fusenode.node import examples
from fusenode.node.localnet import set_config
from fusenode.storage import age
from tests.support.cli import assert_ok
from tests.support.onnx_models import assert_close, count_ops, run

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
    small = {("optimizer", "max_model_bytes"): "20000"}
    net = network(4, CONFIG, per_node={2: small})
    # node3 hears node0's announcements only: its ID is known once the network is up.
    set_config(net.nodes[3].repo, "optimizer", "enabled", "true")
    set_config(net.nodes[3].repo, "optimizer", "announcers", json.dumps([net.nodes[0].peer_id]))
    net.kill(3, signal.SIGTERM)
    net.start_node(3)
    time.sleep(1.0)
    return net


@pytest.fixture(scope="module")
def keys(net, tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for who in ("user", "third"):
        identity = age.X25519Identity.generate()
        path = folder / f"{who}.txt"
        path.write_text(identity.to_string() + "\n")
        out[who] = (path, identity.recipient.to_string())
    out["optimizer"] = (None, json.loads(ok(net.cli(1, "id", "--json")).stdout)["recipient"])
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return examples.mobilenetv2_like(tmp_path_factory.mktemp("m") / "mobilenet.onnx")


@pytest.fixture(scope="module")
def stored(net, keys, model):
    return last_line(
        net.cli(
            0,
            "put",
            str(model),
            "-k",
            "2",
            "-n",
            "4",
            "--recipient",
            keys["optimizer"][1],
            "--recipient",
            keys["user"][1],
        )
    )


@pytest.fixture(scope="module")
def optimized(net, stored):
    return last_line(net.cli(1, "optimize", stored))


def test_optimize_then_fetch_with_user_key(net, keys, model, stored, optimized, tmp_path):
    assert optimized != stored
    out = tmp_path / "fused.onnx"
    ok(net.cli(2, "get", optimized, "-o", str(out), "--identity", str(keys["user"][0])))
    fused = onnx.load(out)
    onnx.checker.check_model(fused, full_check=True)
    assert count_ops(onnx.load(model), "BatchNormalization") > 0
    assert count_ops(fused, "BatchNormalization") == 0
    feeds = examples.random_inputs(model, batch=2, seed=3)
    assert_close(run(out, feeds), run(model, feeds), np.float32)


def test_info_shows_provenance(net, keys, model, stored, optimized):
    import hashlib

    info = json.loads(
        ok(net.cli(2, "info", optimized, "--identity", str(keys["user"][0]), "--json")).stdout
    )
    assert info["parent"] == stored and info["readable"]
    meta = info["metadata"]
    prov = meta["provenance"]
    assert prov["source"] == stored and prov["pass"] == "fuse-batchnorm" and prov["pass_version"]
    assert prov["input_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert prov["verification"]["ok"] and prov["verification"]["engine"] == "onnxruntime"
    assert (
        prov["report"]["n_fused"] == prov["report"]["nodes_before"] - prov["report"]["nodes_after"]
    )
    assert sorted(meta["recipients"]) == sorted([keys["user"][1], keys["optimizer"][1]])
    sealed = json.loads(ok(net.cli(2, "info", optimized, "--json")).stdout)  # no key given
    assert sealed["readable"] is False and sealed["metadata"] is None
    # Format version 3: without a key, neither the parent nor the creation time shows.
    assert sealed["parent"] is None and sealed["created"] is None and sealed["size_hidden"]


def test_share_with_a_third_key(net, keys, optimized, tmp_path):
    shared = last_line(
        net.cli(
            2,
            "share",
            optimized,
            "--recipient",
            keys["third"][1],
            "--identity",
            str(keys["user"][0]),
        )
    )
    assert shared != optimized
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    ok(net.cli(3, "get", shared, "-o", str(a), "--identity", str(keys["third"][0])))
    ok(net.cli(2, "get", optimized, "-o", str(b), "--identity", str(keys["user"][0])))
    assert a.read_bytes() == b.read_bytes()
    proc = net.cli(
        3, "get", optimized, "-o", str(tmp_path / "c"), "--identity", str(keys["third"][0])
    )
    assert proc.returncode == 5 and "no identity matches" in proc.stderr  # the old CID: no


def test_jobs_and_asking_again(net, stored, optimized):
    jobs = json.loads(ok(net.cli(1, "jobs", "--json")).stdout)
    job = next(j for j in jobs if j["source"] == stored)
    assert job["state"] == "done" and job["result"] == optimized and job["seconds"] > 0
    t = time.monotonic()
    assert last_line(net.cli(1, "optimize", stored)) == optimized  # the existing result
    assert time.monotonic() - t < 10
    assert len(json.loads(ok(net.cli(1, "jobs", "--json")).stdout)) == len(jobs)


def test_bad_inputs_fail_the_job_not_the_daemon(net, keys, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(5000))
    cid = last_line(
        net.cli(0, "put", str(junk), "-k", "2", "-n", "4", "--recipient", keys["optimizer"][1])
    )
    proc = net.cli(1, "optimize", cid)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not an ONNX model" in proc.stderr
    foreign = last_line(
        net.cli(0, "put", str(junk), "-k", "2", "-n", "4", "--recipient", keys["third"][1])
    )
    proc = net.cli(1, "optimize", foreign)
    assert proc.returncode == 1 and "holds no key" in proc.stderr
    jobs = json.loads(ok(net.cli(1, "jobs", "--json")).stdout)
    failed = [j for j in jobs if j["source"] in (cid, foreign)]
    assert {j["state"] for j in failed} == {"failed"} and all(j["error"] for j in failed)
    ok(net.cli(1, "id"))  # still serving


def test_restart_optimizer_mid_job(net, keys, tmp_path):
    src = examples.resnet50_like(tmp_path / "resnet.onnx", width=0.5, image_size=32)
    cid = last_line(
        net.cli(0, "put", str(src), "-k", "2", "-n", "4", "--recipient", keys["optimizer"][1])
    )
    job_id = int(last_line(net.cli(1, "optimize", cid, "--detach")))
    deadline = time.monotonic() + 60
    while True:
        job = json.loads(ok(net.cli(1, "jobs", "--json")).stdout)[job_id - 1]
        if job["state"] == "running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert job["state"] in ("running", "done")
    net.kill(1, signal.SIGTERM)  # stop the optimizer mid-job
    net.start_node(1)
    deadline = time.monotonic() + 180
    while True:
        job = json.loads(ok(net.cli(1, "jobs", "--json")).stdout)[job_id - 1]
        if job["state"] in ("done", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert job["state"] == "done", job
    assert job["result"]


def test_announced_models_are_picked_up(net, keys, model):
    node3 = json.loads(ok(net.cli(3, "id", "--json")).stdout)["recipient"]
    cid = last_line(net.cli(0, "put", str(model), "-k", "2", "-n", "4", "--recipient", node3))
    deadline = time.monotonic() + 120
    while True:
        jobs = json.loads(ok(net.cli(3, "jobs", "--json")).stdout)
        mine = [j for j in jobs if j["source"] == cid]
        if (mine and mine[0]["state"] in ("done", "failed")) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert mine and mine[0]["origin"] == "announce" and mine[0]["state"] == "done", mine


def test_announcements_from_peers_not_listed_are_ignored(net, keys, model):
    """Anyone may publish on the topic; node3 acts only on node0's announcements."""
    node3 = json.loads(ok(net.cli(3, "id", "--json")).stdout)["recipient"]
    cid = last_line(net.cli(2, "put", str(model), "-k", "2", "-n", "4", "--recipient", node3))
    time.sleep(5)  # announcements arrive within ~1 s; node0's above was queued in that time
    jobs = json.loads(ok(net.cli(3, "jobs", "--json")).stdout)
    assert [j for j in jobs if j["source"] == cid] == []


def test_models_over_the_size_limit_are_refused_before_fetching(net, keys, tmp_path):
    big = examples.resnet50_like(tmp_path / "big.onnx", width=0.25, image_size=32)
    assert big.stat().st_size > 20000
    node2 = json.loads(ok(net.cli(2, "id", "--json")).stdout)["recipient"]
    cid = last_line(net.cli(0, "put", str(big), "-k", "2", "-n", "4", "--recipient", node2))
    proc = net.cli(2, "optimize", cid)
    assert proc.returncode == 1 and "max_model_bytes" in proc.stderr, proc.stderr
    ok(net.cli(2, "id"))


def test_public_model_is_republished_public(net, model, tmp_path):
    cid = last_line(net.cli(0, "put", str(model), "-k", "2", "-n", "4", "--public"))
    result = last_line(net.cli(1, "optimize", cid))
    info = json.loads(ok(net.cli(3, "info", result, "--json")).stdout)
    assert info["encrypted"] is False and info["readable"] and info["parent"] == cid
    assert info["metadata"]["provenance"]["source"] == cid
    out = tmp_path / "public-fused.onnx"
    ok(net.cli(3, "get", result, "-o", str(out)))  # no key needed
    assert count_ops(onnx.load(out), "BatchNormalization") == 0
