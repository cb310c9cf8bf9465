"""ONNX models built by hand for tests, and the helpers that run and compare them.

The BatchNormalization builders (:func:`conv_bn`, :func:`convt_bn`, :func:`gemm_bn`) return a
model with non-trivial statistics and the feeds to run it.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

RNG_SEED = 1234

BF16 = np.dtype(ml_dtypes.bfloat16)
ONNX_TYPE = {
    np.dtype(np.float32): onnx.TensorProto.FLOAT,
    np.dtype(np.float16): onnx.TensorProto.FLOAT16,
    np.dtype(np.float64): onnx.TensorProto.DOUBLE,
    BF16: onnx.TensorProto.BFLOAT16,
}
#: Tolerances for comparing a fused model's outputs with the original's (per storage dtype).
TOL = {
    np.dtype(np.float32): (1e-4, 1e-5),
    np.dtype(np.float64): (1e-9, 1e-10),
    np.dtype(np.float16): (1e-2, 1e-2),
    BF16: (5e-2, 5e-2),
}


def bn_params(rng: np.random.Generator, c: int, dtype=np.float32, prefix: str = "bn"):
    """Non-trivial BatchNormalization parameters (a wrong fold cannot hide behind 1s and 0s)."""
    vals = {
        f"{prefix}_scale": rng.uniform(0.5, 1.5, c),
        f"{prefix}_bias": rng.normal(0, 0.2, c),
        f"{prefix}_mean": rng.normal(0, 0.5, c),
        f"{prefix}_var": rng.uniform(0.5, 2.0, c),
    }
    return [numpy_helper.from_array(v.astype(dtype), k) for k, v in vals.items()]


def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def value_info(name: str, dtype, rank: int | None = None, shape=None) -> onnx.ValueInfoProto:
    if shape is None:
        shape = [f"{name}_d{i}" for i in range(rank or 0)]
    return helper.make_tensor_value_info(name, ONNX_TYPE[np.dtype(dtype)], shape)


def make_model(nodes, inputs, outputs, initializers, opset: int = 17, ir_version=None):
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or helper.find_min_ir_version_for(
        [helper.make_opsetid("", opset)]
    )
    if model.ir_version < 4:  # IR < 4: every initializer is also declared as a graph input
        declared = {i.name for i in model.graph.input}
        for t in model.graph.initializer:
            if t.name not in declared:
                model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    return model


def run(model: onnx.ModelProto | Path | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with onnxruntime (optimizations off); the ONNX reference evaluator where ORT cannot."""
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception:
        from onnx.reference import ReferenceEvaluator

        m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        return [np.asarray(x) for x in ReferenceEvaluator(m).run(None, feeds)]
    return sess.run(None, feeds)


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    def walk(g):
        n = 0
        for node in g.node:
            n += node.op_type == op_type
            for a in node.attribute:
                if a.HasField("g"):
                    n += walk(a.g)
                for sub in a.graphs:
                    n += walk(sub)
        return n

    return walk(model.graph)


def assert_close(got: list[np.ndarray], want: list[np.ndarray], dtype) -> None:
    rtol, atol = TOL[np.dtype(dtype)]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(
            np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol
        )


# -- BatchNormalization after each op family ------------------------------------------------


def _weights(rng, w, channels: int, bias: bool, dtype):
    """Initializers W, the BN parameters and, when asked, a bias B (drawn from ``rng`` in this
    order), and the op's inputs."""
    inits = [tensor("W", w), *bn_params(rng, channels, dtype)]
    ins = ["X", "W"]
    if bias:
        inits.append(tensor("B", rng.standard_normal(channels).astype(dtype)))
        ins.append("B")
    return inits, ins


