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


def test_torch_input_bn_and_linear_without_bias(tmp_path):
    """An input-normalizing BatchNorm2d before an unpadded Conv2d, and Linear(bias=False) +
    BatchNorm1d (exported as Flatten -> MatMul -> BatchNormalization): all four BNs fold."""
    import warnings

    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn0 = torch.nn.BatchNorm2d(3)
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8 * 6 * 6, 16, bias=False)
            self.bn2 = torch.nn.BatchNorm1d(16)
            self.fc2 = torch.nn.Linear(16, 10)
            self.bn3 = torch.nn.BatchNorm1d(10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv(self.bn0(x))))
            x = torch.relu(self.bn2(self.fc(x.flatten(1))))
            return self.bn3(self.fc2(x))

    net = Net()
    with torch.no_grad():
        for bn in (net.bn0, net.bn1, net.bn2, net.bn3):  # statistics a wrong fold cannot hide
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    net.eval()
    src, dst = tmp_path / "m.onnx", tmp_path / "f.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.randn(2, 3, 8, 8),),
            src,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,  # BNs kept; constants folded
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
        )
    original = onnx.load(src)
    assert count_ops(original, "BatchNormalization") == 4 and count_ops(original, "MatMul") == 1
    report = fuse_file(src, dst, device="cpu", verify=True)
    assert report["n_fused"] == 4 and report["verify"]["ok"], report["skipped"]
    assert {f["pattern"] for f in report["fused"]} == {
        "BatchNormalization+Conv",
        "Conv+BatchNormalization",
        "MatMul+BatchNormalization",
        "Gemm+BatchNormalization",
    }
    fused = onnx.load(dst)
    onnx.checker.check_model(fused, full_check=True)
    assert [n.op_type for n in fused.graph.node] == [
        "Conv",
        "Relu",
        "Flatten",
        "Gemm",
        "Relu",
        "Gemm",
    ]
    x = {"x": np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    with torch.no_grad():
        want = net(torch.from_numpy(x["x"])).numpy()
    assert_close(run(dst, x), [want], np.float32)
