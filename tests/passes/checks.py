"""Fuse a model through the file entry point and check what came out."""

from __future__ import annotations

import numpy as np
import onnx

from fusenode.passes.fuse import fuse_file
from tests.support.onnx_models import assert_close, count_ops, run


def fuse(model: onnx.ModelProto, tmp_path, **kw):
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    report = fuse_file(src, dst, device="cpu", **kw)
    fused = onnx.load(dst)
    onnx.checker.check_model(fused, full_check=True)
    return fused, report


def check_fold(model, feeds, tmp_path, dtype=np.float32, expect_fused=1):
    onnx.checker.check_model(model, full_check=True)
    want = run(model, feeds)
    fused, report = fuse(model, tmp_path)
    assert report["n_fused"] == expect_fused, report["skipped"]
    assert (
        count_ops(fused, "BatchNormalization")
        == count_ops(model, "BatchNormalization") - expect_fused
    )
    assert_close(run(fused, feeds), want, dtype)
    return fused, report


def check_refusal(model, feeds, tmp_path, reason_part: str):
    want = run(model, feeds)
    fused, report = fuse(model, tmp_path)
    assert report["n_fused"] == 0
    assert count_ops(fused, "BatchNormalization") == count_ops(model, "BatchNormalization")
    reasons = " | ".join(s["reason"] for s in report["skipped"])
    assert reason_part in reasons
    got = run(fused, feeds)
    for g, w in zip(got, want, strict=True):  # untouched: bit-identical outputs
        np.testing.assert_array_equal(g, w)
    return report


def assert_unchanged_refusal(model, tmp_path, reason_part):
    _, report = fuse(model, tmp_path)
    fused = onnx.load(tmp_path / "out.onnx")
    assert report["n_fused"] == 0
    assert reason_part in report["skipped"][0]["reason"]
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in model.graph.node]
    for a, b in zip(fused.graph.node, model.graph.node, strict=True):
        assert a == b


def check_untouched(model, feeds, tmp_path, reason_part: str):
    """Refused with ``reason_part`` in the reason, outputs bit-identical, and the graph's nodes
    and initializer values exactly the input's."""
    report = check_refusal(model, feeds, tmp_path, reason_part)
    fused = onnx.load(tmp_path / "out.onnx")
    assert list(fused.graph.node) == list(model.graph.node)
    got = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    want = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype
        np.testing.assert_array_equal(got[name], value)
    return report
