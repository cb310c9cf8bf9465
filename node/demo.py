"""`fusenode demo`: a guided tour on real, local components, cleaned up afterwards.

Steps: build a small ResNet-style model with BatchNorm kept, create a node repo with its own
embedded IPFS node (127.0.0.1 only), store the model encrypted and erasure-coded, retrieve it
by CID and check it is byte-identical, then fuse its BatchNorms and prove the outputs equal.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path


def _step(n: int, text: str) -> None:
    print(f"[{n}] {text}", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    from node import examples
    from node.repo import Repo
    from passes.fuse import fuse_file
    from storage.store import get_file, put_file

    keep = args.workdir is not None
    work = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="fusenode-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        _step(1, "building a ResNet-50-like model (BatchNorm kept, non-trivial statistics)")
        model = examples.resnet50_like(work / "model.onnx", width=0.5, image_size=32)
        print(f"    {model} ({model.stat().st_size / 1e6:.1f} MB)")

        _step(2, "creating a node repo with an embedded IPFS node on 127.0.0.1")
        repo = Repo.init(work / "repo")
        print(f"    repo {repo.path}, recipient {repo.recipient()}")

        with repo.open_backend() as node:
            _step(3, "storing the model: age-encrypted, 4-of-6 erasure-coded, pinned")
            put = put_file(
                model,
                node,
                recipients=[repo.identities()[0].recipient],
                k=4,
                n=6,
                segment_size=8 << 20,
                work_dir=repo.tmp,
            )
            print(f"    manifest CID {put.cid}")
            print(
                f"    {len(put.manifest.segments)} segments x 6 fragments, "
                f"{put.stored_bytes / 1e6:.1f} MB stored for {put.plaintext_size / 1e6:.1f} MB"
            )

            _step(4, "retrieving it by CID, checking every hash, decrypting")
            back = work / "retrieved.onnx"
            get_file(put.cid, back, node, identities=repo.identities())
            same = (
                hashlib.sha256(back.read_bytes()).digest()
                == hashlib.sha256(model.read_bytes()).digest()
            )
            print(f"    byte-identical: {same}")
            if not same:
                return 1

        _step(5, "fusing BatchNormalization and verifying with onnxruntime")
        report = fuse_file(back, work / "fused.onnx", device="auto", verify=True)
        v = report["verify"]
        print(
            f"    fused {report['n_fused']} BN, skipped {report['n_skipped']}; "
            f"nodes {report['nodes_before']} -> {report['nodes_after']}; "
            f"max abs error {v['max_abs_error']:.2g} ({v['engine']})"
        )
        print(f"done in {time.perf_counter() - started:.1f} s")
        return 0
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
