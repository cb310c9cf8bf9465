"""BatchNormalization fusion refusals: each unsafe case is skipped with its reason, and the
model is left exactly as it was."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from tests.passes.checks import assert_unchanged_refusal, check_refusal, fuse
from tests.support.onnx_models import bn_params, conv_bn, make_model, tensor, value_info

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


def test_refuse_training_mode(tmp_path):
    model, _ = conv_bn(opset=15)
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    model.graph.node[1].output.extend(["rm", "rv"])
    assert_unchanged_refusal(model, tmp_path, "training form")


def test_refuse_training_outputs(tmp_path):
    model, _ = conv_bn(opset=9)
    model.graph.node[1].output.extend(["m", "v", "sm", "sv"])
    assert_unchanged_refusal(model, tmp_path, "training form")


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
