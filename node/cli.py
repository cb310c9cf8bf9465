"""The ``fusenode`` command line.

Handlers import their heavy dependencies lazily: ``fusenode fuse`` must not pay for torch,
aiohttp or onnxruntime unless it needs them.

Every command goes through one interface (`fusenode.node.local.connect`): the daemon serving
the repo when one runs, else the same use cases run here on the repo. A handler only turns
arguments into a call and a result into lines.

Exit codes: 0 success; an error prints one line on stderr (no traceback) and exits with its
class's code (`fusenode.errors`: 1 error, 2 usage, 3 verification failed, 4 not found, 5 no
key opens the model, 6 stored data damaged, 7 not enough of the network reachable, 8 repo or
configuration, 9 the daemon cannot be reached); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fusenode.errors import EXIT_INTERRUPTED, Error
from fusenode.node.errors import CommandError

EXIT_UNFORESEEN = 1


def _parse_shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        shape = [int(d) for d in dims.lower().split("x")] if dims else []
        if any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid input shape {text!r}: expected NAME=DxDxD, e.g. input=1x3x224x224"
        ) from None
    return name, shape


# -- fuse -------------------------------------------------------------------------------------


def cmd_fuse(args: argparse.Namespace) -> int:
    from fusenode.passes.errors import VerificationError
    from fusenode.passes.fuse import fuse_file

    try:
        report = fuse_file(
            args.input,
            args.output,
            device=args.device,
            verify=args.verify,
            shapes=dict(args.input_shape or []),
            rtol=args.rtol,
            atol=args.atol,
        )
    except VerificationError as e:
        raise VerificationError(f"verification failed: {e}") from e
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_fuse_report(report))
    return 0


def format_fuse_report(r: dict) -> str:
    from collections import Counter

    lines = []
    kinds = Counter(f["pattern"].split("+")[0] for f in r["fused"])
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
    lines.append(
        f"fused {r['n_fused']} BatchNormalization node(s){f' ({detail})' if detail else ''}"
        f" on {r['device']}; nodes {r['nodes_before']} -> {r['nodes_after']}"
    )
    if r["skipped"]:
        lines.append(f"skipped {r['n_skipped']}:")
        for s in r["skipped"]:
            where = "" if s["graph"] == "main" else f" [{s['graph']}]"
            lines.append(f"  {s['node']}{where}: {s['reason']}")
    else:
        lines.append("skipped 0")
    v = r.get("verify")
    if v:
        lines.append(
            f"verified with {v['engine']}: max abs error {v['max_abs_error']:.3g}, "
            f"max rel error {v['max_rel_error']:.3g} (rtol {v['rtol']:g}, atol {v['atol']:g})"
        )
    size = r.get("bytes_written", 0)
    lines.append(f"wrote {r['output']} ({size / 1e6:.1f} MB) in {r['seconds']:.2f} s")
    return "\n".join(lines)


# -- keys, repo, put, get ---------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    from fusenode.node.repo import identity_text, write_private
    from fusenode.storage import age

    identity = age.X25519Identity.generate()
    text = identity_text(identity)
    recipient = identity.recipient.to_string()
    if args.output:
        try:
            write_private(Path(args.output), text)
        except FileExistsError:
            raise CommandError(f"{args.output}: already exists; not overwriting a key") from None
        except OSError as e:
            raise CommandError(f"{args.output}: cannot write: {e.strerror}") from e
        print(f"wrote identity to {args.output} (mode 0600)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    print(recipient)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from fusenode.node.repo import Repo, default_repo_path

    path = default_repo_path(args.repo)
    repo = Repo.init(path, args.swarm_port, args.api_port, args.swarm_host)
    print(f"initialized fusenode repo in {path}")
    for address in repo.node_identity().addresses:
        print(f"  swarm: {address}")
    print(f"  api:   http://{repo.config.api.host}:{repo.config.api.port}")
    print(f"  recipient: {repo.recipient()}")
    return 0


def _node(args: argparse.Namespace) -> Any:
    """The node serving ``--repo``: its daemon if one runs, else the use cases run here."""
    from fusenode.node.local import connect
    from fusenode.node.repo import default_repo_path

    return connect(default_repo_path(args.repo))


def _progress() -> Any:
    from fusenode.node.progress import progress_bar

    return progress_bar


def cmd_put(args: argparse.Namespace) -> int:
    reply = _node(args).put(
        args.file,
        k=args.k,
        n=args.n,
        recipients=list(args.recipient or []),
        public=bool(args.public),
        progress=_progress(),
    )
    kind = "encrypted" if reply["encrypted"] else "public"
    print(
        f"stored {reply['size']} bytes ({kind}) as {reply['segments']} segment(s) x "
        f"{reply['n']} fragments (any {reply['k']} rebuild a segment), "
        f"placement {reply['placement']}",
        file=sys.stderr,
    )
    if reply["placement"] == "local":
        print(
            f"offline: no daemon runs on the repo, so all {reply['n']} fragments of every "
            "segment are in this repo only; run `fusenode daemon` to spread them over peers",
            file=sys.stderr,
        )
    else:
        holders = ", ".join(f"{p[:12]}..: {c}" for p, c in reply["holders"].items())
        print(f"holders: {holders}", file=sys.stderr)
    print(reply["cid"])
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    reply = _node(args).get(args.cid, args.output, args.identity, progress=_progress())
    print(
        f"wrote {reply['path']} ({reply['size']} bytes, stored as {reply['name']!r}, "
        f"sha256 {reply['sha256'][:16]}...) verified",
        file=sys.stderr,
    )
    return 0


# -- daemon, id, peers, status ----------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    from fusenode.node.daemon import main as daemon_main
    from fusenode.node.repo import default_repo_path

    return daemon_main(default_repo_path(args.repo), list(args.bootstrap or []))


def _show(args: argparse.Namespace, data: Any, human: Callable[[Any], None]) -> int:
    """``data`` as JSON with ``--json``, else as ``human`` prints it."""
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        human(data)
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    info = _node(args).identity()
    if args.json:  # one line: scripts read it with a JSON parser or line by line
        keys = ("peer_id", "addresses", "recipient")
        print(json.dumps({key: info[key] for key in keys}))
        return 0
    print(f"peer ID:   {info['peer_id']}")
    for a in info["addresses"]:
        print(f"address:   {a}")
    print(f"recipient: {info['recipient']}")
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    return _show(args, _node(args).peers(), _print_peers)


def _print_peers(peers: list[dict[str, Any]]) -> None:
    connected = [p for p in peers if p["connected"]]
    for p in connected:
        kind = "fusenode" if p.get("fusenode") else "ipfs"
        print(f"{p['peer_id']}  {kind}")
    print(f"{len(connected)} connected peer(s)", file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    return _show(args, _node(args).status(args.cid), _print_status)


def _print_status(st: dict[str, Any]) -> None:
    print(
        f"{st['cid']}: k={st['k']} n={st['n']} "
        f"{'healthy' if st['healthy'] else 'DEGRADED'}"
        f"{' (placed by this node)' if st.get('owner') else ''}"
    )
    for seg in st["segments"]:
        ok = sum(f["answered"] for f in seg["fragments"])
        spread = (
            "" if seg.get("distinct", True) else " (some node holds two: fewer live nodes than n)"
        )
        print(f"  segment {seg['index']}: {ok}/{len(seg['fragments'])} fragments answered{spread}")
        for f in seg["fragments"]:
            mark = "ok " if f["answered"] and not f.get("lost") else "-- "
            audit = f.get("audit")
            seen = f"  audit {audit['result']} {audit['time'][:19]}Z" if audit else ""
            lost = "  LOST: being rebuilt elsewhere" if f.get("lost") else ""
            print(f"    {mark}fragment {f['index']}  {f['peer'] or 'no known holder'}{seen}{lost}")


def cmd_repair(args: argparse.Namespace) -> int:
    print(json.dumps(_node(args).repair(), indent=2))
    return 0


# -- disk: rm, gc -----------------------------------------------------------------------------


def cmd_rm(args: argparse.Namespace) -> int:
    return _show(args, _node(args).rm(args.cid), _print_rm)


def _print_rm(reply: dict[str, Any]) -> None:
    released = sum(reply["released"].values())
    print(
        f"removed {reply['cid']}: {released} hold(s) released on {len(reply['released'])} "
        f"peer(s), {reply['local']} here; blocks are reclaimed at the next gc"
    )
    for peer, why in reply["pending"].items():
        print(f"  {peer}: not released yet ({why}); asked again when it answers")


def cmd_gc(args: argparse.Namespace) -> int:
    return _show(args, _node(args).gc(), _print_gc)


def _print_gc(r: dict[str, Any]) -> None:
    mib = 2**20
    print(
        f"removed {r['removed_blocks']} block(s), {r['removed_bytes'] / mib:.1f} MiB in "
        f"{r['seconds']:.2f} s; blockstore {r['blockstore_before'] / mib:.1f} -> "
        f"{r['blockstore_after'] / mib:.1f} MiB, pinned {r['pinned_after'] / mib:.1f} MiB"
    )


# -- optimize, jobs, share, info --------------------------------------------------------------


def cmd_optimize(args: argparse.Namespace) -> int:
    import time

    node = _node(args)
    job = node.optimize(args.cid, list(args.recipient or []))
    print(f"job {job['id']}: {job['state']} (optimize {job['source']})", file=sys.stderr)
    if args.detach:
        print(job["id"])
        return 0
    last = job["state"]
    while job["state"] in ("queued", "running"):
        time.sleep(0.5)
        job = node.job(job["id"])
        if job["state"] != last:
            print(f"job {job['id']}: {job['state']}", file=sys.stderr)
            last = job["state"]
    if job["state"] == "failed":
        raise CommandError(f"job {job['id']} failed: {job['error']}")
    report = job.get("report") or {}
    verify = report.get("verification") or {}
    if report:
        print(
            f"fused {report.get('n_fused')} BatchNorm (skipped {report.get('n_skipped')}), "
            f"nodes {report.get('nodes_before')} -> {report.get('nodes_after')}; verified with "
            f"{verify.get('engine')}: max abs error {verify.get('max_abs_error', 0):.3g}; "
            f"{job.get('seconds')} s",
            file=sys.stderr,
        )
    print(job["result"])
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    return _show(args, _node(args).jobs(), _print_jobs)


def _print_jobs(jobs: list[dict[str, Any]]) -> None:
    for j in jobs:
        took = f"{j['seconds']:.1f}s" if j.get("seconds") is not None else "-"
        outcome = j["result"] or (j["error"] or "")
        print(f"{j['id']:>4}  {j['state']:<8} {took:>7}  {j['kind']} {j['source']}  {outcome}")
    print(f"{len(jobs)} job(s)", file=sys.stderr)


def cmd_share(args: argparse.Namespace) -> int:
    reply = _node(args).share(args.cid, list(args.recipient), args.identity)
    print(reply["cid"])
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    return _show(args, _node(args).info(args.cid, args.identity), _print_info)


def _print_info(info: dict[str, Any]) -> None:
    print(f"{info['cid']}")
    print(
        f"  {'encrypted (age)' if info['encrypted'] else 'public'}, "
        f"{info['segments']} segment(s), k={info['k']} n={info['n']}, created {info['created']}"
    )
    if info.get("parent"):
        print(f"  derived from {info['parent']}")
    meta = info.get("metadata")
    if not meta:
        print("  metadata: sealed (no identity given here can open it)")
        return
    print(f"  name {meta['name']}, {meta['size']} bytes, sha256 {meta['sha256']}")
    if meta.get("recipients"):
        print(f"  recipients: {', '.join(meta['recipients'])}")
    prov = meta.get("provenance")
    if prov:
        rep = prov.get("report", {})
        ver = prov.get("verification", {})
        print(
            f"  provenance: {prov.get('pass')} {prov.get('pass_version')} by "
            f"{prov.get('optimized_by')} on {prov.get('device')} ({prov.get('tool')})"
        )
        print(f"    source {prov.get('source')} (sha256 {prov.get('input_sha256')})")
        print(
            f"    fused {rep.get('n_fused')}, skipped {rep.get('n_skipped')}, nodes "
            f"{rep.get('nodes_before')} -> {rep.get('nodes_after')}"
        )
        print(
            f"    verified with {ver.get('engine')}: max abs error "
            f"{ver.get('max_abs_error')}, max rel error {ver.get('max_rel_error')} "
            f"(rtol {ver.get('rtol')}, atol {ver.get('atol')})"
        )


# -- demo -------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from fusenode.node.demo import run_demo

    return run_demo(args)


# -- parser -----------------------------------------------------------------------------------


def _command(
    sub: Any,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    text: str,
    *,
    repo: bool = True,
    json_flag: bool = False,
    cid: bool = False,
    **extra: Any,
) -> argparse.ArgumentParser:
    """A subcommand: its positional CID, ``--repo`` and ``--json`` when it has them."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=text, **extra)
    if cid:
        p.add_argument("cid", help="manifest CID")
    if repo:
        p.add_argument("--repo", help="node repo (default: $FUSENODE_REPO or ~/.fusenode)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=handler)
    return p


def _recipients(p: argparse.ArgumentParser, text: str, required: bool = False) -> None:
    p.add_argument("--recipient", action="append", metavar="AGE1...", required=required, help=text)


def _identity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identity", help="age identity file (default: the node's)")


def build_parser() -> argparse.ArgumentParser:
    from fusenode import __version__

    p = argparse.ArgumentParser(
        prog="fusenode",
        description="Decentralized storage and optimization node for ML models.",
    )
    p.add_argument("--version", action="version", version=f"fusenode {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    f = _command(
        sub,
        "fuse",
        cmd_fuse,
        "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm",
        repo=False,
        description="Fold every BatchNormalization that can be folded exactly into the "
        "Conv / ConvTranspose / Gemm before it; report what was fused and what was skipped.",
    )
    f.add_argument("input", help="ONNX model to read (never modified)")
    f.add_argument("-o", "--output", required=True, help="where to write the fused model")
    f.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the weight math runs (auto: CUDA when available)",
    )
    f.add_argument(
        "--verify",
        action="store_true",
        help="run both models with onnxruntime and refuse to write on a mismatch",
    )
    f.add_argument("--json", action="store_true", help="print the report as JSON")
    f.add_argument("--rtol", type=float, help="relative tolerance for --verify")
    f.add_argument("--atol", type=float, help="absolute tolerance for --verify")
    f.add_argument(
        "--input-shape",
        action="append",
        type=_parse_shape,
        metavar="NAME=DIMS",
        help="shape for a symbolic input in --verify, e.g. x=1x3x224x224",
    )

    kg = _command(sub, "keygen", cmd_keygen, "create an age identity (X25519 key pair)", repo=False)
    kg.add_argument("-o", "--output", help="write the identity here (mode 0600)")

    i = _command(sub, "init", cmd_init, "create a node repo")
    i.add_argument(
        "--swarm-host",
        default="127.0.0.1",
        metavar="ADDR",
        help="address the IPFS swarm listens on: 127.0.0.1 (default: this machine only), "
        "an address of this machine, or 0.0.0.0 for every interface",
    )
    i.add_argument("--swarm-port", type=int, help="IPFS swarm TCP port (default: a free one)")
    i.add_argument("--api-port", type=int, help="HTTP API port on 127.0.0.1 (default: free)")

    pu = _command(sub, "put", cmd_put, "store a file: encrypt, erasure-code, pin; print its CID")
    pu.add_argument("file")
    pu.add_argument("-k", type=int, help="fragments needed to rebuild a segment")
    pu.add_argument("-n", type=int, help="fragments stored per segment")
    _recipients(pu, "age recipient who may read it (repeatable; default: this node)")
    pu.add_argument("--public", action="store_true", help="store unencrypted")

    g = _command(sub, "get", cmd_get, "retrieve a stored file by its manifest CID", cid=True)
    g.add_argument("-o", "--output", required=True, help="where to write the file")
    _identity(g)

    dm = _command(sub, "daemon", cmd_daemon, "run a storage node in the foreground")
    dm.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="peer to join, /ip4/127.0.0.1/tcp/PORT/p2p/PEERID (repeatable)",
    )

    _command(sub, "id", cmd_id, "this node's peer ID, addresses and age recipient", json_flag=True)
    _command(sub, "peers", cmd_peers, "list connected peers (needs a daemon)", json_flag=True)
    _command(
        sub,
        "status",
        cmd_status,
        "which peer holds which fragment of a stored model",
        json_flag=True,
        cid=True,
    )
    _command(sub, "repair", cmd_repair, "run a repair pass now (needs a running daemon)")
    _command(
        sub,
        "rm",
        cmd_rm,
        "delete a model this node placed (its holders release it; gc reclaims the disk)",
        json_flag=True,
        cid=True,
    )
    _command(
        sub,
        "gc",
        cmd_gc,
        "delete the blocks no pin of this node reaches (fetched blocks, released data)",
        json_flag=True,
    )

    op = _command(
        sub, "optimize", cmd_optimize, "fuse a stored model by CID and republish it", cid=True
    )
    _recipients(op, "who may read the result (default: the source model's recipients)")
    op.add_argument("--detach", action="store_true", help="print the job id and return")

    _command(sub, "jobs", cmd_jobs, "list optimization jobs with state and timing", json_flag=True)

    sh = _command(
        sub, "share", cmd_share, "grant another key access (new manifest CID, same data)", cid=True
    )
    _recipients(sh, "a key to grant access to (repeatable)", required=True)
    _identity(sh)

    inf = _command(
        sub, "info", cmd_info, "a stored model's metadata and provenance", json_flag=True, cid=True
    )
    _identity(inf)

    d = _command(sub, "demo", cmd_demo, "run a self-contained demonstration", repo=False)
    d.add_argument("--workdir", help="keep the demo's files here (default: a temp folder)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except Exception as e:
        if isinstance(e, Error):
            print(f"fusenode: error: {e}", file=sys.stderr)
            return e.exit_code
        if os.environ.get("FUSENODE_DEBUG"):
            raise
        # A failure we did not foresee: still one line, and a way to get the details.
        print(
            f"fusenode: error: {type(e).__name__}: {e} (set FUSENODE_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_UNFORESEEN
    except KeyboardInterrupt:
        print("fusenode: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into a closed reader (e.g. `| head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_UNFORESEEN


if __name__ == "__main__":
    sys.exit(main())
