"""Writing a fused model: computed weights made by the writer itself (small models) or by
worker threads (large ones) give the same bytes, and so do both layouts (inline, external)."""

from __future__ import annotations

import onnx
import pytest

from fusenode.passes import modelfile
from fusenode.passes.fuse import fuse_file
from tests.support.onnx_models import conv_bn, gemm_bn


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("builder", [conv_bn, gemm_bn])
def test_threaded_and_inline_writes_give_the_same_bytes(builder, external, tmp_path, monkeypatch):
    model, _ = builder(cin=16, cout=32) if builder is conv_bn else builder(k=64, n=32)
    src = tmp_path / "in.onnx"
    onnx.save(model, src, save_as_external_data=external, size_threshold=0)
    written = {}
    for threads_from in (modelfile.THREADS_FROM, 0):  # the default (inline here), threads
        monkeypatch.setattr(modelfile, "THREADS_FROM", threads_from)
        out = tmp_path / str(threads_from)
        out.mkdir()
        report = fuse_file(src, out / "out.onnx", device="cpu")
        assert report["n_fused"] == 1
        written[threads_from] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    inline, threaded = written.values()
    assert inline == threaded
    assert ("out.onnx.data" in inline) == external
