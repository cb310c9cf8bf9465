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


@pytest.mark.parametrize("where", ["file", "folder"])
def test_external_data_behind_a_symlink_is_refused(where, tmp_path):
    """As onnx refuses it: a model received from the network must not make the reader open a
    file elsewhere on this machine through a link in its folder."""
    from fusenode.passes.errors import ModelFileError

    model, _ = conv_bn(cin=16, cout=32)
    real = tmp_path / "real"
    real.mkdir()
    onnx.save(
        model, real / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0
    )
    assert fuse_file(real / "m.onnx", tmp_path / "ok.onnx", device="cpu")["n_fused"] == 1
    victim = tmp_path / "victim"
    victim.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "w.bin").write_bytes((real / "w.bin").read_bytes())  # same bytes, other place
    (victim / "m.onnx").write_bytes((real / "m.onnx").read_bytes())
    if where == "file":
        (victim / "w.bin").symlink_to(elsewhere / "w.bin")
        src = victim / "m.onnx"
    else:  # the location names a file inside a linked folder
        model2, _ = conv_bn(cin=16, cout=32)
        sub = tmp_path / "sub"
        sub.mkdir()
        (sub / "d").mkdir()
        onnx.save(
            model2, sub / "m.onnx", save_as_external_data=True, location="d/w.bin", size_threshold=0
        )
        (elsewhere / "d").mkdir()
        (sub / "d" / "w.bin").rename(elsewhere / "d" / "w.bin")
        (sub / "d").rmdir()
        (sub / "d").symlink_to(elsewhere / "d")
        src = sub / "m.onnx"
    with pytest.raises(ModelFileError, match="symbolic link"):
        fuse_file(src, tmp_path / "out.onnx", device="cpu")
    assert not (tmp_path / "out.onnx").exists()
