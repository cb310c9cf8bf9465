"""Benchmark `fusenode fuse` against the well-known BatchNorm folders (run by hand, not a test).

    python benchmarks/bench_fuse.py [--sizes 100mb,400mb] [--out-dir bench-out] [--keep]

For the ResNet-50-like model (node/examples.py) at ~100 MB and ~400 MB of fp32 weights it runs:

    fusenode      python -m fusenode.node.cli fuse IN -o OUT --json
    onnxruntime   offline optimization, ORT_ENABLE_BASIC, CPU provider, optimized_model_filepath
    onnxoptimizer onnxoptimizer.optimize(model, ["fuse_bn_into_conv"]), then onnx.save
    onnxscript    the rewriter's three fuse_batchnorm rules (Conv, ConvTranspose, Gemm)

Why each tool runs in its own fresh Python process: the cost a user pays is the whole command
(interpreter start, imports, load, rewrite, save), and the peak memory of one tool must not be
mixed with another's or with this script's. The wall time is measured around the child process;
its peak RSS is that child's own ru_maxrss from os.wait4 on its pid (RUSAGE_CHILDREN would be
the maximum over all children so far), taken in a bare launcher process (see LAUNCHER). The
model file is in the page cache for every tool (it was just written or read), so no tool pays
a cold disk read that another does not.

Every output is then loaded by onnxruntime with graph optimizations OFF and run on the same
seeded input as the original; the error column is max over outputs of max|a - b| / max|b|
(a: tool's model, b: original model). Then the targets the project set are checked on the
~400 MB model (fusenode wall / onnxruntime wall, fusenode peak RSS / file size, BatchNorm
left, byte-identical output on a second run). Exit status: 0 when every target passes.

The models are generated into --out-dir (default bench-out/, git-ignored) once and reused
while their parameters (in the file name) are the same; the tools' outputs are deleted after
measuring unless --keep is given. A tool that fails shows its error in its row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("100mb", "400mb")
IMAGE_SIZE = 64
OPSET = 17
INPUT_SEED = 0

# Each baseline as a standalone program: argv[1] = input model, argv[2] = output model.
WORKERS: dict[str, str] = {
    "onnxruntime": """
import sys
import onnxruntime as ort
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
so.optimized_model_filepath = sys.argv[2]
ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
""",
    "onnxoptimizer": """
import sys
import onnx, onnxoptimizer
model = onnxoptimizer.optimize(onnx.load(sys.argv[1]), ["fuse_bn_into_conv"])
onnx.save(model, sys.argv[2])
""",
    "onnxscript": """
