"""What hidden sizes (format version 3) and post-quantum recipients cost a put and a get.

    python benchmarks/bench_privacy.py [--size 16MiB] [--repeat 5] [--k 4] [--n 6]
                                       [--segment-size 64MiB] [--work-dir /tmp]

On one embedded Kubo node (127.0.0.1 only, a fresh repo), for two files of about ``--size``:
one whose size is a Padmé bucket already (no padding: the best case) and one a byte above a
power of two (the most padding a size of that order gets: the worst case), each repeat runs
four variants in turn, interleaved so that a noisy neighbour hits them alike:

    v2 x25519   put_file(format_version=2, recipients=[X25519])   the baseline (version 2)
    v3 x25519   put_file(recipients=[X25519])                     padding only
    v2 pq       put_file(format_version=2, recipients=[mlkem768x25519])  PQ only
    v3 pq       put_file(recipients=[mlkem768x25519])             both (what --pq users get)

and a get_file of each result (output checked against the input). Printed per variant: the
best put and get seconds of the repeats (as timeit: on a shared machine the slower runs
measure the other tenants), their ratios to "v2 x25519" measured in the same run, the bytes
stored (fragments, all n) and the manifest size. Then, alone, the per-file costs of the
recipient types: wrapping a file key (put, share) and unwrapping it (get, info), X25519
against mlkem768x25519, best of 5 x 200. The default takes about a minute here. What to
expect: padding costs at most its bytes (+3.1% at 16 MiB, less for bigger files), a
post-quantum recipient a fraction of a millisecond per file; on a busy 2-core machine the
time ratios scatter by +-20% around 1.0, so read them as "lost in the noise", not as gains.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from common import MiB, human, parse_size, sha256_file, write_random_file  # noqa: E402

from fusenode.storage import age  # noqa: E402
from fusenode.storage.kubo import KuboNode  # noqa: E402
from fusenode.storage.manifest import padded_size  # noqa: E402
from fusenode.storage.store import get_file, put_file  # noqa: E402

VARIANTS = ("v2 x25519", "v3 x25519", "v2 pq", "v3 pq")


def worst_size(near: int) -> int:
    """A byte above the power of two below ``near``: Padmé's buckets are widest right after
    a power of two, so this size gets the most padding relative to its size (~1/2^S)."""
    return 1 << (near.bit_length() - 1) | 1


def key_costs() -> list[tuple[str, float, float]]:
    """(type, wrap µs, unwrap µs), best of several timeit runs."""
    file_key = age.new_file_key()
    rows = []
    for name, identity in (
        ("X25519", age.X25519Identity.generate()),
        ("mlkem768x25519", age.MLKEM768X25519Identity.generate()),
    ):
        recipient = identity.recipient
        stanza = recipient.wrap(file_key)
        wrap = min(timeit.repeat(lambda r=recipient: r.wrap(file_key), number=200, repeat=5))
        unwrap = min(
            timeit.repeat(lambda i=identity, s=stanza: i.unwrap([s]), number=200, repeat=5)
        )
        rows.append((name, wrap / 200 * 1e6, unwrap / 200 * 1e6))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--size", type=parse_size, default=16 * MiB, help="about this big (default 16MiB)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="repeats, best counts (default 5)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--segment-size", type=parse_size, default=64 * MiB)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    x = age.X25519Identity.generate()
    pq = age.MLKEM768X25519Identity.generate()
    setups = {
        "v2 x25519": (2, x),
        "v3 x25519": (None, x),
        "v2 pq": (2, pq),
        "v3 pq": (None, pq),
    }
    cases = {"no padding": padded_size(args.size), "most padding": worst_size(args.size)}
    status = 0
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="bench-privacy-") as tmp:
        work = Path(tmp)
        with KuboNode(work / "repo") as node:
            for case, size in cases.items():
                src = work / f"{case.replace(' ', '-')}.onnx"
                sha = write_random_file(src, size)
                put_s: dict[str, list[float]] = {v: [] for v in VARIANTS}
                get_s: dict[str, list[float]] = {v: [] for v in VARIANTS}
                shape: dict[str, tuple[int, int]] = {}
                for _ in range(args.repeat):
                    for variant in VARIANTS:
                        version, identity = setups[variant]
                        os.sync()
                        t0 = time.perf_counter()
                        put = put_file(
                            src,
                            node,
                            recipients=[identity.recipient],
                            k=args.k,
                            n=args.n,
                            segment_size=args.segment_size,
                            work_dir=work,
                            format_version=version,
                        )
                        put_s[variant].append(time.perf_counter() - t0)
                        out = work / "out"
                        t0 = time.perf_counter()
                        get_file(put.cid, out, node, identities=[identity])
                        get_s[variant].append(time.perf_counter() - t0)
                        if sha256_file(out) != sha:
                            print(f"FAIL: {variant}: get returned other bytes")
                            status = 1
                        out.unlink()
                        shape[variant] = (put.stored_bytes, len(put.manifest.to_bytes()))
                base_put = min(put_s["v2 x25519"])
                base_get = min(get_s["v2 x25519"])
                base_stored = shape["v2 x25519"][0]
                print(
                    f"\n{case}: {human(size)} ({size} bytes, padded to {padded_size(size)}: "
                    f"+{(padded_size(size) - size) / size:.2%}), k={args.k} n={args.n}, "
                    f"{args.repeat} repeats"
                )
                print(
                    f"{'variant':<10} {'put s':>7} {'ratio':>6} {'get s':>7} {'ratio':>6} "
                    f"{'stored':>12} {'ratio':>6} {'manifest':>9}"
                )
                for variant in VARIANTS:
                    p, g = min(put_s[variant]), min(get_s[variant])
                    stored, manifest = shape[variant]
                    print(
                        f"{variant:<10} {p:7.3f} {p / base_put:6.3f} {g:7.3f} {g / base_get:6.3f}"
                        f" {stored:12d} {stored / base_stored:6.3f} {manifest:9d}"
                    )
                src.unlink()
    print("\nper file key (best of 5 x 200): wrap is paid by put and share, unwrap by get/info")
    for name, wrap, unwrap in key_costs():
        print(f"  {name:<15} wrap {wrap:8.1f} µs   unwrap {unwrap:8.1f} µs")
    return status


if __name__ == "__main__":
    sys.exit(main())
