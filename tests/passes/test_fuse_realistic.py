"""Realistic models built with torch.nn (BN kept, non-trivial statistics): every BN folds.

The Identity-merged statistics case shows the other side: when the exporter turns BN
parameters into outputs of other nodes, they are not constants and the pass must refuse.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fusenode.node import examples
from fusenode.passes.fuse import fuse_file
from tests.support.onnx_models import assert_close, count_ops, run

BUILDERS = {
    "resnet50_like": lambda p: examples.resnet50_like(p, width=0.25, image_size=32),
    "mobilenetv2_like": examples.mobilenetv2_like,
    "convtranspose_decoder": examples.convtranspose_decoder,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_bn_folded_outputs_equal(name, tmp_path):
    src = BUILDERS[name](tmp_path / f"{name}.onnx")
    dst = tmp_path / "fused.onnx"
    original = onnx.load(src)
    bns = count_ops(original, "BatchNormalization")
    assert bns > 0
    report = fuse_file(src, dst, device="cpu", verify=True)
    assert report["n_fused"] == bns and report["n_skipped"] == 0, report["skipped"]
    assert report["verify"]["ok"] and report["verify"]["engine"] == "onnxruntime"
    fused = onnx.load(dst)
    onnx.checker.check_model(fused, full_check=True)
    assert count_ops(fused, "BatchNormalization") == 0
    feeds = examples.random_inputs(src, batch=2, seed=1)
    assert_close(run(dst, feeds), run(src, feeds), np.float32)
    if name == "resnet50_like":  # the Linear + BatchNorm1d head is a Gemm fold
        assert any(f["pattern"] == "Gemm+BatchNormalization" for f in report["fused"])
    if name == "convtranspose_decoder":
        assert any(f["pattern"] == "ConvTranspose+BatchNormalization" for f in report["fused"])


def test_default_statistics_exported_as_identity(tmp_path):
    """Untrained BN (mean 0, var 1, gamma 1, beta 0): the exporter writes
    ``running_var = Identity(weight)``; Identity of an initializer is still a constant."""
    import warnings

    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.BatchNorm2d(8),
    ).eval()
    src, dst = tmp_path / "m.onnx", tmp_path / "f.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 16, 16),),
            src,
            dynamo=False,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=["x"],
            output_names=["y"],
        )
    original = onnx.load(src)
    assert count_ops(original, "Identity") > 0  # the shape this test is about
    report = fuse_file(src, dst, device="cpu", verify=True)
    assert report["n_fused"] == 2 and report["verify"]["ok"]
    fused = onnx.load(dst)
    onnx.checker.check_model(fused, full_check=True)
    assert count_ops(fused, "BatchNormalization") == 0
    assert count_ops(fused, "Identity") == 0  # the Identities went with their BN
