"""`fusenode demo`: a local network of 6 real nodes on 127.0.0.1, start to finish.

1. build a ResNet-50-like model (BatchNorm kept, non-trivial statistics);
2. start 6 daemons (own repos, own ports; nodes 1-5 join node 0);
3. store the model through node 0: age-encrypted to a user key, 4-of-6 erasure-coded,
   fragment i of every segment on a distinct node, each placement confirmed;
4. kill two nodes (SIGKILL);
5. retrieve the model on another node with the user key: byte-identical;
6. watch repair rebuild the lost fragments on the live nodes;
7. fuse its BatchNorms and prove the outputs unchanged;
then stop every node and delete everything (unless --workdir is given).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

DEMO_CONFIG = {
    ("storage", "segment_size"): str(4 << 20),  # a 25 MB model becomes 7 segments
    ("repair", "interval"): "1.0",
    ("repair", "unreachable_after"): "3.0",  # a real node waits minutes; the demo cannot
}


def _step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def _sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _run(net, i: int, *args: str) -> str:
    proc = net.cli(i, *args)
    if proc.returncode != 0:
        raise RuntimeError(f"node {i}: fusenode {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _holders(status: dict, names: dict[str, str]) -> str:
    lines = []
    for seg in status["segments"]:
        cells = [(names.get(f["peer"], "?") if f["answered"] else "--") for f in seg["fragments"]]
        lines.append(f"    segment {seg['index']}: " + " ".join(f"{c:>6}" for c in cells))
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from fusenode.node import examples
    from fusenode.node.localnet import LocalNetwork
    from fusenode.passes.fuse import fuse_file
    from fusenode.storage import age

    keep = args.workdir is not None
    work = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="fusenode-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    net = LocalNetwork(work / "nodes", 6, DEMO_CONFIG)
    try:
        _step(1, "building a ResNet-50-like model (BatchNorm kept, non-trivial statistics)")
        model = examples.resnet50_like(work / "model.onnx", width=0.5, image_size=32)
        print(f"    {model.name}: {model.stat().st_size / 1e6:.1f} MB, sha256 {_sha(model)[:16]}")

        _step(2, "starting 6 nodes on 127.0.0.1 (each its own repo, IPFS node and API)")
        net.start()
        names = {n.peer_id: f"node{n.index}" for n in net.nodes}
        for n in net.nodes:
            print(f"    node{n.index}  {n.peer_id}  {n.multiaddr.split('/p2p/')[0]}")
        time.sleep(1.0)  # let the bootstrap connections settle

        user = age.X25519Identity.generate()
        key = work / "user-key.txt"
        key.write_text(user.to_string() + "\n")
        key.chmod(0o600)
        _step(3, "storing it through node0: encrypted to a user key, 4-of-6 erasure-coded")
        cid = (
            _run(
                net,
                0,
                "put",
                str(model),
                "-k",
                "4",
                "-n",
                "6",
                "--recipient",
                user.recipient.to_string(),
            )
            .strip()
            .splitlines()[-1]
        )
        status = json.loads(_run(net, 0, "status", cid, "--json"))
        print(f"    manifest CID {cid}")
        print("    fragment i of each segment on a distinct node (holder of fragments 0..5):")
        print(_holders(status, names))

        _step(4, "killing node4 and node5 (SIGKILL): n - k = 2 nodes lost")
        net.kill(4)
        net.kill(5)

        _step(5, "retrieving the model on node2 with the user key")
        out = work / "retrieved.onnx"
        t = time.perf_counter()
        _run(net, 2, "get", cid, "-o", str(out), "--identity", str(key))
        same = _sha(out) == _sha(model)
        print(f"    {time.perf_counter() - t:.1f} s, byte-identical: {same}")
        if not same:
            return 1

        _step(6, "repair: node0 notices the lost holders and rebuilds their fragments")
        deadline = time.monotonic() + 90
        dead = {net.nodes[4].peer_id, net.nodes[5].peer_id}
        while True:
            status = json.loads(_run(net, 0, "status", cid, "--json"))
            holders = {f["peer"] for s in status["segments"] for f in s["fragments"]}
            if status["healthy"] and not holders & dead:
                break
            if time.monotonic() > deadline:
                print("    repair did not finish in 90 s")
                print(_holders(status, names))
                return 1
            time.sleep(1.0)
        print("    all 6 fragments of every segment answer again, on the 4 live nodes:")
        print(_holders(status, names))

        _step(7, "fusing BatchNormalization in the retrieved model, verified with onnxruntime")
        report = fuse_file(out, work / "fused.onnx", device="auto", verify=True)
        v = report["verify"]
        print(
            f"    fused {report['n_fused']} BatchNorm, skipped {report['n_skipped']}; nodes "
            f"{report['nodes_before']} -> {report['nodes_after']}; max abs error "
            f"{v['max_abs_error']:.2g} ({v['engine']}, rtol {v['rtol']:g})"
        )
        print(f"\ndone in {time.perf_counter() - started:.1f} s; stopping the nodes")
        return 0
    finally:
        net.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
