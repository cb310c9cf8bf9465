"""BatchNormalization fusion in whole graphs: chains, Constant nodes, shared weights, subgraphs.

Each test builds its graph by hand, fuses it and checks the count, ``check_model`` and the
outputs against onnxruntime with its optimizations off (see :mod:`tests.passes.checks`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from tests.passes.checks import check_fold, fuse
from tests.support.onnx_models import (
    assert_close,
    bn_params,
    conv_bn,
    count_ops,
    make_model,
    run,
    tensor,
    value_info,
)

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
