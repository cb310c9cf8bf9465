"""An optimization job's fuse and verification, in a child process under limits.

The model comes from the network: whoever stored it chose its graph, and onnxruntime runs it
for the verification. So the optimizer never runs that in the daemon: `run_fuse_job` starts
``python -m fusenode.node.fusejob`` and kills it when it runs past ``max_seconds`` or its
resident memory passes ``max_memory`` bytes (read from /proc every `POLL` seconds: an address
space limit would also count the virtual reservations of CUDA and of the allocators, which are
not memory used). The daemon keeps serving whatever the child does; a kill fails the job with
the reason.

The child writes its report (or its error) as JSON to a file the parent names; its exit code
says which. `run_verify_job` runs only the equivalence check the same way, for ``fusenode
verify --recheck`` (a receiver runs two models from the network).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from fusenode.node.errors import NodeError

__all__ = ["FuseJobError", "auto_memory_limit", "run_fuse_job", "run_verify_job"]

POLL = 0.1
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class FuseJobError(NodeError):
    """The fuse child failed, or was stopped at a limit; ``kind`` is the error's class name
    (VerificationError, ModelFileError, ... or Limit)."""

    def __init__(self, message: str, kind: str = "Error") -> None:
        super().__init__(message)
        self.kind = kind


def auto_memory_limit(model_bytes: int) -> int:
    """6x the model plus 2 GiB (the model, its fused copy, onnxruntime's two sessions and
    their buffers), at most 3/4 of the machine's memory."""
    want = 6 * model_bytes + 2 * 2**30
    try:
        total = os.sysconf("SC_PHYS_PAGES") * _PAGE
    except (ValueError, OSError, AttributeError):
        return want
    return min(want, total * 3 // 4)


def _rss(pid: int) -> int:
    """Resident bytes of ``pid`` (0 when it is gone or /proc is not there)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


async def run_fuse_job(
    src: Path,
    dst: Path,
    *,
    device: str,
    max_seconds: float,
    max_memory: int,
) -> dict[str, Any]:
    """Fuse and verify ``src`` into ``dst`` in a child process; its report. Raises
    `FuseJobError` with the child's error, or when a limit stopped it."""
    try:
        return await _run_child(["fuse", str(src), str(dst), device], dst, max_seconds, max_memory)
    except BaseException:
        for path in (dst, dst.with_name(dst.name + ".data")):  # a stopped child's output
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise


async def run_verify_job(
    original: Path,
    optimized: Path,
    *,
    seed: int,
    shapes: dict[str, list[int]] | None,
    rtol: float | None,
    atol: float | None,
    at_most_default: bool = False,
    max_seconds: float,
    max_memory: int,
) -> dict[str, Any]:
    """`fusenode.passes.verify.verify` of two models in a child process under the same limits
    (``fusenode verify --recheck``: both models come from the network); its result as a dict.
    Raises `FuseJobError` when the models cannot be run or a limit stopped the child."""
    options = json.dumps(
        {
            "seed": seed,
            "shapes": shapes,
            "rtol": rtol,
            "atol": atol,
            "at_most_default": at_most_default,
        }
    )
    return await _run_child(
        ["verify", str(original), str(optimized), options], optimized, max_seconds, max_memory
    )


async def _run_child(
    argv: list[str], beside: Path, max_seconds: float, max_memory: int
) -> dict[str, Any]:
    report_path = beside.with_name(beside.name + ".report.json")
    log_path = beside.with_name(beside.name + ".log")
    with open(log_path, "wb") as log_file:  # a file, not a pipe: a chatty child never blocks
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fusenode.node.fusejob",
            *argv,
            str(report_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    return await _watch(proc, report_path, log_path, max_seconds, max_memory)


async def _watch(
    proc: asyncio.subprocess.Process,
    report_path: Path,
    log_path: Path,
    max_seconds: float,
    max_memory: int,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    peak, stopped = 0, ""
    waiter = asyncio.ensure_future(proc.wait())
    try:
        while not waiter.done():
            peak = max(peak, _rss(proc.pid))
            if peak > max_memory:
                stopped = (
                    f"it used {peak / 2**20:.0f} MiB, over the {max_memory / 2**20:.0f} MiB "
                    "allowed ([optimizer] max_memory)"
                )
            elif loop.time() > deadline:
                stopped = f"it ran past {max_seconds:.0f} s ([optimizer] max_seconds)"
            if stopped:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await waiter
                raise FuseJobError(f"fusion stopped: {stopped}", "Limit")
            await asyncio.wait({waiter}, timeout=POLL)
        stderr = log_path.read_bytes()[-4096:].decode("utf-8", "replace")
        try:
            result = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            last = stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            raise FuseJobError(f"the fusion process failed: {last[0][:300]}") from None
        if proc.returncode != 0 or "error" in result:
            error = result.get("error") or {}
            raise FuseJobError(str(error.get("message", "failed")), str(error.get("type", "")))
        result["peak_rss_bytes"] = peak
        return result
    finally:
        if not waiter.done():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await waiter
        for path in (report_path, log_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _main(argv: list[str]) -> int:
    mode, src, dst, option, report_path = argv
    from fusenode.passes.errors import PassError
    from fusenode.passes.fuse import fuse_file
    from fusenode.passes.verify import verify

    try:
        if mode == "verify":
            opts = json.loads(option)
            report: dict[str, Any] = verify(Path(src), Path(dst), **opts).to_dict()
        else:
            report = fuse_file(src, dst, device=option, verify=True)
        code = 0
    except PassError as e:
        report = {"error": {"type": type(e).__name__, "message": str(e)}}
        code = 1
    except MemoryError:  # numpy could not allocate: a resource limit, not a verdict
        report = {"error": {"type": "Limit", "message": "out of memory"}}
        code = 1
    Path(report_path).write_text(json.dumps(report), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
