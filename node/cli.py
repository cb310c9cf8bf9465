"""The ``fusenode`` command line.

Handlers import their heavy dependencies lazily: ``fusenode fuse`` must not pay for torch,
aiohttp or onnxruntime unless it needs them.

Exit codes: 0 success; 1 an error (one line on stderr, no traceback); 2 bad usage;
3 verification failed (nothing written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_VERIFY = 3


class CliError(Exception):
    """A user-facing error raised by a command handler."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


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
    from passes.errors import PassError, VerificationError
    from passes.fuse import fuse_file

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
        raise CliError(f"verification failed: {e}", EXIT_VERIFY) from e
    except PassError as e:
        raise CliError(str(e)) from e
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


# -- demo -------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(args)


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusenode",
        description="Decentralized storage and optimization node for ML models.",
    )
    from node import __version__

    p.add_argument("--version", action="version", version=f"fusenode {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    f = sub.add_parser(
        "fuse",
        help="fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm",
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
    f.set_defaults(handler=cmd_fuse)

    d = sub.add_parser("demo", help="run a self-contained demonstration")
    d.add_argument("--workdir", help="keep the demo's files here (default: a temp folder)")
    d.set_defaults(handler=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CliError as e:
        print(f"fusenode: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("fusenode: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into a closed reader (e.g. `| head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