def _op_then_bn(op: onnx.NodeProto, inits, x_shape, dtype, opset: int, **bn_attrs):
    """X -> op -> C -> BatchNormalization -> Y, with the inference form of ``opset``."""
    if opset < 7:
        bn_attrs["is_test"] = 1
    bn = helper.make_node(
        "BatchNormalization", ["C", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["Y"], **bn_attrs
    )
    return make_model(
        [op, bn],
        [value_info("X", dtype, shape=x_shape)],
        [value_info("Y", dtype, len(x_shape))],
        inits,
        opset,
    )


def conv_bn(
    spatial=2, cin=4, cout=6, group=1, bias=True, dtype=np.float32, opset=17, k=3, rng=None
):
    rng = rng or np.random.default_rng(RNG_SEED)
    w = rng.standard_normal((cout, cin // group, *([k] * spatial))).astype(dtype)
    inits, conv_in = _weights(rng, w, cout, bias, dtype)
    conv = helper.make_node("Conv", conv_in, ["C"], group=group, pads=[1] * (2 * spatial))
    old = {"consumed_inputs": [0, 0, 0, 1, 1]} if opset < 6 else {}
    x_shape = [2, cin, *([5] * spatial)]
    model = _op_then_bn(conv, inits, x_shape, dtype, opset, epsilon=1e-3, **old)
    feeds = {"X": rng.standard_normal(x_shape).astype(dtype)}
    return model, feeds


def convt_bn(spatial=2, cin=4, cout=6, group=1, bias=True, dtype=np.float32, opset=17, rng=None):
    rng = rng or np.random.default_rng(RNG_SEED)
    w = rng.standard_normal((cin, cout // group, *([3] * spatial))).astype(dtype)
    inits, ins = _weights(rng, w, cout, bias, dtype)
    convt = helper.make_node("ConvTranspose", ins, ["C"], group=group, strides=[2] * spatial)
    x_shape = [2, cin, *([4] * spatial)]
    model = _op_then_bn(convt, inits, x_shape, dtype, opset)
    return model, {"X": rng.standard_normal(x_shape).astype(dtype)}


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


def matmul_bn(
    rank=2,
    add="right",
    c_shape=("N",),
    dtype=np.float32,
    opset=17,
    k=5,
    n=4,
    uniform=False,
    declare_rank=True,
    rng=None,
):
    """A [.., 3, K] -> MatMul(A, W [K, N]) [-> Add(c)] -> BatchNormalization -> Y.

    ``add``: None, "right" (Add(MatMul, c)) or "left" (Add(c, MatMul)). For rank >= 3 the
    BatchNormalization has the output's axis-1 size channels; ``uniform`` gives them one scale.
    ``declare_rank=False`` puts a Relu before the MatMul and after the BatchNormalization, so
    that no shape is declared for the values around them (unknown rank).
    """
    rng = rng or np.random.default_rng(RNG_SEED)
    a_shape = [[3, k], [2, 3, k], [2, 3, 2, k]][rank - 2] if rank <= 4 else None
    out_shape = [*a_shape[:-1], n]
    channels = out_shape[1]
    inits = [tensor("W", rng.standard_normal((k, n)).astype(dtype))]
    bn = bn_params(rng, channels, dtype)
    if uniform:  # one scale s = gamma / sqrt(var + eps) for all channels
        bn[0] = tensor("bn_scale", np.full(channels, 1.3, dtype))
        bn[3] = tensor("bn_var", np.full(channels, 0.7, dtype))
    inits += bn
    nodes = [helper.make_node("MatMul", ["A" if declare_rank else "R", "W"], ["P"])]
    bn_in = "P"
    if add:
        shape = [{"N": n}.get(d, d) for d in c_shape]
        inits.append(tensor("c", rng.standard_normal(shape).astype(dtype)))
        ins = ["P", "c"] if add == "right" else ["c", "P"]
        kw = {"broadcast": 1} if opset < 7 else {}
        nodes.append(helper.make_node("Add", ins, ["S"], **kw))
        bn_in = "S"
    bn_kw = {"is_test": 1} if opset < 7 else {}
    if opset < 6:  # BatchNormalization-1 requires consumed_inputs
        bn_kw["consumed_inputs"] = [0, 0, 0, 1, 1]
    nodes.append(
        helper.make_node(
            "BatchNormalization",
            [bn_in, "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            ["Y" if declare_rank else "Z"],
            epsilon=1e-3,
            **bn_kw,
        )
    )
    if not declare_rank:  # A and Y reach the MatMul and the BN through Relus: no shapes there
        nodes.insert(0, helper.make_node("Relu", ["A"], ["R"]))
        nodes.append(helper.make_node("Relu", ["Z"], ["Y"]))
    x, y = value_info("A", dtype, shape=a_shape), value_info("Y", dtype, shape=out_shape)
    model = make_model(nodes, [x], [y], inits, opset)
    return model, {"A": rng.standard_normal(a_shape).astype(dtype)}


def bn_conv(
    spatial=2,
    cin=4,
    cout=6,
    group=1,
    bias=True,
    dtype=np.float32,
    opset=17,
    k=3,
    shift=True,
    rng=None,
    **conv_attrs,
):
    """X -> BatchNormalization -> Conv -> Y. ``shift=False`` gives beta = mean = 0 (t = 0)."""
    rng = rng or np.random.default_rng(RNG_SEED)
    w = rng.standard_normal((cout, cin // group, *([k] * spatial))).astype(dtype)
    inits = [tensor("W", w), *bn_params(rng, cin, dtype)]
    if not shift:
        inits[2] = tensor("bn_bias", np.zeros(cin, dtype))
        inits[3] = tensor("bn_mean", np.zeros(cin, dtype))
    ins = ["N", "W"]
    if bias:
        inits.append(tensor("B", rng.standard_normal(cout).astype(dtype)))
        ins.append("B")
    bn_kw = {"is_test": 1} if opset < 7 else {}
    if opset < 6:  # BatchNormalization-1 requires consumed_inputs
        bn_kw["consumed_inputs"] = [0, 0, 0, 1, 1]
    nodes = [
        helper.make_node(
            "BatchNormalization",
            ["X", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            ["N"],
            epsilon=1e-3,
            **bn_kw,
        ),
        helper.make_node("Conv", ins, ["Y"], group=group, **conv_attrs),
    ]
    x_shape = [2, cin, *([7] * spatial)]
    model = make_model(
        nodes,
        [value_info("X", dtype, shape=x_shape)],
        [value_info("Y", dtype, 2 + spatial)],
        inits,
        opset,
    )
    return model, {"X": rng.standard_normal(x_shape).astype(dtype)}
