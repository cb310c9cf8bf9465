"""BatchNormalization fusion: every pattern folds and keeps outputs; every refusal keeps the model.

Models are built by hand with onnx.helper, so each test shows exactly the graph it is about.
Each fold test asserts: the BN is gone, ``check_model(full_check=True)`` passes, and outputs
match the original model's under onnxruntime with its optimizations off.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fusenode.passes.fuse import fuse_file
from onnx import helper

from tests.onnx_util import (
    BF16,
    assert_close,
    bn_params,
    count_ops,
    make_model,
    run,
    tensor,
    value_info,
)

RNG_SEED = 1234


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


# -- Conv -------------------------------------------------------------------------------------


def conv_bn(
    spatial=2, cin=4, cout=6, group=1, bias=True, dtype=np.float32, opset=17, k=3, rng=None
):
    rng = rng or np.random.default_rng(RNG_SEED)
    w = rng.standard_normal((cout, cin // group, *([k] * spatial))).astype(dtype)
    inits = [tensor("W", w), *bn_params(rng, cout, dtype)]
    conv_in = ["X", "W"]
    if bias:
        inits.append(tensor("B", rng.standard_normal(cout).astype(dtype)))
        conv_in.append("B")
    bn_kw = {"is_test": 1} if opset < 7 else {}
    if opset < 6:
        bn_kw["consumed_inputs"] = [0, 0, 0, 1, 1]
    nodes = [
        helper.make_node("Conv", conv_in, ["C"], group=group, pads=[1] * (2 * spatial)),
        helper.make_node(
            "BatchNormalization",
            ["C", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            ["Y"],
            epsilon=1e-3,
            **bn_kw,
        ),
    ]
    x_shape = [2, cin, *([5] * spatial)]
    model = make_model(
        nodes,
        [value_info("X", dtype, shape=x_shape)],
        [value_info("Y", dtype, 2 + spatial)],
        inits,
        opset,
    )
    feeds = {"X": rng.standard_normal(x_shape).astype(dtype)}
    return model, feeds


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


def convt_bn(spatial=2, cin=4, cout=6, group=1, bias=True, dtype=np.float32, opset=17, rng=None):
    rng = rng or np.random.default_rng(RNG_SEED)
    w = rng.standard_normal((cin, cout // group, *([3] * spatial))).astype(dtype)
    inits = [tensor("W", w), *bn_params(rng, cout, dtype)]
    ins = ["X", "W"]
    if bias:
        inits.append(tensor("B", rng.standard_normal(cout).astype(dtype)))
        ins.append("B")
    bn_kw = {"is_test": 1} if opset < 7 else {}
    nodes = [
        helper.make_node("ConvTranspose", ins, ["C"], group=group, strides=[2] * spatial),
        helper.make_node(
            "BatchNormalization",
            ["C", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            ["Y"],
            **bn_kw,
        ),
    ]
    x_shape = [2, cin, *([4] * spatial)]
    model = make_model(
        nodes,
        [value_info("X", dtype, shape=x_shape)],
        [value_info("Y", dtype, 2 + spatial)],
        inits,
        opset,
    )
    return model, {"X": rng.standard_normal(x_shape).astype(dtype)}


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


def gemm_bn(
    trans_a=0,
    trans_b=0,
    alpha=1.0,
    beta=1.0,
    c_shape=("N",),
    dtype=np.float32,
    opset=17,
    m=3,
    k=5,
    n=4,
    rng=None,
):
    rng = rng or np.random.default_rng(RNG_SEED)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    inits = [tensor("Bw", b), *bn_params(rng, n, dtype)]
    ins = ["A", "Bw"]
    if c_shape is not None:
        shape = [{"N": n, "M": m}.get(d, d) for d in c_shape]
        inits.append(tensor("C", rng.standard_normal(shape).astype(dtype)))
        ins.append("C")
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    if opset < 7:
        attrs["broadcast"] = 1
    bn_kw = {"is_test": 1} if opset < 7 else {}
    nodes = [
        helper.make_node("Gemm", ins, ["G"], **attrs),
        helper.make_node(
            "BatchNormalization",
            ["G", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            ["Y"],
            **bn_kw,
        ),
    ]
    a_shape = [k, m] if trans_a else [m, k]
    model = make_model(
        nodes, [value_info("A", dtype, shape=a_shape)], [value_info("Y", dtype, 2)], inits, opset
    )
    return model, {"A": rng.standard_normal(a_shape).astype(dtype)}


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


# -- structure: chains, constants, subgraphs, shared weights ---------------------------------


def test_chain_conv_bn_bn(tmp_path):
    rng = np.random.default_rng(3)
    model, feeds = conv_bn(rng=rng)
    model.graph.initializer.extend(bn_params(rng, 6, prefix="bn2"))
    model.graph.node[1].output[0] = "Y1"
    model.graph.node.append(
        helper.make_node(
            "BatchNormalization", ["Y1", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"], ["Y"]
        )
    )
    check_fold(model, feeds, tmp_path, expect_fused=2)


def test_weights_from_constant_nodes(tmp_path):
    model, feeds = conv_bn()
    inits = list(model.graph.initializer)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in inits if t.name != "W"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(t for t in inits if t.name == "W")
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(consts + nodes)
    fused, _ = check_fold(model, feeds, tmp_path)
    # The Conv bias became a fused initializer; BN's constants went with it: none left.
    assert count_ops(fused, "Constant") == 0


def test_shared_weight_with_unfused_user(tmp_path):
    """W feeds a Conv+BN and a plain Conv: the plain one must keep the original W."""
    model, feeds = conv_bn()
    model.graph.node.append(helper.make_node("Conv", ["X", "W", "B"], ["Z"], pads=[1, 1, 1, 1]))
    model.graph.output.append(value_info("Z", np.float32, 4))
    fused, _ = check_fold(model, feeds, tmp_path)
    plain = next(n for n in fused.graph.node if n.op_type == "Conv" and n.output[0] == "Z")
    assert list(plain.input) == ["X", "W", "B"]
    fused_conv = next(n for n in fused.graph.node if n.op_type == "Conv" and n.output[0] == "Y")
    assert fused_conv.input[1] != "W" and fused_conv.input[2] != "B"


def test_shared_weight_two_folds(tmp_path):
    """Two Conv+BN pairs with different statistics share W and B: each gets its own copy."""
    rng = np.random.default_rng(7)
    model, feeds = conv_bn(rng=rng)
    model.graph.initializer.extend(bn_params(rng, 6, prefix="bn2"))
    model.graph.node.extend(
        [
            helper.make_node("Conv", ["X", "W", "B"], ["C2"], pads=[1, 1, 1, 1]),
            helper.make_node(
                "BatchNormalization", ["C2", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"], ["Y2"]
            ),
        ]
    )
    model.graph.output.append(value_info("Y2", np.float32, 4))
    fused, _ = check_fold(model, feeds, tmp_path, expect_fused=2)
    convs = [n for n in fused.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]


def _if_model(rng):
    """If whose branches each hold Conv+BN on weights defined in the enclosing graph."""
    w = tensor("W", rng.standard_normal((6, 4, 3, 3)).astype(np.float32))
    then_bn = bn_params(rng, 6, prefix="t")
    else_bn = bn_params(rng, 6, prefix="e")

    def branch(name, prefix, bn_inits):
        nodes = [
            helper.make_node("Conv", ["X", "W"], [f"{prefix}_c"], pads=[1, 1, 1, 1]),
            helper.make_node(
                "BatchNormalization",
                [
                    f"{prefix}_c",
                    f"{prefix}_scale",
                    f"{prefix}_bias",
                    f"{prefix}_mean",
                    f"{prefix}_var",
                ],
                [f"{prefix}_y"],
            ),
        ]
        out = [value_info(f"{prefix}_y", np.float32, 4)]
        return helper.make_graph(nodes, name, [], out, bn_inits)

    nodes = [
        helper.make_node(
            "If",
            ["cond"],
            ["Y"],
            then_branch=branch("then", "t", then_bn),
            else_branch=branch("else", "e", else_bn),
        )
    ]
    model = make_model(
        nodes,
        [
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
            value_info("X", np.float32, shape=[1, 4, 5, 5]),
        ],
        [value_info("Y", np.float32, 4)],
        [w],
    )
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    return model, x


def test_if_subgraphs_with_outer_weights(tmp_path):
    rng = np.random.default_rng(11)
    model, x = _if_model(rng)
    want = [run(model, {"cond": np.array(c), "X": x}) for c in (True, False)]
    fused, report = fuse(model, tmp_path)
    assert report["n_fused"] == 2 and count_ops(fused, "BatchNormalization") == 0
    assert {f["graph"] for f in report["fused"]} == {"main/If.then_branch", "main/If.else_branch"}
    for c, w in zip((True, False), want, strict=True):
        assert_close(run(fused, {"cond": np.array(c), "X": x}), w, np.float32)


def test_loop_body(tmp_path):
    rng = np.random.default_rng(5)
    w = tensor("W", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))
    body = helper.make_graph(
        [
            helper.make_node("Conv", ["h", "W"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node(
                "BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["h2"]
            ),
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
        bn_params(rng, 4),
    )
    model = make_model(
        [helper.make_node("Loop", ["n", "", "X"], ["Y"], body=body)],
        [
            helper.make_tensor_value_info("n", onnx.TensorProto.INT64, []),
            value_info("X", np.float32, shape=[1, 4, 5, 5]),
        ],
        [value_info("Y", np.float32, 4)],
        [w],
    )
    feeds = {"n": np.array(3, np.int64), "X": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    check_fold(model, feeds, tmp_path)


def test_scan_body(tmp_path):
    rng = np.random.default_rng(6)
    body = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "Bw"], ["g"]),
            helper.make_node(
                "BatchNormalization", ["g", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"]
            ),
            helper.make_node("Add", ["acc", "y"], ["acc2"]),
        ],
        "body",
        [value_info("acc", np.float32, shape=[2, 3]), value_info("x", np.float32, shape=[2, 5])],
        [value_info("acc2", np.float32, shape=[2, 3]), value_info("y", np.float32, shape=[2, 3])],
        [tensor("Bw", rng.standard_normal((5, 3)).astype(np.float32)), *bn_params(rng, 3)],
    )
    model = make_model(
        [helper.make_node("Scan", ["A0", "Xs"], ["Af", "Ys"], body=body, num_scan_inputs=1)],
        [value_info("A0", np.float32, shape=[2, 3]), value_info("Xs", np.float32, shape=[4, 2, 5])],
        [value_info("Af", np.float32, shape=[2, 3]), value_info("Ys", np.float32, shape=[4, 2, 3])],
        [],
    )
    feeds = {
        "A0": np.zeros((2, 3), np.float32),
        "Xs": rng.standard_normal((4, 2, 5)).astype(np.float32),
    }
    check_fold(model, feeds, tmp_path)


def test_ir3_initializers_as_inputs(tmp_path):
    """Before IR 4 every initializer is also a graph input; they are still constants."""
    model, feeds = conv_bn(opset=7)
    assert model.ir_version == 3
    fused, _ = check_fold(model, feeds, tmp_path)
    names = {i.name for i in fused.graph.input}
    assert {t.name for t in fused.graph.initializer} <= names
    assert not any(n.startswith("bn_") for n in names)  # dropped with their BatchNormalization


# -- refusals: the model is left exactly as it was --------------------------------------------


def test_refuse_conv_output_has_other_consumer(tmp_path):
    model, feeds = conv_bn()
    model.graph.node.append(helper.make_node("Relu", ["C"], ["R"]))
    model.graph.output.append(value_info("R", np.float32, 4))
    check_refusal(model, feeds, tmp_path, "other consumer")


def test_refuse_conv_output_is_graph_output(tmp_path):
    model, feeds = conv_bn()
    model.graph.output.append(value_info("C", np.float32, 4))
    check_refusal(model, feeds, tmp_path, "graph output")


def _assert_unchanged_refusal(model, tmp_path, reason_part):
    _, report = fuse(model, tmp_path)
    fused = onnx.load(tmp_path / "out.onnx")
    assert report["n_fused"] == 0
    assert reason_part in report["skipped"][0]["reason"]
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in model.graph.node]
    for a, b in zip(fused.graph.node, model.graph.node, strict=True):
        assert a == b


def test_refuse_training_mode(tmp_path):
    model, _ = conv_bn(opset=15)
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    model.graph.node[1].output.extend(["rm", "rv"])
    _assert_unchanged_refusal(model, tmp_path, "training form")


def test_refuse_training_outputs(tmp_path):
    model, _ = conv_bn(opset=9)
    model.graph.node[1].output.extend(["m", "v", "sm", "sv"])
    _assert_unchanged_refusal(model, tmp_path, "training form")


def test_refuse_is_test_zero(tmp_path):
    model, _ = conv_bn(opset=6)
    for a in model.graph.node[1].attribute:
        if a.name == "is_test":
            a.i = 0
    _, report = fuse(model, tmp_path)
    assert report["n_fused"] == 0 and "is_test=0" in report["skipped"][0]["reason"]


def test_refuse_spatial_zero(tmp_path):
    model, _ = conv_bn(opset=7)
    model.graph.node[1].attribute.append(helper.make_attribute("spatial", 0))
    _, report = fuse(model, tmp_path)
    assert report["n_fused"] == 0 and "spatial=0" in report["skipped"][0]["reason"]


def test_refuse_weight_is_graph_input(tmp_path):
    model, feeds = conv_bn()
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.initializer.remove(w)
    model.graph.input.append(value_info("W", np.float32, shape=list(w.dims)))
    feeds["W"] = onnx.numpy_helper.to_array(w)
    check_refusal(model, feeds, tmp_path, "'W' is a graph input")


def test_refuse_overridable_initializer(tmp_path):
    """IR >= 4: an initializer also listed as input is a default the caller may override."""
    model, feeds = conv_bn()
    model.graph.input.append(value_info("bn_mean", np.float32, shape=[6]))
    check_refusal(model, feeds, tmp_path, "overridable")


def test_refuse_weight_computed_at_run_time(tmp_path):
    model, feeds = conv_bn()
    model.graph.node[0].input[1] = "W2"
    model.graph.node.insert(0, helper.make_node("Abs", ["W"], ["W2"]))
    check_refusal(model, feeds, tmp_path, "computed at run time")


def test_refuse_negative_variance(tmp_path):
    model, _feeds = conv_bn()
    var = next(t for t in model.graph.initializer if t.name == "bn_var")
    arr = onnx.numpy_helper.to_array(var).copy()
    arr[2] = -5.0
    var.CopyFrom(tensor("bn_var", arr))
    _, report = fuse(model, tmp_path)
    assert report["n_fused"] == 0 and "var + epsilon <= 0" in report["skipped"][0]["reason"]


def test_refuse_non_finite_parameters(tmp_path):
    model, _feeds = conv_bn()
    mean = next(t for t in model.graph.initializer if t.name == "bn_mean")
    arr = onnx.numpy_helper.to_array(mean).copy()
    arr[0] = np.inf
    mean.CopyFrom(tensor("bn_mean", arr))
    _, report = fuse(model, tmp_path)
    assert report["n_fused"] == 0 and "non-finite" in report["skipped"][0]["reason"]


def test_refuse_fp16_overflow(tmp_path):
    model, _feeds = conv_bn(dtype=np.float16)
    var = next(t for t in model.graph.initializer if t.name == "bn_var")
    scale = next(t for t in model.graph.initializer if t.name == "bn_scale")
    scale.CopyFrom(tensor("bn_scale", np.full(6, 60000, np.float16)))
    var.CopyFrom(tensor("bn_var", np.full(6, 1e-4, np.float16)))
    model.graph.node[1].attribute[0].f = 0.0  # epsilon 0: s = 60000 / 0.01 overflows fp16
    _, report = fuse(model, tmp_path)
    assert report["n_fused"] == 0 and "overflow float16" in report["skipped"][0]["reason"]


def test_refuse_not_after_linear_op(tmp_path):
    model, feeds = conv_bn()
    model.graph.node.insert(1, helper.make_node("Relu", ["C"], ["R"]))
    model.graph.node[2].input[0] = "R"
    check_refusal(model, feeds, tmp_path, "comes from Relu")


def test_refuse_bn_on_graph_input(tmp_path):
    rng = np.random.default_rng(0)
    model = make_model(
        [
            helper.make_node(
                "BatchNormalization", ["X", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["Y"]
            )
        ],
        [value_info("X", np.float32, shape=[1, 3, 4, 4])],
        [value_info("Y", np.float32, 4)],
        bn_params(rng, 3),
    )
    check_refusal(
        model,
        {"X": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)},
        tmp_path,
        "graph input",
    )
