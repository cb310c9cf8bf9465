"""Full `fusenode optimize` timings on a local 4-node network (CPU), run by hand.

For each model (MobileNetV2-like, ResNet-50-like at width 1.0, ~100 MB): store it through
node 0 encrypted to node 1, run `fusenode optimize` on node 1 and wait for the job, then
print the job's own phase timings (fetch + decrypt, fuse + verify, store with placement),
the CLI's wall time, and, as the baseline measured in the same run, a plain local
`fusenode fuse --verify` of the same file: the ratio shows what the network part costs.

    .venv/bin/python benchmarks/bench_optimize.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fusenode.node import examples
from fusenode.node.localnet import LocalNetwork

MODELS = {
    "mobilenetv2_like": lambda p: examples.mobilenetv2_like(p),
    "resnet50_like (w=1.0)": lambda p: examples.resnet50_like(p, width=1.0),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="work in this folder and keep it")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-opt-"))
    work.mkdir(parents=True, exist_ok=True)
    net = LocalNetwork(work / "nodes", 4, {("storage", "segment_size"): str(16 << 20)})
    rows = []
    try:
        net.start()
        time.sleep(1.0)
        optimizer = json.loads(net.cli(1, "id", "--json").stdout)["recipient"]
        for label, build in MODELS.items():
            path = build(work / f"{label.split()[0]}.onnx")
            t = time.perf_counter()
            local = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fusenode.node.cli",
                    "fuse",
                    str(path),
                    "-o",
                    str(work / "local-fused.onnx"),
                    "--verify",
                    "--device",
                    "cpu",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            local_s = time.perf_counter() - t
            assert "verified" in local.stdout
            put = net.cli(0, "put", str(path), "-k", "2", "-n", "4", "--recipient", optimizer)
            cid = put.stdout.strip().splitlines()[-1]
            t = time.perf_counter()
            opt = net.cli(1, "optimize", cid)
            wall = time.perf_counter() - t
            if opt.returncode != 0:
                print(f"{label}: optimize failed: {opt.stderr}")
                return 1
            job = next(
                j for j in json.loads(net.cli(1, "jobs", "--json").stdout) if j["source"] == cid
            )
            tm = job["report"]["timings"]
            rows.append(
                (label, path.stat().st_size / 1e6, job["report"]["n_fused"], tm, wall, local_s)
            )
    finally:
        net.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"{'model':<24}{'MB':>7}{'fused':>6}{'fetch':>8}{'fuse+ver':>9}{'store':>8}"
        f"{'job':>8}{'CLI wall':>9}{'local fuse':>11}{'ratio':>7}"
    )
    for label, mb, fused, tm, wall, local_s in rows:
        print(
            f"{label:<24}{mb:>7.1f}{fused:>6}{tm['fetch']:>8.2f}{tm['fuse_and_verify']:>9.2f}"
            f"{tm['store']:>8.2f}{tm['total']:>8.2f}{wall:>9.2f}{local_s:>11.2f}"
            f"{wall / local_s:>7.2f}"
        )
    print("times in seconds; ratio = optimize CLI wall / local `fusenode fuse --verify` wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