import sys
from onnxscript import ir
from onnxscript.rewriter import rewrite
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)
rules = [
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
]
model = rewrite(ir.load(sys.argv[1]), pattern_rewrite_rules=rules)
ir.save(model, sys.argv[2])
""",
}
TOOLS = ("fusenode", *WORKERS)


@dataclass
class Run:
    """One child process: its exit status, wall time, own peak RSS and output."""

    rc: int
    wall_s: float
    peak_rss: int  # bytes
    stdout: str
    stderr: str


@dataclass
class Row:
    """One tool on one model: the measured run and what its output model looks like."""

    tool: str
    run: Run | None = None
    walls: list[float] = field(default_factory=list)
    out: Path | None = None
    bn_left: int | None = None
    nodes: int | None = None
    rel_err: float | None = None
    file_size: int | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.run is not None and self.run.rc == 0 and self.bn_left is not None


def command(tool: str, src: Path, dst: Path) -> list[str]:
    if tool == "fusenode":
        return [
            sys.executable,
            "-m",
            "fusenode.node.cli",
            "fuse",
            str(src),
            "-o",
            str(dst),
            "--json",
        ]
    return [sys.executable, "-c", WORKERS[tool], str(src), str(dst)]


# Starts the tool and reports its wall time and its own peak RSS. Why a launcher process: on
# Linux a child's ru_maxrss starts at the RSS of the process that forked it (exec folds the old
# address space's high-water mark in), so children forked by this script, which holds the
# models and onnxruntime, would all report at least its size. The launcher is a bare
# interpreter (~10 MB), smaller than any tool, so the tool's peak is its own.
LAUNCHER = """
import json, os, signal, sys, time
timeout_s, out_path, err_path, *cmd = sys.argv[1:]
actions = [
    (os.POSIX_SPAWN_OPEN, 1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
    (os.POSIX_SPAWN_OPEN, 2, err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
]
start = time.perf_counter()
pid = os.posix_spawn(cmd[0], cmd, os.environ, file_actions=actions)
signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
signal.alarm(max(1, int(float(timeout_s))))
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
signal.alarm(0)
rc = os.waitstatus_to_exitcode(status)
print(json.dumps({"rc": rc, "wall_s": wall, "maxrss_kib": usage.ru_maxrss}))
"""


def measure(cmd: list[str], timeout_s: float) -> Run:
    """Run cmd as a fresh process (through LAUNCHER): wall time and its own ru_maxrss."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="bench-fuse-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        launcher = [sys.executable, "-S", "-c", LAUNCHER, str(timeout_s), str(out), str(err)]
        done = subprocess.run(
            [*launcher, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"launcher failed: {done.stderr.strip()[-300:]}")
        result = json.loads(done.stdout)
        stdout = out.read_text(errors="replace") if out.exists() else ""
        stderr = err.read_text(errors="replace") if err.exists() else ""
    return Run(result["rc"], result["wall_s"], result["maxrss_kib"] * 1024, stdout, stderr)


def ensure_model(size: str, out_dir: Path) -> Path:
    """Generate the ResNet-50-like model for size once; reuse it while its parameters match.

    The file name carries every parameter, and the file is written under a temporary name
    and renamed, so a file that exists is complete and built with these parameters.
    """
    from fusenode.node import examples

    width = examples.RESNET50_WIDTHS[size]
    path = out_dir / f"resnet50_like-w{width:g}-img{IMAGE_SIZE}-op{OPSET}.onnx"
    if path.exists():
        print(f"reusing {path}")
        return path
    print(f"generating {path} (width {width:g}) ...", flush=True)
    tmp = path.with_suffix(".partial.onnx")
    examples.resnet50_like(tmp, width=width, image_size=IMAGE_SIZE, opset=OPSET)
    tmp.replace(path)
    return path


def ort_outputs(path: Path, feeds: dict[str, Any]) -> list[Any]:
    """Run the model as written: onnxruntime with every graph optimization off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def max_rel_err(got: list[Any], want: list[Any]) -> float:
    """max over outputs of max|a - b| / max|b| (b: original model's output)."""
    import numpy as np

    if len(got) != len(want):
        raise ValueError(f"{len(got)} outputs, expected {len(want)}")
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"output shape {a.shape}, expected {b.shape}")
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).max()
        worst = max(worst, float(diff / max(np.abs(b).max(), np.finfo(np.float64).tiny)))
    return worst


def inspect_output(row: Row, feeds: dict[str, Any], want: list[Any]) -> None:
    """Fill BN left, node count, error and size for a tool's output (errors go to the note)."""
    import onnx

    from fusenode.node.examples import count_ops

    assert row.out is not None
    try:
        onnx.checker.check_model(str(row.out))
    except Exception as exc:  # still measure it: onnxruntime may accept what the checker won't
        row.note += f"checker: {str(exc).splitlines()[0][:100]} "
    try:
        counts = count_ops(row.out)
        row.bn_left = counts.get("BatchNormalization", 0)
        row.nodes = sum(counts.values())
        row.file_size = row.out.stat().st_size
        row.rel_err = max_rel_err(ort_outputs(row.out, feeds), want)
    except Exception as exc:
        row.note += f"output unusable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def summarize_report(stdout: str) -> str:
    """fusenode --json: show how many fusions it did and skipped, if the report says so."""
    try:
        report = json.loads(stdout)
    except ValueError:
        return ""
    if not isinstance(report, dict):
        return ""
    parts = []
    for key in ("fused", "skipped"):
        value = report.get(key)
        if isinstance(value, list | dict):
            value = len(value)
        if value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def run_tool(tool: str, src: Path, runs_dir: Path, tag: str, repeat: int, timeout_s: float) -> Row:
    row = Row(tool)
    out = runs_dir / f"{tag}-{tool}.onnx"
    for _ in range(repeat):
        out.unlink(missing_ok=True)
        try:
            run = measure(command(tool, src, out), timeout_s)
        except Exception as exc:  # the tool could not even start: show it in its row
            row.run = None
            row.note = f"not run: {type(exc).__name__}: {str(exc).splitlines()[-1][:120]}"
            return row
        row.walls.append(run.wall_s)
        if row.run is None or run.rc != 0:
            row.run = run
        else:  # report the fastest wall and the largest peak over the repeats
            row.run.wall_s = min(row.run.wall_s, run.wall_s)
            row.run.peak_rss = max(row.run.peak_rss, run.peak_rss)
        if run.rc != 0:
            break
    assert row.run is not None
    if row.run.rc != 0 or not out.exists():
        lines = [ln for ln in (row.run.stderr + row.run.stdout).splitlines() if ln.strip()]
        why = lines[-1][:140] if lines else "no output file"
        row.note = f"exit {row.run.rc}: {why}"
        return row
    row.out = out
    if tool == "fusenode":
        row.note = summarize_report(row.run.stdout) + " "
    return row


def fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(size: str, src: Path, original: dict[str, int], rows: list[Row]) -> None:
    model_mb = src.stat().st_size / 1e6
    print()
    print(
        f"== ResNet-50-like, {size}: {src.name}, {model_mb:.1f} MB, "
        f"{original.get('BatchNormalization', 0)} BatchNormalization, "
        f"{sum(original.values())} nodes =="
    )
    print(
        "error = max over outputs of max|a - b| / max|b|, a = tool's model, b = original, "
        "both under onnxruntime with graph optimizations off, same seeded input"
    )
    head = (
        f"{'tool':<14}{'exit':>5}{'wall s':>9}{'peak RSS MB':>13}{'RSS/file':>10}"
        f"{'BN left':>9}{'nodes':>7}{'max rel err':>13}{'file MB':>9}  note"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        run = r.run
        print(
            f"{r.tool:<14}{fmt(run and run.rc, 'd'):>5}{fmt(run and run.wall_s, '.2f'):>9}"
            f"{fmt(run and run.peak_rss / 1e6, '.0f'):>13}"
            f"{fmt(run and run.peak_rss / src.stat().st_size, '.2f'):>10}"
            f"{fmt(r.bn_left, 'd'):>9}{fmt(r.nodes, 'd'):>7}{fmt(r.rel_err, '.2e'):>13}"
            f"{fmt(r.file_size and r.file_size / 1e6, '.1f'):>9}  {r.note.strip()}"
        )
    if any(len(r.walls) > 1 for r in rows):
        print(
            "walls per repeat: "
            + "; ".join(f"{r.tool} " + " ".join(f"{w:.2f}" for w in r.walls) for r in rows)
        )


def check_targets(src: Path, rows: dict[str, Row], second: Path | None, size: str) -> bool:
    """Print the project's targets with PASS/FAIL; True when all pass."""
    fuse, ort_row = rows["fusenode"], rows["onnxruntime"]
    results: list[tuple[str, str, bool]] = []

    if fuse.run and fuse.run.rc == 0 and ort_row.run and ort_row.run.rc == 0:
        ratio = fuse.run.wall_s / ort_row.run.wall_s
        results.append(("fusenode wall / onnxruntime wall <= 0.5", f"{ratio:.2f}", ratio <= 0.5))
    else:
        results.append(("fusenode wall / onnxruntime wall <= 0.5", "n/a (a run failed)", False))

    if fuse.run and fuse.run.rc == 0:
        ratio = fuse.run.peak_rss / src.stat().st_size
        results.append(("fusenode peak RSS / model file size <= 1.5", f"{ratio:.2f}", ratio <= 1.5))
    else:
        results.append(("fusenode peak RSS / model file size <= 1.5", "n/a (failed)", False))

    left = fuse.bn_left
    results.append(
        ("BatchNormalization left by fusenode == 0 (Gemm head included)", fmt(left, "d"), left == 0)
    )

    if fuse.out is not None and second is not None and second.exists():
        same = fuse.out.read_bytes() == second.read_bytes()
        results.append(
            (
                "fusenode output byte-identical on a second run",
                "identical" if same else "DIFFERENT",
                same,
            )
        )
    else:
        results.append(("fusenode output byte-identical on a second run", "n/a (failed)", False))

    print()
    print(f"== targets, on the {size} model ==")
    for what, value, ok in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {what:<66} {value}")
    # Not a target of its own, but a fusion that changes the outputs is no fusion at all.
    err = fuse.rel_err
    print(
        f"  info  fusenode max rel err vs original (fp32 fold: expect ~1e-6)       "
        f"{fmt(err, '.2e')}"
    )
    return all(ok for _, _, ok in results)


def versions() -> str:
    found = []
    for mod in ("onnx", "onnxruntime", "onnxoptimizer", "onnxscript", "numpy"):
        try:
            found.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            found.append(f"{mod} missing")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def bench(args: argparse.Namespace) -> int:
    out_dir: Path = args.out_dir.resolve()
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    print(versions())
    print(
        f"{os.cpu_count()} CPUs visible; each tool is a fresh process; best of "
        f"{args.repeat} run(s) for wall, largest peak RSS"
    )
    target_size = "400mb" if "400mb" in args.sizes else args.sizes[-1]
    all_pass = True
    for size in args.sizes:
        from fusenode.node.examples import count_ops, random_inputs

        src = ensure_model(size, out_dir)
        original = count_ops(src)
        feeds = random_inputs(src, batch=1, seed=INPUT_SEED)
        want = ort_outputs(src, feeds)
        rows: dict[str, Row] = {}
        for tool in TOOLS:
            print(f"  {size}: {tool} ...", flush=True)
            row = run_tool(tool, src, runs_dir, size, args.repeat, args.timeout)
            if row.out is not None:
                inspect_output(row, feeds, want)
            rows[tool] = row
        second = None
        if size == target_size and rows["fusenode"].out is not None:
            print(f"  {size}: fusenode again (determinism) ...", flush=True)
            second = runs_dir / f"{size}-fusenode-second.onnx"
            second.unlink(missing_ok=True)
            with contextlib.suppress(Exception):  # a failure shows as "n/a" in the targets
                measure(command("fusenode", src, second), args.timeout)
        print_table(size, src, original, list(rows.values()))
        if size == target_size:
            all_pass = check_targets(src, rows, second, size) and all_pass
        if not args.keep:
            for row in rows.values():
                if row.out is not None:
                    row.out.unlink(missing_ok=True)
            if second is not None:
                second.unlink(missing_ok=True)
    if not args.keep:
        with contextlib.suppress(OSError):
            runs_dir.rmdir()
    if target_size != "400mb":
        print("\nnote: targets were checked on the largest size run, not the ~400 MB model")
    return 0 if all_pass else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=list(SIZES),
        help=f"comma-separated subset of {','.join(SIZES)} (default: both)",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=ROOT / "bench-out", help="models and outputs go here"
    )
    parser.add_argument("--keep", action="store_true", help="keep the tools' output models")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool (best wall kept)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per tool run")
    args = parser.parse_args(argv)
    bad = [s for s in args.sizes if s not in SIZES]
    if bad or not args.sizes:
        parser.error(f"--sizes: choose from {','.join(SIZES)}")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # run as a script from anywhere: node/ is importable
    return bench(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
