"""The example models are what the fusion pass, the benchmark and the demo are judged on.

So they must really contain the BatchNormalization nodes (inference form, constant, non-trivial
parameters), be valid ONNX, run under onnxruntime and compute what the torch model computes:
otherwise a fusion test on them would pass vacuously.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from fusenode.node import examples


@dataclass(frozen=True)
class Case:
    """One builder: how to write the model, the torch module it exports, what it must hold."""

    build: Callable[[Path], Path]
    module: Callable[[], torch.nn.Module]
    batchnorms: int
    producers: dict[str, int]  # op type feeding a BatchNormalization -> how many


CASES = {
    "tiny_cnn": Case(examples.tiny_cnn, examples.tiny_cnn_module, 2, {"Conv": 2}),
    "decoder": Case(
        examples.convtranspose_decoder,
        examples.convtranspose_decoder_module,
        3,
        {"ConvTranspose": 3},
    ),
    "mobilenetv2": Case(
        examples.mobilenetv2_like, examples.mobilenetv2_like_module, 52, {"Conv": 52}
    ),
    "resnet50_w025": Case(
        lambda p: examples.resnet50_like(p, width=0.25, image_size=32),
        lambda: examples.resnet50_like_module(width=0.25),
        54,
        {"Conv": 53, "Gemm": 1},
    ),
}
SLOW = {"mobilenetv2", "resnet50_w025"}


def _params(names: list[str]) -> list[Any]:
    return [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in names]


Built = tuple[Case, Path, onnx.ModelProto]


@pytest.fixture(scope="module")
def build_once(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Built]:
    """Export each model at most once per test module; tests share the file (read-only)."""
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            case = CASES[name]
            path = case.build(tmp_path_factory.mktemp(name) / "model.onnx")
            cache[name] = (case, path, onnx.load(str(path)))
        return cache[name]

    return get


@pytest.fixture(params=_params(list(CASES)))
def built(request: pytest.FixtureRequest, build_once: Callable[[str], Built]) -> Built:
    return build_once(request.param)


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    # Off, so that onnxruntime does not fuse the BatchNorm itself: we test the file as written.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_valid_model(built: Built) -> None:
    _, path, _ = built
    onnx.checker.check_model(str(path), full_check=True)


def test_every_batchnorm_kept(built: Built) -> None:
    case, _, model = built
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == case.batchnorms
    torch_bns = [
        m for m in case.module().modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    assert len(torch_bns) == case.batchnorms
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    feeding: dict[str, int] = {}
    for bn in bns:
        op = producer[bn.input[0]]
        feeding[op] = feeding.get(op, 0) + 1
    assert feeding == case.producers


def test_batchnorms_are_inference_form(built: Built) -> None:
    _, _, model = built
    for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        assert len(bn.output) == 1, bn.name
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
        assert attrs.get("training_mode", 0) == 0, bn.name


def test_batchnorm_parameters_are_distinct_nontrivial_initializers(built: Built) -> None:
    """Identity-fed or default (identity-like) statistics would make fusion tests vacuous."""
    _, _, model = built
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    seen: set[str] = set()
    for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        assert all(name in inits for name in bn.input[1:5]), bn.name
        assert not seen & set(bn.input[1:5]), "a BatchNorm parameter is shared"
        seen |= set(bn.input[1:5])
        gamma, beta, mean, var = (inits[name] for name in bn.input[1:5])
        assert np.all(var >= 0.5) and np.all(var <= 2.0)
        assert np.all(gamma >= 0.5) and np.all(gamma <= 1.5)
        assert np.abs(mean).max() > 0.1 and np.abs(beta).max() > 0.01
        assert not np.allclose(var, 1.0) and not np.allclose(gamma, 1.0)


def test_onnxruntime_matches_torch(built: Built) -> None:
    case, path, _ = built
    feeds = examples.random_inputs(path, batch=2, seed=7)
    (got,) = _session(path).run(None, feeds)
    with torch.no_grad():
        want = case.module()(torch.from_numpy(feeds["input"])).numpy()
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.1  # activations neither vanished nor saturated to 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_decoder_has_grouped_and_biasless_convtranspose(build_once: Callable[[str], Built]) -> None:
    _, _, model = build_once("decoder")
    convts = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convts]
    assert groups == [1, 2, 1]
    assert [len(n.input) for n in convts] == [3, 3, 2]


@pytest.mark.slow
def test_mobilenet_has_depthwise_convs(build_once: Callable[[str], Built]) -> None:
    _, _, model = build_once("mobilenetv2")
    inits = {t.name: t for t in model.graph.initializer}
    depthwise = 0
    for n in (n for n in model.graph.node if n.op_type == "Conv"):
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if group > 1:
            assert inits[n.input[1]].dims[0] == group  # one filter per channel
            depthwise += 1
    assert depthwise == 17


def test_export_is_deterministic(tmp_path: Path) -> None:
    a = examples.convtranspose_decoder(tmp_path / "a.onnx")
    b = examples.convtranspose_decoder(tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()


def test_builder_leaves_global_torch_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    examples.tiny_cnn(tmp_path / "m.onnx")
    assert torch.equal(torch.rand(3), expected)


def test_old_opset_batchnorm_has_no_training_mode(tmp_path: Path) -> None:
    """Opset 13 uses BatchNormalization-9 (no training_mode attribute); still inference form."""
    path = examples.tiny_cnn(tmp_path / "m13.onnx", opset=13)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 13
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 2
    for bn in bns:
        assert {a.name for a in bn.attribute} <= {"epsilon", "momentum"}
        assert len(bn.output) == 1
    feeds = examples.random_inputs(path)
    (got,) = _session(path).run(None, feeds)
    with torch.no_grad():
        want = examples.tiny_cnn_module()(torch.from_numpy(feeds["input"])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width", [0.25, 0.5])
def test_resnet_param_count_formula(width: float) -> None:
    module = examples.resnet50_like_module(width)
    stored = sum(t.numel() for t in module.state_dict().values() if t.dtype.is_floating_point)
    assert examples.resnet50_like_param_count(width) == stored


def test_resnet_size_constants() -> None:
    mb_100 = examples.resnet50_like_param_count(examples.RESNET50_WIDTH_100MB) * 4 / 1e6
    mb_400 = examples.resnet50_like_param_count(examples.RESNET50_WIDTH_400MB) * 4 / 1e6
    assert 95 <= mb_100 <= 105
    assert 380 <= mb_400 <= 420
    assert examples.RESNET50_WIDTHS == {"100mb": 1.0, "400mb": 2.0}


def test_random_inputs_are_seeded(built: Built) -> None:
    _, path, _ = built
    a = examples.random_inputs(path, batch=3, seed=1)
    b = examples.random_inputs(path, batch=3, seed=1)
    assert list(a) == ["input"] and a["input"].shape[0] == 3
    np.testing.assert_array_equal(a["input"], b["input"])


def test_importing_examples_does_not_import_torch() -> None:
    code = "import sys, fusenode.node.examples; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
