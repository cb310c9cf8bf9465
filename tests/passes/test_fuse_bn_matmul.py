"""BatchNormalization after MatMul [+ Add]: folded into Gemm (2-D) or MatMul + Add (rank >= 3
with one scale), refused with its reason everywhere else, in every opset and dtype.

Each fold is checked as the other rules' are (count, ``check_model(full_check=True)``, outputs
against onnxruntime with its optimizations off); each refusal leaves the model bit-identical.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.passes.checks import check_fold, check_untouched, fuse
from tests.support.onnx_models import (
    BF16,
    assert_close,
    bn_params,
    count_ops,
    make_model,
    matmul_bn,
    run,
    tensor,
    value_info,
)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# -- folds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("add", [None, "right", "left"])
@pytest.mark.parametrize("c_shape", [("N",), (1,), (), (1, "N"), (1, 1)])
def test_rank_2_becomes_gemm(add, c_shape, tmp_path):
    model, feeds = matmul_bn(add=add, c_shape=c_shape)
    fused, report = check_fold(model, feeds, tmp_path)
    assert ops(fused) == ["Gemm"]
    gemm = fused.graph.node[0]
    assert gemm.input[0] == "A" and gemm.output[0] == "Y"
    assert {a.name for a in gemm.attribute} <= {"alpha", "beta", "transA", "transB"}
    pattern = "MatMul+Add+BatchNormalization" if add else "MatMul+BatchNormalization"
    assert [f["pattern"] for f in report["fused"]] == [pattern]
    assert {t.name for t in fused.graph.initializer} == set(gemm.input[1:])  # nothing left over


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize(("add", "c_shape"), [(None, None), ("right", ("N",)), ("left", (1, 1))])
def test_rank_3_or_more_with_one_scale_becomes_matmul_add(rank, add, c_shape, tmp_path):
    model, feeds = matmul_bn(rank=rank, add=add, c_shape=c_shape or ("N",), uniform=True)
    fused, _ = check_fold(model, feeds, tmp_path)
    assert ops(fused) == ["MatMul", "Add"]
    mm, add_node = fused.graph.node
    assert add_node.input[0] == mm.output[0] and add_node.output[0] == "Y"
    t = next(t for t in fused.graph.initializer if t.name == add_node.input[1])
    assert len(t.dims) == rank - 1 and t.dims[0] == 3  # the BN's channels: axis 1 of [2, 3, ...]


def test_rank_known_from_flatten(tmp_path):
    """No shape declared around the MatMul, but its input comes from Flatten: 2-D."""
    rng = np.random.default_rng(2)
    model = make_model(
        [
            helper.make_node("Flatten", ["X"], ["F"]),
            helper.make_node("MatMul", ["F", "W"], ["P"]),
            helper.make_node(
                "BatchNormalization", ["P", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["Z"]
            ),
            helper.make_node("Relu", ["Z"], ["Y"]),
        ],
        [value_info("X", np.float32, shape=[2, 3, 4])],
        [value_info("Y", np.float32, shape=[2, 5])],
        [tensor("W", rng.standard_normal((12, 5)).astype(np.float32)), *bn_params(rng, 5)],
    )
    fused, _ = check_fold(model, {"X": rng.standard_normal((2, 3, 4)).astype(np.float32)}, tmp_path)
    assert ops(fused) == ["Flatten", "Gemm", "Relu"]


@pytest.mark.parametrize("opset", [6, 7, 9, 11, 13, 14, 15, 17, 22])
def test_every_opset(opset, tmp_path):
    for i, kw in enumerate([{"add": None}, {"add": "right"}, {"rank": 3, "uniform": True}]):
        if opset < 7 and kw.get("rank") == 3:
            continue  # refused there (see test_refuse_rank_3_before_opset_7)
        sub = tmp_path / str(i)
        sub.mkdir()
        fused, _ = check_fold(*matmul_bn(opset=opset, **kw), sub)
        if opset < 7 and "Gemm" in ops(fused):
            gemm = fused.graph.node[0]
            assert helper.get_attribute_value(gemm.attribute[0]) == 1  # broadcast = 1


def test_opset_1(tmp_path):
    """BatchNormalization-1: folded, and right (compared at opset 7, which ORT runs)."""
    model, feeds = matmul_bn(opset=1, add="right")
    fused, report = fuse(model, tmp_path)
    assert report["n_fused"] == 1 and count_ops(fused, "BatchNormalization") == 0
    want = run(onnx.version_converter.convert_version(model, 7), feeds)
    got = run(onnx.version_converter.convert_version(fused, 7), feeds)
    assert_close(got, want, np.float32)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
@pytest.mark.parametrize("rank", [2, 3])
def test_storage_dtype_kept(dtype, rank, tmp_path):
    opset = 22 if np.dtype(dtype) == BF16 else 17
    model, feeds = matmul_bn(rank=rank, uniform=rank > 2, dtype=dtype, opset=opset)
    fused, _ = check_fold(model, feeds, tmp_path, dtype=dtype)
    for t in fused.graph.initializer:
        assert t.data_type == model.graph.initializer[0].data_type


def test_fp16_rounded_once_from_float64(tmp_path):
    model, feeds = matmul_bn(dtype=np.float16)
    fused, _ = check_fold(model, feeds, tmp_path, dtype=np.float16)
    v = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    s = v["bn_scale"] / np.sqrt(v["bn_var"] + float(np.float32(1e-3)))
    got = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    gemm = fused.graph.node[0]
    np.testing.assert_array_equal(got[gemm.input[1]], (v["W"] * s).astype(np.float16))
    want_c = ((v["c"] - v["bn_mean"]) * s + v["bn_bias"]).astype(np.float16)
    np.testing.assert_array_equal(got[gemm.input[2]], want_c)


def test_external_data(tmp_path):
    """Weights in an external data file (as large models come): folded the same."""
    model, feeds = matmul_bn(k=64, n=32)
    src = tmp_path / "ext.onnx"
    onnx.save(model, src, save_as_external_data=True, size_threshold=0, location="ext.data")
    (tmp_path / "out").mkdir()
    fused, _ = check_fold(onnx.load(src), feeds, tmp_path / "out")
    assert ops(fused) == ["Gemm"]


def test_shared_weight_with_plain_matmul(tmp_path):
    """W feeds the MatMul+BN and a plain MatMul: the plain one keeps W, bit for bit."""
    model, feeds = matmul_bn()
    model.graph.node.append(helper.make_node("MatMul", ["A", "W"], ["Q"]))
    model.graph.output.append(value_info("Q", np.float32, shape=[3, 4]))
    fused, _ = check_fold(model, feeds, tmp_path)
    plain = next(n for n in fused.graph.node if n.op_type == "MatMul")
    assert list(plain.input) == ["A", "W"]
    w = next(t for t in fused.graph.initializer if t.name == "W")
    original = next(t for t in model.graph.initializer if t.name == "W")
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(w), onnx.numpy_helper.to_array(original)
    )


def test_in_if_branch_with_outer_weight(tmp_path):
    """MatMul + Add + BN inside both branches of an If, W from the main graph."""
    rng = np.random.default_rng(9)

    def branch(p):
        nodes = [
            helper.make_node("MatMul", ["A", "W"], [f"{p}_m"]),
            helper.make_node("Add", [f"{p}_m", "c"], [f"{p}_s"]),
            helper.make_node(
                "BatchNormalization",
                [f"{p}_s", f"{p}_scale", f"{p}_bias", f"{p}_mean", f"{p}_var"],
                [f"{p}_y"],
            ),
        ]
        out = [value_info(f"{p}_y", np.float32, shape=[3, 4])]
        return helper.make_graph(nodes, p, [], out, bn_params(rng, 4, prefix=p))

    model = make_model(
        [helper.make_node("If", ["cond"], ["Y"], then_branch=branch("t"), else_branch=branch("e"))],
        [
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
            value_info("A", np.float32, shape=[3, 5]),
        ],
        [value_info("Y", np.float32, shape=[3, 4])],
        [
            tensor("W", rng.standard_normal((5, 4)).astype(np.float32)),
            tensor("c", rng.standard_normal(4).astype(np.float32)),
        ],
    )
    a = rng.standard_normal((3, 5)).astype(np.float32)
    for cond in (True, False):
        sub = tmp_path / str(cond)
        sub.mkdir()
        _fused, report = check_fold(model, {"cond": np.array(cond), "A": a}, sub, expect_fused=2)
        assert {f["graph"] for f in report["fused"]} == {
            "main/If.then_branch",
            "main/If.else_branch",
        }


# -- refusals ---------------------------------------------------------------------------------


def test_refuse_rank_3_with_different_scales(tmp_path):
    check_untouched(*matmul_bn(rank=3), tmp_path, "row axis of the product")


def test_refuse_rank_4_with_different_scales(tmp_path):
    check_untouched(*matmul_bn(rank=4, add=None), tmp_path, "rank-4 MatMul output")


def test_refuse_unknown_rank(tmp_path):
    check_untouched(*matmul_bn(declare_rank=False), tmp_path, "rank of the MatMul input 'R'")


def test_refuse_rank_3_before_opset_7(tmp_path):
    check_untouched(*matmul_bn(rank=3, uniform=True, opset=6), tmp_path, "opset < 7")


def test_refuse_add_with_axis_before_opset_7(tmp_path):
    """Add-6 with an ``axis``: only the default suffix broadcast is taken (conservative)."""
    model, feeds = matmul_bn(opset=6)
    model.graph.node[1].attribute.append(helper.make_attribute("axis", 1))
    check_untouched(model, feeds, tmp_path, "opset < 7: the Add's broadcast")


def test_refuse_bias_varying_along_rows(tmp_path):
    model, feeds = matmul_bn(c_shape=(3, "N"))
    check_untouched(model, feeds, tmp_path, "does not broadcast along N=4 only")


def test_refuse_bias_growing_the_output(tmp_path):
    model, feeds = matmul_bn(c_shape=(1, 1, "N"))  # [3, 4] + [1, 1, 4] is rank 3
    model.graph.output[0].CopyFrom(value_info("Y", np.float32, shape=[1, 3, 4]))
    for t in bn_params(np.random.default_rng(1), 3):  # axis 1 of [1, 3, 4]: 3 channels
        next(i for i in model.graph.initializer if i.name == t.name).CopyFrom(t)
    check_untouched(model, feeds, tmp_path, "more than the MatMul output's 2")


def test_refuse_bias_computed_at_run_time(tmp_path):
    model, feeds = matmul_bn()
    model.graph.node[1].input[1] = "c2"
    model.graph.node.insert(0, helper.make_node("Abs", ["c"], ["c2"]))
    check_untouched(model, feeds, tmp_path, "Add bias 'c2' is computed at run time")


def test_refuse_weight_is_graph_input(tmp_path):
    model, feeds = matmul_bn()
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.initializer.remove(w)
    model.graph.input.append(value_info("W", np.float32, shape=list(w.dims)))
    feeds["W"] = onnx.numpy_helper.to_array(w)
    check_untouched(model, feeds, tmp_path, "MatMul weight 'W' is a graph input")


def test_refuse_batched_weight(tmp_path):
    rng = np.random.default_rng(4)
    model = make_model(
        [
            helper.make_node("MatMul", ["A", "W"], ["P"]),
            helper.make_node(
                "BatchNormalization", ["P", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["Y"]
            ),
        ],
        [value_info("A", np.float32, shape=[2, 3, 5])],
        [value_info("Y", np.float32, shape=[2, 3, 4])],
        [tensor("W", rng.standard_normal((2, 5, 4)).astype(np.float32)), *bn_params(rng, 3)],
    )
    feeds = {"A": rng.standard_normal((2, 3, 5)).astype(np.float32)}
    check_untouched(model, feeds, tmp_path, "MatMul weight has rank 3, expected 2")


@pytest.mark.parametrize("value", ["P", "S"])
def test_refuse_intermediate_with_other_consumer(value, tmp_path):
    model, feeds = matmul_bn()
    model.graph.node.append(helper.make_node("Relu", [value], ["R2"]))
    model.graph.output.append(value_info("R2", np.float32, shape=[3, 4]))
    op = {"P": "MatMul", "S": "Add"}[value]
    check_untouched(model, feeds, tmp_path, f"the {op} output {value!r} has 1 other consumer")


def test_refuse_intermediate_is_graph_output(tmp_path):
    model, feeds = matmul_bn()
    model.graph.output.append(value_info("S", np.float32, shape=[3, 4]))
    check_untouched(model, feeds, tmp_path, "the Add output 'S' is also a graph output")
