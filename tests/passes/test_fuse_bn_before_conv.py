"""BatchNormalization before a Conv: folded into the Conv's weight and bias where no padding
can see the difference, refused with its reason elsewhere; and `fusenode fuse` on a model with
every new pattern.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.passes.checks import check_fold, check_untouched, fuse
from tests.support.cli import Cli
from tests.support.onnx_models import (
    BF16,
    assert_close,
    bn_conv,
    bn_params,
    conv_bn,
    count_ops,
    make_model,
    run,
    tensor,
    value_info,
)


def only_conv(fused: onnx.ModelProto) -> onnx.NodeProto:
    assert [n.op_type for n in fused.graph.node] == ["Conv"]
    conv = fused.graph.node[0]
    assert conv.input[0] == "X" and conv.output[0] == "Y"
    return conv


# -- folds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, "depthwise"])
def test_unpadded(spatial, bias, group, tmp_path):
    g = 4 if group == "depthwise" else group
    model, feeds = bn_conv(
        spatial, cin=4, cout=4 if group == "depthwise" else 6, group=g, bias=bias
    )
    fused, report = check_fold(model, feeds, tmp_path)
    only_conv(fused)
    assert [f["pattern"] for f in report["fused"]] == ["BatchNormalization+Conv"]


@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [2, 2]},
        {"dilations": [2, 2]},
        {"strides": [2, 1], "dilations": [1, 2], "group": 2},
        {"auto_pad": "VALID", "strides": [2, 2]},
        {"pads": [0, 0, 0, 0]},
        {"kernel_shape": [3, 3]},
    ],
)
def test_strides_dilations_valid(attrs, tmp_path):
    only_conv(check_fold(*bn_conv(**attrs), tmp_path)[0])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_same_padding_with_a_1x1_kernel_pads_nothing(auto_pad, tmp_path):
    only_conv(check_fold(*bn_conv(k=1, auto_pad=auto_pad, strides=[2, 2]), tmp_path)[0])


@pytest.mark.parametrize(
    "attrs", [{"pads": [1, 1, 1, 1]}, {"pads": [0, 2, 1, 0]}, {"auto_pad": "SAME_UPPER"}]
)
def test_padded_with_zero_shift(attrs, tmp_path):
    """beta = mean = 0: a padded zero is the same before and after the BatchNormalization."""
    only_conv(check_fold(*bn_conv(shift=False, **attrs), tmp_path)[0])


@pytest.mark.parametrize("opset", [6, 7, 9, 11, 13, 14, 15, 17, 22])
def test_every_opset(opset, tmp_path):
    only_conv(check_fold(*bn_conv(opset=opset), tmp_path)[0])


def test_opset_1(tmp_path):
    """BatchNormalization-1: folded, and right (compared at opset 7, which ORT runs)."""
    model, feeds = bn_conv(opset=1)
    fused, report = fuse(model, tmp_path)
    assert report["n_fused"] == 1 and count_ops(fused, "BatchNormalization") == 0
    want = run(onnx.version_converter.convert_version(model, 7), feeds)
    got = run(onnx.version_converter.convert_version(fused, 7), feeds)
    assert_close(got, want, np.float32)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
def test_storage_dtype_kept(dtype, tmp_path):
    opset = 22 if np.dtype(dtype) == BF16 else 17
    fused, _ = check_fold(*bn_conv(dtype=dtype, opset=opset), tmp_path, dtype=dtype)
    assert {t.data_type for t in fused.graph.initializer} == {
        onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    }


def test_float64_weights_exact_to_float64(tmp_path):
    """W' = W * s[c] and b' = b + sum W * t, computed in float64 and kept float64."""
    model, feeds = bn_conv(dtype=np.float64, group=2)
    fused, _ = check_fold(model, feeds, tmp_path, dtype=np.float64)
    v = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    s = v["bn_scale"] / np.sqrt(v["bn_var"] + float(np.float32(1e-3)))
    t = v["bn_bias"] - v["bn_mean"] * s
    conv = only_conv(fused)
    got = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    w = v["W"]  # [6, 2, 3, 3]; output channels 0-2 read inputs 0-1, 3-5 read inputs 2-3
    c = np.array([[0, 1]] * 3 + [[2, 3]] * 3)
    np.testing.assert_array_equal(got[conv.input[1]], w * s[c][:, :, None, None])
    want_b = v["B"] + (w * t[c][:, :, None, None]).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(got[conv.input[2]], want_b, rtol=1e-14)


def test_external_data(tmp_path):
    model, feeds = bn_conv(cin=16, cout=32)
    src = tmp_path / "ext.onnx"
    onnx.save(model, src, save_as_external_data=True, size_threshold=0, location="ext.data")
    (tmp_path / "out").mkdir()
    only_conv(check_fold(onnx.load(src), feeds, tmp_path / "out")[0])


def test_shared_weight_with_plain_conv(tmp_path):
    """W and B feed the BN -> Conv and a Conv on X: that one keeps W and B."""
    model, feeds = bn_conv()
    model.graph.node.append(helper.make_node("Conv", ["X", "W", "B"], ["Z"]))
    model.graph.output.append(value_info("Z", np.float32, 4))
    fused, _ = check_fold(model, feeds, tmp_path)
    plain = next(n for n in fused.graph.node if n.output[0] == "Z")
    assert list(plain.input) == ["X", "W", "B"]
    folded = next(n for n in fused.graph.node if n.output[0] == "Y")
    assert folded.input[1] != "W" and folded.input[2] != "B"


def test_chain_bn_conv_bn(tmp_path):
    """BN -> Conv -> BN: folded on both sides of the Conv."""
    rng = np.random.default_rng(3)
    model, feeds = bn_conv(rng=rng)
    model.graph.node[1].output[0] = "C"
    model.graph.initializer.extend(bn_params(rng, 6, prefix="bn2"))
    model.graph.node.append(
        helper.make_node(
            "BatchNormalization", ["C", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"], ["Y"]
        )
    )
    fused, report = check_fold(model, feeds, tmp_path, expect_fused=2)
    only_conv(fused)
    assert sorted(f["pattern"] for f in report["fused"]) == [
        "BatchNormalization+Conv",
        "Conv+BatchNormalization",
    ]


def test_chain_bn_bn_conv(tmp_path):
    """BN1 -> BN2 -> Conv: BN2 folds first, then BN1 into the Conv that now reads it (in the
    next sweep: the readers' index is built once per sweep)."""
    rng = np.random.default_rng(4)
    model, feeds = bn_conv(rng=rng)
    model.graph.node[0].input[0] = "X1"
    model.graph.initializer.extend(bn_params(rng, 4, prefix="bn0"))
    model.graph.node.insert(
        0,
        helper.make_node(
            "BatchNormalization", ["X", "bn0_scale", "bn0_bias", "bn0_mean", "bn0_var"], ["X1"]
        ),
    )
    fused, report = check_fold(model, feeds, tmp_path, expect_fused=2)
    only_conv(fused)
    assert [f["pattern"] for f in report["fused"]] == ["BatchNormalization+Conv"] * 2
    assert report["n_skipped"] == 0


def test_between_convs_folds_forward_when_backward_is_refused(tmp_path):
    """Conv1 -> BN -> Conv2 where Conv1's output is also a graph output: BN goes into Conv2."""
    rng = np.random.default_rng(8)
    model, feeds = conv_bn(rng=rng)  # X -> Conv (pads 1) -> C -> BN -> Y
    model.graph.output.append(value_info("C", np.float32, 4))
    model.graph.node[1].output[0] = "N"
    model.graph.initializer.append(
        tensor("W2", rng.standard_normal((3, 6, 1, 1)).astype(np.float32))
    )
    model.graph.node.append(helper.make_node("Conv", ["N", "W2"], ["Y"]))
    _fused, report = check_fold(model, feeds, tmp_path)
    assert [f["pattern"] for f in report["fused"]] == ["BatchNormalization+Conv"]


def test_in_loop_body(tmp_path):
    rng = np.random.default_rng(5)
    body = helper.make_graph(
        [
            helper.make_node(
                "BatchNormalization", ["h", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["nb"]
            ),
            helper.make_node("Conv", ["nb", "W"], ["h2"], pads=[1, 1, 1, 1]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
            value_info("h", np.float32, 4),
        ],
        [
            helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
            value_info("h2", np.float32, 4),
        ],
        [
            tensor("bn_scale", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
            tensor("bn_bias", np.zeros(4, np.float32)),  # zero shift: the padding stays exact
            tensor("bn_mean", np.zeros(4, np.float32)),
            tensor("bn_var", rng.uniform(0.5, 2, 4).astype(np.float32)),
        ],
    )
    model = make_model(
        [helper.make_node("Loop", ["n", "", "X"], ["Y"], body=body)],
        [
            helper.make_tensor_value_info("n", onnx.TensorProto.INT64, []),
            value_info("X", np.float32, shape=[1, 4, 5, 5]),
        ],
        [value_info("Y", np.float32, 4)],
        [tensor("W", (rng.standard_normal((4, 4, 3, 3)) / 4).astype(np.float32))],
    )
    feeds = {"n": np.array(3, np.int64), "X": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    _fused, report = check_fold(model, feeds, tmp_path)
    assert report["fused"][0]["graph"] == "main/Loop.body"


# -- refusals ---------------------------------------------------------------------------------


def test_refuse_padding_with_a_shift(tmp_path):
    check_untouched(
        *bn_conv(pads=[1, 1, 1, 1]), tmp_path, "Conv pads its input (pads [1, 1, 1, 1])"
    )


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_refuse_same_padding_with_a_shift(auto_pad, tmp_path):
    check_untouched(
        *bn_conv(auto_pad=auto_pad), tmp_path, f"auto_pad {auto_pad}, kernel extent [3, 3]"
    )


def test_refuse_bn_output_read_by_another_node(tmp_path):
    model, feeds = bn_conv()
    model.graph.node.append(helper.make_node("Relu", ["N"], ["R"]))
    model.graph.output.append(value_info("R", np.float32, 4))
    check_untouched(model, feeds, tmp_path, "read by Conv has 1 other reader(s)")


def test_refuse_bn_output_read_by_two_convs(tmp_path):
    model, feeds = bn_conv()
    model.graph.node.append(helper.make_node("Conv", ["N", "W"], ["Z"]))
    model.graph.output.append(value_info("Z", np.float32, 4))
    check_untouched(model, feeds, tmp_path, "1 other reader(s)")


def test_refuse_bn_output_is_graph_output(tmp_path):
    model, feeds = bn_conv()
    model.graph.output.append(value_info("N", np.float32, 4))
    check_untouched(model, feeds, tmp_path, "'N' read by Conv is also a graph output")


def test_refuse_conv_weight_computed_at_run_time(tmp_path):
    model, feeds = bn_conv()
    model.graph.node[1].input[1] = "W2"
    model.graph.node.insert(0, helper.make_node("Abs", ["W"], ["W2"]))
    check_untouched(model, feeds, tmp_path, "Conv weight 'W2' is computed at run time")


def test_refuse_fp16_overflow(tmp_path):
    model, _feeds = bn_conv(dtype=np.float16)
    for name, value in (("bn_scale", 60000), ("bn_var", 1e-4)):
        t = next(t for t in model.graph.initializer if t.name == name)
        t.CopyFrom(tensor(name, np.full(4, value, np.float16)))
    model.graph.node[0].attribute[0].f = 0.0  # s = 60000 / 0.01 overflows float16
    _, report = fuse(model, tmp_path)
    assert report["n_fused"] == 0 and "overflow float16" in report["skipped"][0]["reason"]


def test_refusals_from_both_sides_are_joined(tmp_path):
    """Conv1 -> BN -> Conv2: Conv1's output is also a graph output, Conv2 pads: both said."""
    rng = np.random.default_rng(8)
    model, feeds = conv_bn(rng=rng)
    model.graph.output.append(value_info("C", np.float32, 4))
    model.graph.node[1].output[0] = "N"
    model.graph.initializer.append(
        tensor("W2", rng.standard_normal((3, 6, 3, 3)).astype(np.float32))
    )
    model.graph.node.append(helper.make_node("Conv", ["N", "W2"], ["Y"], pads=[1, 1, 1, 1]))
    report = check_untouched(model, feeds, tmp_path, "is also a graph output; Conv pads its input")
    assert report["n_skipped"] == 1


# -- the command line -------------------------------------------------------------------------


def every_pattern_model():
    """X -> BN -> Conv (unpadded) -> BN -> Flatten -> MatMul -> Add -> BN -> Y."""
    rng = np.random.default_rng(21)
    nodes = [
        helper.make_node(
            "BatchNormalization", ["X", "a_scale", "a_bias", "a_mean", "a_var"], ["N"]
        ),
        helper.make_node("Conv", ["N", "W1", "B1"], ["C"]),
        helper.make_node(
            "BatchNormalization", ["C", "b_scale", "b_bias", "b_mean", "b_var"], ["D"]
        ),
        helper.make_node("Flatten", ["D"], ["F"]),
        helper.make_node("MatMul", ["F", "W2"], ["P"]),
        helper.make_node("Add", ["P", "c"], ["S"]),
        helper.make_node(
            "BatchNormalization", ["S", "e_scale", "e_bias", "e_mean", "e_var"], ["Y"]
        ),
    ]
    inits = [
        *bn_params(rng, 3, prefix="a"),
        tensor("W1", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        tensor("B1", rng.standard_normal(4).astype(np.float32)),
        *bn_params(rng, 4, prefix="b"),
        tensor("W2", (rng.standard_normal((100, 5)) / 10).astype(np.float32)),
        tensor("c", rng.standard_normal(5).astype(np.float32)),
        *bn_params(rng, 5, prefix="e"),
    ]
    model = make_model(
        nodes,
        [value_info("X", np.float32, shape=["batch", 3, 7, 7])],
        [value_info("Y", np.float32, shape=["batch", 5])],
        inits,
    )
    return model, {"X": rng.standard_normal((2, 3, 7, 7)).astype(np.float32)}


def test_cli_fuse_folds_the_new_patterns(tmp_path):
    model, feeds = every_pattern_model()
    src, out, out2 = tmp_path / "m.onnx", tmp_path / "f.onnx", tmp_path / "g.onnx"
    onnx.save(model, src)
    fusenode = Cli()
    report = json.loads(fusenode.ok("fuse", src, "-o", out, "--json", "--verify").stdout)
    assert report["n_fused"] == 3 and report["n_skipped"] == 0, report["skipped"]
    assert sorted(f["pattern"] for f in report["fused"]) == [
        "BatchNormalization+Conv",
        "Conv+BatchNormalization",
        "MatMul+Add+BatchNormalization",
    ]
    assert (report["nodes_before"], report["nodes_after"]) == (7, 3)
    assert report["verify"]["ok"] and report["verify"]["engine"] == "onnxruntime"
    fused = onnx.load(out)
    onnx.checker.check_model(fused, full_check=True)
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Flatten", "Gemm"]
    assert count_ops(fused, "BatchNormalization") == 0
    assert_close(run(fused, feeds), run(model, feeds), np.float32)
    text = fusenode.ok("fuse", src, "-o", out2).stdout
    assert "fused 3 BatchNormalization node(s)" in text and "nodes 7 -> 3" in text
    # The summary names each pattern whole: a fold into the Conv after the BN is not
    # counted as one into a Conv before it.
    assert (
        "(BatchNormalization+Conv: 1, Conv+BatchNormalization: 1, MatMul+Add+BatchNormalization: 1)"
        in text
    )


# -- 16-bit verification: judged at the output's scale, still catching a wrong fold ----------


def _shifted_bn_conv(dtype, seed):
    """BN (mean and beta ~ N(0, 1): large shifts) -> Conv 6x4x3x3, no padding, all ``dtype``:
    outputs near zero are sums of large terms, where two 16-bit computations round apart."""
    rng = np.random.default_rng(seed)
    opset = 22 if np.dtype(dtype) == BF16 else 17
    model, _feeds = bn_conv(dtype=dtype, rng=rng, opset=opset)
    for t in model.graph.initializer:
        if t.name in ("bn_bias", "bn_mean"):
            t.CopyFrom(tensor(t.name, rng.standard_normal(4).astype(dtype)))
    return model


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bfloat16", "float16"])
def test_16bit_fold_with_large_shifts_passes_its_verification(dtype, seed, tmp_path):
    """Sound folds that an elementwise 16-bit tolerance refused (bfloat16: 4 of 6 seeds)."""
    _, report = fuse(_shifted_bn_conv(dtype, seed), tmp_path, verify=True)
    assert report["n_fused"] == 1, report["skipped"]
    check = report["verify"]["outputs"][0]
    assert check["ok"] and check["atol"] > report["verify"]["atol"]  # scaled to the output


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("wrong", ["one channel's weights x1.1", "shift dropped from bias"])
def test_a_wrong_bfloat16_fold_is_caught(wrong, seed, tmp_path):
    from fusenode.passes.verify import verify

    model = _shifted_bn_conv(BF16, seed)
    fused, _ = fuse(model, tmp_path, verify=True)
    conv = only_conv(fused)
    init = {t.name: t for t in fused.graph.initializer}
    if wrong.startswith("one channel"):
        name = conv.input[1]
        arr = onnx.numpy_helper.to_array(init[name]).astype(np.float32)
        arr[0] *= 1.1
    else:  # the bias the Conv had, as if t = beta - mean * s were forgotten
        name = conv.input[2]
        arr = np.asarray(
            onnx.numpy_helper.to_array(
                next(t for t in model.graph.initializer if t.name == "B")
            ).astype(np.float32)
        )
    init[name].CopyFrom(tensor(name, arr.astype(BF16)))
    bad = tmp_path / "bad.onnx"
    onnx.save(fused, bad)
    result = verify(tmp_path / "in.onnx", bad)
    assert not result.ok, result.to_dict()
    assert result.max_abs_error > result.outputs[0].atol  # caught by the scaled tolerance
