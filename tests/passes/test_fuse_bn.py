"""BatchNormalization fusion: every pattern folds and keeps outputs, in every opset and dtype.

Models are built by hand with onnx.helper, so each test shows exactly the graph it is about.
Each fold test asserts: the BN is gone, ``check_model(full_check=True)`` passes, and outputs
match the original model's under onnxruntime with its optimizations off.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.passes.checks import check_fold, fuse
from tests.support.onnx_models import (
    BF16,
    assert_close,
    conv_bn,
    convt_bn,
    count_ops,
    gemm_bn,
    run,
)

# -- Conv -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, "depthwise"])
def test_conv_bn(spatial, bias, group, tmp_path):
    cin = 4
    cout = 6 if group != "depthwise" else 4
    g = cin if group == "depthwise" else group
    model, feeds = conv_bn(spatial, cin, cout, g, bias)
    check_fold(model, feeds, tmp_path)


# -- ConvTranspose ----------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, "depthwise"])
def test_convtranspose_bn(spatial, bias, group, tmp_path):
    cin = 4
    if group == "depthwise":
        g, cout = cin, cin
    else:
        g, cout = group, 6
    model, feeds = convt_bn(spatial, cin, cout, g, bias)
    check_fold(model, feeds, tmp_path)


# -- Gemm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 2.0), (-1.5, 0.0)])
def test_gemm_bn(trans_a, trans_b, alpha, beta, tmp_path):
    model, feeds = gemm_bn(trans_a, trans_b, alpha, beta)
    fused, _ = check_fold(model, feeds, tmp_path)
    gemm = next(n for n in fused.graph.node if n.op_type == "Gemm")
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["beta"] == 1.0 and attrs["alpha"] == pytest.approx(alpha)


@pytest.mark.parametrize("c_shape", [None, ("N",), (1,), ("M", "N"), ("M", 1), (1, "N"), ()])
def test_gemm_bn_c_shapes(c_shape, tmp_path):
    model, feeds = gemm_bn(c_shape=c_shape, alpha=0.7, beta=1.3)
    check_fold(model, feeds, tmp_path)


# -- opsets and dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [6, 7, 9, 11, 13, 14, 15, 17, 22])
def test_every_opset(opset, tmp_path):
    for i, (model, feeds) in enumerate(
        [conv_bn(opset=opset), convt_bn(opset=opset), gemm_bn(opset=opset)]
    ):
        sub = tmp_path / str(i)
        sub.mkdir()
        check_fold(model, feeds, sub)


def test_opset_1(tmp_path):
    """Opset 1 (BatchNormalization-1 with consumed_inputs): folded, and numerically right."""
    model, feeds = conv_bn(opset=1)
    fused, report = fuse(model, tmp_path)
    assert report["n_fused"] == 1 and count_ops(fused, "BatchNormalization") == 0
    # Neither ORT nor the reference evaluator runs opset 1; compare with the same model
    # converted to opset 7, where BatchNormalization-7 has the same inference semantics.
    want = run(onnx.version_converter.convert_version(model, 7), feeds)
    got = run(onnx.version_converter.convert_version(fused, 7), feeds)
    assert_close(got, want, np.float32)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
@pytest.mark.parametrize("builder", [conv_bn, convt_bn, gemm_bn])
def test_storage_dtype_kept(dtype, builder, tmp_path):
    opset = 22 if np.dtype(dtype) == BF16 else 17  # bfloat16 Conv exists from opset 22
    model, feeds = builder(dtype=dtype, opset=opset)
    fused, _ = check_fold(model, feeds, tmp_path, dtype=dtype)
    for t in fused.graph.initializer:
        assert t.data_type == model.graph.initializer[0].data_type


def test_fp16_rounded_once_from_float64(tmp_path):
    """The fused fp16 weight is exactly round_to_fp16(W * s) computed in float64."""
    model, _ = conv_bn(dtype=np.float16, bias=False)
    fused, _ = fuse(model, tmp_path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    s = inits["bn_scale"].astype(np.float64) / np.sqrt(
        inits["bn_var"].astype(np.float64) + float(np.float32(1e-3))
    )
    want = (inits["W"].astype(np.float64) * s[:, None, None, None]).astype(np.float16)
    conv = next(n for n in fused.graph.node if n.op_type == "Conv")
    got = next(
        onnx.numpy_helper.to_array(t) for t in fused.graph.initializer if t.name == conv.input[1]
    )
    np.testing.assert_array_equal(got, want)
