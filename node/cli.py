"""The ``fusenode`` command line.

Handlers import their heavy dependencies lazily: ``fusenode fuse`` must not pay for torch,
aiohttp or onnxruntime unless it needs them.

Every command goes through one interface (`fusenode.node.local.connect`): the daemon serving
the repo when one runs, else the same use cases run here on the repo. A handler only turns
arguments into a call and a result into lines.

Exit codes: 0 success; an error prints one line on stderr (no traceback) and exits with its
class's code (`fusenode.errors`: 1 error, 2 usage, 3 verification failed, 4 not found, 5 no
key opens the model, 6 stored data damaged, 7 not enough of the network reachable, 8 repo or
configuration, 9 the daemon cannot be reached; 10-18 ``verify``: a provenance failure, see
`fusenode.node.provenance`); 130 interrupted.
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
    kinds = Counter(f["pattern"] for f in r["fused"])
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

    identity = (age.MLKEM768X25519Identity if args.pq else age.X25519Identity).generate()
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
        print(recipient)  # the -o contract: the recipient is stdout's last line
    else:
        # As age-keygen: stdout is an identity file (`keygen > key.txt` is one --identity
        # reads; the recipient is its "# public key:" line), the recipient also on stderr.
        sys.stdout.write(text)
        print(f"Public key: {recipient}", file=sys.stderr)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from fusenode.node.repo import Repo, default_repo_path

    path = default_repo_path(args.repo)
    repo = Repo.init(path, args.swarm_port, args.api_port, args.swarm_host, post_quantum=args.pq)
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
    if args.cid is None:
        return _show(args, _node(args).node_status(), _print_node_status)
    return _show(args, _node(args).status(args.cid), _print_status)


def _size(n: int | None) -> str:
    """Bytes for people: 1.5 GiB, 12.0 MiB, 512 B."""
    if n is None:
        return "?"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _print_node_status(st: dict[str, Any]) -> None:
    print(f"peer ID:    {st['peer_id']}  (fusenode {st['version']})")
    for a in st["addresses"]:
        print(f"address:    {a}")
    up = st.get("uptime_seconds")
    print(f"daemon:     {f'up {up:.0f} s' if up is not None else 'not running (offline view)'}")
    p = st["peers"]
    print(f"peers:      {p['live']} live, {p['connected']} connected, {p['known']} known")
    s = st["storage"]
    setting = "auto" if s["capacity"] == "auto" else "set"
    print(
        f"held:       {_size(s['held_bytes'])} for others ({s['held_fragments']} CIDs) of "
        f"{_size(s['capacity_bytes'])} capacity ({setting})"
    )
    print(
        f"blockstore: {_size(s['blockstore_bytes'])}, pinned {_size(s['pinned_bytes'])}; "
        f"disk free {_size(s['disk_free_bytes'])} of {_size(s['disk_total_bytes'])}"
    )
    m = st["models"]
    print(
        f"models:     {m['placed']} placed: {m['healthy']} healthy, {m['degraded']} degraded, "
        f"{m['unavailable']} unavailable ({m['degraded_segments']} degraded segment(s))"
    )
    print("jobs:       " + ", ".join(f"{v} {k}" for k, v in st["jobs"].items()))
    if not st["daemon"]:  # counted by a daemon since it started: none here
        return
    for name, a in st["activity"].items():
        last = a.get("last")
        when = f", last {last['time']} ({last['seconds']} s)" if last else ""
        print(f"{name + ':':<11} {a['runs']} run(s), {a['errors']} error(s){when}")


def cmd_ls(args: argparse.Namespace) -> int:
    return _show(args, _node(args).ls(), _print_ls)


def _print_ls(listing: dict[str, Any]) -> None:
    models, held = listing["models"], listing["held"]
    for m in models:
        name = m["name"] if m["name"] is not None else "(name not recorded)"
        print(
            f"{m['cid']}  {m['health']:<11} {_size(m['size']):>9}  k={m['k']} n={m['n']}  "
            f"{m['created'][:19]}Z  {name}"
        )
    print(f"{len(models)} model(s) placed by this node", file=sys.stderr)
    for sh in listing.get("shares", []):
        print(f"{sh['cid']}  share of {sh['source']}  {sh['created'][:19]}Z")
    for h in held:
        print(f"held for {h['peer']}: {h['fragments']} CIDs, {_size(h['bytes'])}")
    total = sum(h["bytes"] for h in held)
    print(f"held for {len(held)} peer(s): {_size(total)}", file=sys.stderr)


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
    for share in reply.get("shares", []):
        print(f"  removed with it: the share {share}")


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
        f"{info['segments']} segment(s), k={info['k']} n={info['n']}, "
        + (f"created {info['created']}" if info.get("created") else "creation time sealed")
    )
    if info.get("size_hidden") and not info.get("metadata"):
        print(f"  size hidden: {info['payload_size']} bytes stored (padded, format version 3)")
    if info.get("parent"):
        print(f"  derived from {info['parent']}")
    meta = info.get("metadata")
    if not meta:
        print("  metadata: sealed (no identity given here can open it)")
        return
    print(f"  name {meta['name']}, {meta['size']} bytes, sha256 {meta['sha256']}")
    if meta.get("recipients"):
        print(f"  recipients: {', '.join(meta['recipients'])}")
    if meta.get("attestation"):
        from fusenode.node.provenance import ProvenanceError, open_envelope

        try:
            signer = f"signed by {open_envelope(meta['attestation']).signer}"
        except ProvenanceError as e:
            signer = f"INVALID: {e}"
        print(f"  signed provenance: {signer} (check it with `fusenode verify`)")
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


# -- provenance, verify -------------------------------------------------------------------------


def cmd_provenance(args: argparse.Namespace) -> int:
    from fusenode.node.provenance import dumps

    reply = _node(args).provenance(args.cid, args.identity)
    where = "stdout" if args.output == "-" else args.output
    if args.output == "-":  # stdout, for a pipe into DSSE tooling
        sys.stdout.write(dumps(reply["envelope"]))
        sys.stdout.flush()
    else:
        try:  # 0600: an encrypted model's provenance was sealed; the export stays private
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(dumps(reply["envelope"]))
        except OSError as e:
            raise CommandError(f"{args.output}: cannot write: {e.strerror}") from e
    if reply.get("signer"):
        print(f"wrote {where}: DSSE envelope signed by {reply['signer']}", file=sys.stderr)
    else:
        print(
            f"wrote {where}, but its signature does not verify: {reply.get('problem')}",
            file=sys.stderr,
        )
    return 0


def _peer_id(text: str) -> str:
    """argparse type of ``--trust``: a peer ID, else a usage error (exit 2)."""
    from fusenode.node.peerkeys import PeerAuthError, check_peer_id

    try:
        return check_peer_id(text)
    except PeerAuthError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_verify(args: argparse.Namespace) -> int:
    from fusenode.node.provenance import ProvenanceError

    result = _node(args).verify(
        args.cid, args.identity, trust=list(args.trust or []), recheck=bool(args.recheck)
    )
    _show(args, result, _print_verify)
    failure = result.get("failure")
    if failure:
        kind = Error.named(failure["type"]) or ProvenanceError
        error = kind(failure["message"])
        if args.json:  # the reason is in the JSON already; the exit code says which
            return error.exit_code
        raise error
    return 0


def _print_verify(result: dict[str, Any]) -> None:
    for link in result["links"]:
        trust = {True: "trusted", False: "NOT trusted", None: "no trusted signers given"}
        print(
            f"{link['cid']}: {link['pass']} {link['pass_version']} signed by {link['signer']} "
            f"({trust[link['trusted']]})"
        )
        print(f"  made from {link['source']['cid']} (sha256 {link['source']['sha256'][:16]}...)")
        recheck = link.get("recheck")
        if recheck:
            print(
                f"  rechecked here with {recheck['engine']} (seed {recheck['seed']}): max abs "
                f"error {recheck['max_abs_error']:.3g}"
            )
    if result["verified"]:
        print(f"verified: {result['cid']} signed by {result['signer']}, origin {result['origin']}")
        if result["trusted"] is None:
            print(
                "note: no trusted signers given (--trust or [trust] signers): the signatures are "
                "valid, but whether you trust their signers is yours to decide",
                file=sys.stderr,
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
        "fold BatchNormalization into a neighbouring Conv/ConvTranspose/Gemm/MatMul",
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

    kg = _command(sub, "keygen", cmd_keygen, "create an age identity (key pair)", repo=False)
    kg.add_argument(
        "-o",
        "--output",
        help="write the identity here (mode 0600) and print the recipient; without it, "
        "stdout is the identity file and the recipient goes to stderr (as age-keygen)",
    )
    kg.add_argument(
        "--pq",
        action="store_true",
        help="a post-quantum hybrid key (mlkem768x25519: age1pq1... / AGE-SECRET-KEY-PQ-1...)",
    )

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
    i.add_argument(
        "--pq",
        action="store_true",
        help="give the node a post-quantum hybrid identity (age1pq1...) instead of X25519",
    )

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
    st = _command(
        sub,
        "status",
        cmd_status,
        "this node's summary, or (with a CID) which peer holds which fragment of a model",
        json_flag=True,
    )
    st.add_argument("cid", nargs="?", help="manifest CID (none: the node's summary)")
    _command(
        sub,
        "ls",
        cmd_ls,
        "models this node placed (name, size, k/n, health) and what it holds for others",
        json_flag=True,
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
        sub,
        "info",
        cmd_info,
        "a stored model's manifest, and with --identity its sealed metadata and provenance",
        json_flag=True,
        cid=True,
    )
    inf.add_argument(
        "--identity",
        help="age identity file that opens the sealed metadata (default: none, not even the "
        "node's own REPO/identity.txt: without it info shows what any CID holder sees)",
    )

    pv = _command(
        sub,
        "provenance",
        cmd_provenance,
        "export a model's signed provenance (a DSSE envelope) to a file",
        cid=True,
    )
    pv.add_argument(
        "-o", "--output", required=True, help="where to write the envelope (JSON); - for stdout"
    )
    _identity(pv)

    vf = _command(
        sub,
        "verify",
        cmd_verify,
        "check a model's signed provenance, link by link down to its origin",
        json_flag=True,
        cid=True,
    )
    _identity(vf)
    vf.add_argument(
        "--trust",
        action="append",
        type=_peer_id,
        metavar="PEER_ID",
        help="a signer to trust (repeatable; with those in [trust] signers of config.toml)",
    )
    vf.add_argument(
        "--recheck",
        action="store_true",
        help="also run each model and its source here on fresh seeded inputs",
    )

    d = _command(sub, "demo", cmd_demo, "run a self-contained demonstration", repo=False)
    d.add_argument("--workdir", help="keep the demo's files here (default: a temp folder)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # Output piped into a closed reader (e.g. `| head`): not an error worth a message.
        # (Before `Exception`: a BrokenPipeError is one.)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_UNFORESEEN
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


if __name__ == "__main__":
    sys.exit(main())
