"""File-level entry point: fuse BatchNormalization in an ONNX file, optionally verify, write.

The output appears only complete and only when everything succeeded: the model is written
into a staging folder beside the target, verified there when asked, then renamed into place
(external data file first). The input is only ever read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fusenode.passes import fuse_bn
from fusenode.passes.errors import OutputError, PassError, VerificationError
from fusenode.passes.framework import run_rewrites
from fusenode.passes.modelfile import LazyModel
from fusenode.passes.numerics import backend_for


def _check_output(src: Path, dst: Path) -> None:
    if dst.exists() and dst.is_dir():
        raise OutputError(f"{dst}: is a directory")
    folder = dst.parent
    if not folder.is_dir():
        raise OutputError(f"{dst}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{dst}: folder {folder} is not writable")
    with contextlib.suppress(FileNotFoundError):
        if src.exists() and dst.exists() and os.path.samefile(src, dst):
            raise OutputError(f"{dst}: the output would overwrite the input")
    if src.resolve() == dst.resolve():
        raise OutputError(f"{dst}: the output would overwrite the input")


def fuse_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    device: str = "auto",
    verify: bool = False,
    shapes: dict[str, list[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> dict[str, Any]:
    """Fuse ``src`` into ``dst``; return the report as a JSON-ready dict.

    Raises a :class:`~passes.errors.PassError` subclass on bad input, unwritable output or a
    failed verification; nothing is written at ``dst`` then.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _check_output(src, dst)
    try:
        backend = backend_for(device)
    except (RuntimeError, ValueError) as e:
        raise PassError(str(e)) from e
    staging = Path(tempfile.mkdtemp(prefix=".fusenode-", dir=dst.parent))
    try:
        with LazyModel.load(src, spill_dir=staging) as model:
            model.check()
            report = run_rewrites(
                model.model, model.store, fuse_bn.rules(backend), fuse_bn.NAME, fuse_bn.VERSION
            )
            # No fsync: the output can be made again from the input, and the renames below
            # already guarantee a complete file or none (fsync would cost ~0.5 s per GB).
            written = model.save(staging / dst.name, durable=False)
        result: dict[str, Any] = {
            "input": str(src),
            "output": str(dst),
            "device": backend.name,
            **report.to_dict(),
            "verify": None,
        }
        if verify:
            from fusenode.passes.verify import verify as run_verify

            check = run_verify(src, staging / dst.name, shapes=shapes, rtol=rtol, atol=atol)
            result["verify"] = check.to_dict()
            if not check.ok:
                worst = max(check.outputs, key=lambda c: c.max_abs_error)
                raise VerificationError(
                    f"outputs differ beyond tolerance (rtol {check.rtol:g}, atol {check.atol:g}): "
                    f"output {worst.name!r} max abs error {worst.max_abs_error:.3g}, "
                    f"max rel error {worst.max_rel_error:.3g}; nothing written"
                )
        for path in written:  # the data file (if any) comes first
            os.replace(path, dst.parent / path.name)
        result["files"] = [str(dst.parent / p.name) for p in written]
        result["bytes_written"] = sum((dst.parent / p.name).stat().st_size for p in written)
        result["seconds"] = round(time.perf_counter() - started, 4)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)
