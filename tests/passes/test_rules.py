"""The rule set itself: its shape, checks without side effects, patterns per op family, and
what importing the pass costs."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from fusenode.passes import fuse_bn
from fusenode.passes.framework import ModelContext, Scope, run_rewrites
from fusenode.passes.fuse_bn_base import FuseBatchNormRule, Plan
from fusenode.passes.fuse_bn_before_conv import FuseBatchNormIntoNextConv
from fusenode.passes.fuse_bn_conv import FuseBatchNormIntoConv
from fusenode.passes.fuse_bn_conv_transpose import FuseBatchNormIntoConvTranspose
from fusenode.passes.fuse_bn_gemm import FuseBatchNormIntoGemm
from fusenode.passes.fuse_bn_matmul import FuseBatchNormIntoMatMul
from fusenode.passes.modelfile import LazyModel
from fusenode.passes.numerics import NumpyBackend, TorchBackend
from tests.passes.checks import fuse
from tests.support.onnx_models import (
    bn_conv,
    conv_bn,
    convt_bn,
    gemm_bn,
    matmul_bn,
    tensor,
    value_info,
)

PASSES = Path(fuse_bn.__file__).parent
FAMILIES = [
    (FuseBatchNormIntoConv, conv_bn),
    (FuseBatchNormIntoConvTranspose, convt_bn),
    (FuseBatchNormIntoGemm, gemm_bn),
    (FuseBatchNormIntoMatMul, matmul_bn),
    (FuseBatchNormIntoNextConv, bn_conv),
]
#: What each rule's fold writes, by pattern.
PATTERNS = {
    FuseBatchNormIntoConv: "Conv+BatchNormalization",
    FuseBatchNormIntoConvTranspose: "ConvTranspose+BatchNormalization",
    FuseBatchNormIntoGemm: "Gemm+BatchNormalization",
    FuseBatchNormIntoMatMul: "MatMul+Add+BatchNormalization",
    FuseBatchNormIntoNextConv: "BatchNormalization+Conv",
}


@contextlib.contextmanager
def loaded(model: onnx.ModelProto, tmp_path: Path) -> Iterator[LazyModel]:
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    with LazyModel.load(path, spill_dir=tmp_path) as lazy:
        yield lazy


def main_scope(lazy: LazyModel) -> Scope:
    return Scope(lazy.model.graph, ModelContext(lazy.model, lazy.store), None, "main")


def batchnorm(scope: Scope) -> onnx.NodeProto:
    return next(n for n in scope.graph.node if n.op_type == "BatchNormalization")


def scope_state(scope: Scope) -> tuple:
    """Everything check could touch, by value: the graph, the indexes, the name tables."""
    return (
        scope.model.model.SerializeToString(deterministic=True),
        {k: id(v) for k, v in scope.producers.items()},
        set(scope.initializers),
        set(scope.inputs),
        set(scope.outputs),
        dict(scope.model.uses),
        set(scope.model.names),
    )


def test_rule_set_is_explicit():
    expected = (
        FuseBatchNormIntoConv,
        FuseBatchNormIntoConvTranspose,
        FuseBatchNormIntoGemm,
        FuseBatchNormIntoMatMul,
        FuseBatchNormIntoNextConv,
    )
    assert expected == fuse_bn.RULES
    assert (fuse_bn.NAME, fuse_bn.VERSION) == ("fuse-batchnorm", "1.1.0")
    rules = fuse_bn.rules(NumpyBackend())
    assert [type(r) for r in rules] == list(fuse_bn.RULES)
    assert all(isinstance(r, FuseBatchNormRule) for r in rules)
    assert all(r.anchor == "BatchNormalization" for r in rules)
    assert [r.op_type for r in rules] == ["Conv", "ConvTranspose", "Gemm", "MatMul", "Conv"]
    assert [r.position for r in rules] == ["after"] * 4 + ["before"]


@pytest.mark.parametrize(("rule", "builder"), FAMILIES)
@pytest.mark.parametrize("declined", [False, True])
def test_check_has_no_side_effects(rule, builder, declined, tmp_path):
    """check() twice changes neither the match, the graph, the scope nor the stored tensors:
    saving afterwards gives the bytes of saving without it. To accept, it returns an immutable
    plan (the same one twice); to decline, the reason."""
    # Weights over the inline limit, so check reads them through the store's file mapping.
    model, _ = builder(k=64, n=32) if builder in (gemm_bn, matmul_bn) else builder(cin=16, cout=32)
    op = next(n for n in model.graph.node if n.op_type == rule.op_type)
    if declined:  # declined by the last step, the weight scan, after everything was read
        w = next(t for t in model.graph.initializer if t.name == op.input[1])
        arr = onnx.numpy_helper.to_array(w).copy()
        arr.flat[0] = np.inf
        w.CopyFrom(tensor(w.name, arr))
    with loaded(model, tmp_path) as lazy:
        lazy.save(tmp_path / "untouched.onnx", durable=False)
    with loaded(model, tmp_path) as lazy:
        scope = main_scope(lazy)
        r = rule(NumpyBackend())
        match = r.match(batchnorm(scope), scope)
        assert match is not None
        assert lazy.store.extent(scope.initializers[match.op.input[1]]) is not None
        before = scope_state(scope), match.bn.SerializeToString(), match.op.SerializeToString()
        verdicts = [r.check(match, scope), r.check(match, scope)]
        after = scope_state(scope), match.bn.SerializeToString(), match.op.SerializeToString()
        assert after == before
        if declined:
            assert verdicts == [f"{rule.op_type} weight contains non-finite values"] * 2
        else:
            first, second = verdicts
            assert isinstance(first, Plan) and isinstance(second, Plan)
            assert first.weight.name == second.weight.name == match.op.input[1]
            for a, b in (
                (first.w, second.w),
                (first.fold.factor, second.fold.factor),
                (first.fold.bias, second.fold.bias),
            ):
                np.testing.assert_array_equal(a, b)
            assert not first.fold.factor.flags.writeable and not first.fold.bias.flags.writeable
            with pytest.raises(dataclasses.FrozenInstanceError):
                first.fold = None
        with pytest.raises(dataclasses.FrozenInstanceError):
            match.op = None  # the match is immutable: nothing is handed to rewrite through it
        lazy.save(tmp_path / "checked.onnx", durable=False)
    assert (tmp_path / "checked.onnx").read_bytes() == (tmp_path / "untouched.onnx").read_bytes()


@pytest.mark.parametrize(("rule", "builder", "producer"), [
    (FuseBatchNormIntoConv, gemm_bn, "Gemm"),
    (FuseBatchNormIntoConvTranspose, conv_bn, "Conv"),
    (FuseBatchNormIntoGemm, convt_bn, "ConvTranspose"),
    (FuseBatchNormIntoMatMul, gemm_bn, "Gemm"),
    (FuseBatchNormIntoNextConv, conv_bn, "Conv"),
])  # fmt: skip
def test_rule_declines_other_family(rule, builder, producer, tmp_path):
    model, _ = builder()
    with loaded(model, tmp_path) as lazy:
        scope = main_scope(lazy)
        assert rule(NumpyBackend()).match(batchnorm(scope), scope) is None
        report = run_rewrites(lazy.model, lazy.store, [rule(NumpyBackend())], "t", "0")
    assert report.fused == []
    if rule.position == "after":
        want = f"its input comes from {producer}, not {rule.op_type}"
    else:  # a Conv -> BN whose output goes to the graph: no Conv reads it
        want = "no Conv reads its output"
    assert [s.reason for s in report.skipped] == [want]


@pytest.mark.parametrize(("rule", "builder"), FAMILIES)
def test_each_rule_alone_fuses_its_family(rule, builder, tmp_path):
    model, _ = builder()
    with loaded(model, tmp_path) as lazy:
        report = run_rewrites(lazy.model, lazy.store, [rule(NumpyBackend())], "t", "0")
    assert [f.pattern for f in report.fused] == [PATTERNS[rule]]
    assert report.skipped == []


def test_every_batchnorm_reported(tmp_path):
    """A BN the rules fold, one after a Relu and one on a graph input: all three reported."""
    model, _ = conv_bn()
    y = model.graph.output[0].name
    model.graph.node.extend(
        [
            helper.make_node("Relu", [y], ["R"]),
            helper.make_node(
                "BatchNormalization", ["R", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["Y2"]
            ),
            helper.make_node(
                "BatchNormalization", ["X", "x_scale", "x_bias", "x_mean", "x_var"], ["Y3"]
            ),
        ]
    )
    model.graph.initializer.extend(
        tensor(f"x_{k}", np.ones(4, np.float32)) for k in ("scale", "bias", "mean", "var")
    )
    model.graph.output.extend([value_info("Y2", np.float32, 4), value_info("Y3", np.float32, 4)])
    _, report = fuse(model, tmp_path)
    assert report["n_fused"] == 1 and report["n_skipped"] == 2
    assert {s["pattern"] for s in report["skipped"]} == {"BatchNormalization"}
    assert [s["reason"] for s in report["skipped"]] == [
        "its input comes from Relu, not Conv/ConvTranspose/Gemm/MatMul, "
        "and no Conv reads its output",
        "its input 'X' is a graph input, not the output of Conv/ConvTranspose/Gemm/MatMul, "
        "and no Conv reads its output",
    ]


def test_rule_modules_import_nothing_heavy_at_top():
    """ml_dtypes, onnxruntime, torch and onnx's package are imported inside the functions that
    need them (onnxproto loads what passes/ needs of onnx without its package)."""
    heavy = {"ml_dtypes", "onnxruntime", "torch", "onnx"}
    for path in sorted(PASSES.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & heavy, f"{path.name}: {names}"


def test_fuse_without_onnxruntime_or_torch(tmp_path):
    """A float32 model fused on the CPU loads neither onnxruntime nor torch, nor ml_dtypes or
    onnx's package (see test_onnxproto)."""
    model, _ = conv_bn()
    onnx.save(model, tmp_path / "m.onnx")
    code = (
        "import json, sys\n"
        "from fusenode.passes.fuse import fuse_file\n"
        f"fuse_file({str(tmp_path / 'm.onnx')!r}, {str(tmp_path / 'o.onnx')!r}, device='cpu')\n"
        "heavy = ('ml_dtypes', 'onnx', 'onnxruntime', 'torch')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize(("rule", "builder"), FAMILIES)
def test_torch_backend_folds_from_the_read_only_plan(rule, builder, tmp_path):
    """The plan's arrays are read-only: the torch path (CUDA's, run here on the CPU) takes them
    without a warning and writes the bytes the numpy path writes."""
    model, _ = builder()
    written = []
    for backend in (NumpyBackend(), TorchBackend("cpu")):
        with loaded(model, tmp_path) as lazy:
            report = run_rewrites(lazy.model, lazy.store, [rule(backend)], "t", "0")
            assert len(report.fused) == 1
            out = tmp_path / f"{backend.name}-{type(backend).__name__}.onnx"
            lazy.save(out, durable=False)
        written.append(out.read_bytes())
    assert written[0] == written[1]
