"""fusenode.passes.onnxproto: ONNX's classes and checker without ``import onnx``, the same
classes a later ``import onnx`` gets, the fallback to onnx itself, and helpers that answer as
onnx's own do.

The fast path only runs in a process that has not imported onnx: those tests start one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fusenode.passes import onnxproto
from fusenode.passes.errors import ModelFileError
from fusenode.passes.modelfile import LazyModel
from tests.support.onnx_models import conv_bn

MESSAGES = ("ModelProto", "GraphProto", "NodeProto", "TensorProto", "AttributeProto")
MESSAGES += ("ValueInfoProto",)


def run_python(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object last."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def invalid_models() -> dict[str, onnx.ModelProto]:
    """Models onnx's checker rejects, each for another reason."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])

    def model(nodes, **kw):
        graph = helper.make_graph(nodes, "g", [x], [y])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], **kw)

    unsorted = model(
        [helper.make_node("Relu", ["T"], ["Y"]), helper.make_node("Relu", ["X"], ["T"])]
    )
    return {
        "unknown op": model([helper.make_node("NoSuchOp", ["X"], ["Y"])]),
        "unsorted": unsorted,
        "ir too new": model([helper.make_node("Relu", ["X"], ["Y"])], ir_version=999),
        "bad attribute": model([helper.make_node("Relu", ["X"], ["Y"], alpha=1.0)]),
    }


# -- the fast path ------------------------------------------------------------------------------
def test_fast_path_gives_onnx_classes_and_a_working_onnx(tmp_path):
    """Without onnx imported, the classes come from onnx's generated module under a private
    name; ``import onnx`` afterwards returns the very same classes and everything in it works
    (checker, helper, load, shape inference, reference evaluator)."""
    result = run_python(
        f"""
        import json, sys
        import numpy as np
        from fusenode.passes import onnxproto as p
        fast = p.WITHOUT_ONNX_PACKAGE
        before = sorted(m for m in ("onnx", "ml_dtypes") if m in sys.modules)
        extension = sys.modules.get("onnx.onnx_cpp2py_export")
        made = p.ModelProto()  # a message made before onnx is imported
        import onnx
        import onnx.shape_inference
        from onnx import helper
        from onnx.reference import ReferenceEvaluator
        same = [getattr(p, n) is getattr(onnx, n) for n in {MESSAGES!r}]
        same.append(p.ValidationError is onnx.checker.ValidationError)
        same.append(extension is sys.modules["onnx.onnx_cpp2py_export"])
        x = helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [2])
        y = helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [2])
        graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.save(model, {str(tmp_path / "m.onnx")!r})
        loaded = onnx.load({str(tmp_path / "m.onnx")!r})
        made.ParseFromString(loaded.SerializeToString())
        onnx.checker.check_model(made, full_check=True)
        onnx.checker.check_model({str(tmp_path / "m.onnx")!r})
        inferred = onnx.shape_inference.infer_shapes(made)
        out = ReferenceEvaluator(made).run(None, {{"X": np.array([-1, 2], np.float32)}})
        attribute_before = hasattr(onnx, "onnx_cpp2py_export")
        repaired = p.full_onnx() is onnx and onnx.onnx_cpp2py_export is extension
        print(json.dumps({{
            "fast": fast, "before": before, "extension": extension is not None, "same": same,
            "types": [type(loaded) is p.ModelProto, isinstance(made, onnx.ModelProto)],
            "inferred": len(inferred.graph.output), "out": out[0].tolist(),
            "attribute_before": attribute_before, "repaired": repaired,
        }}))
        """
    )
    assert result["fast"] is True
    assert result["before"] == []  # neither onnx's package nor ml_dtypes was imported
    assert result["extension"] is True
    assert all(result["same"]), result["same"]
    assert result["types"] == [True, True]
    assert result["inferred"] == 1
    assert result["out"] == [0.0, 2.0]
    assert result["repaired"] is True  # full_onnx() sets onnx.onnx_cpp2py_export back


def test_checker_errors_are_onnx_checker_errors():
    """For invalid models, the fast path's checker raises what onnx.checker raises: the same
    class, the same message, from bytes and from a file."""
    models = {k: m.SerializeToString() for k, m in invalid_models().items()}
    result = run_python(
        """
        import json, sys, tempfile, os
        from fusenode.passes import onnxproto as p
        models = {k: bytes.fromhex(v) for k, v in json.loads(sys.argv[1]).items()}
        folder = tempfile.mkdtemp()

        def outcome(check, data):
            path = os.path.join(folder, "m.onnx")
            with open(path, "wb") as f:
                f.write(data)
            got = []
            for arg in (data, path):
                try:
                    check(arg)
                    got.append(None)
                except Exception as e:
                    got.append([id(type(e)), type(e).__qualname__, str(e)])
            return got

        ours = {k: outcome(lambda a: p.check_model(a) if isinstance(a, bytes)
                           else p.check_model_file(a), v) for k, v in models.items()}
        fast = p.WITHOUT_ONNX_PACKAGE and "onnx" not in sys.modules
        import onnx
        theirs = {k: outcome(onnx.checker.check_model, v) for k, v in models.items()}
        print(json.dumps({"fast": fast, "ours": ours, "theirs": theirs}))
        """,
        json.dumps({k: v.hex() for k, v in models.items()}),
    )
    assert result["fast"] is True
    assert result["ours"] == result["theirs"]
    for name, (from_bytes, from_file) in result["ours"].items():
        assert from_bytes is not None and from_file is not None, name
        assert from_bytes[1] == "ValidationError", name


def test_fuse_does_not_import_the_onnx_package(tmp_path):
    """``fusenode fuse`` of a float32 model imports neither onnx's package (its __init__) nor
    ml_dtypes, onnxruntime or torch: only onnx's generated module and C++ extension. With
    --verify, onnxruntime runs the models."""
    model, _ = conv_bn()
    onnx.save(model, tmp_path / "m.onnx")
    code = """
        import json, sys
        import fusenode.passes.fuse
        from fusenode.node.cli import main
        code = main(sys.argv[1:])
        heavy = ("onnx", "ml_dtypes", "onnxruntime", "torch", "onnx.onnx_cpp2py_export")
        print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}))
        """
    src, dst = str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx")
    plain = run_python(code, "fuse", src, "-o", dst, "--device", "cpu")
    assert plain == {"code": 0, "loaded": ["onnx.onnx_cpp2py_export"]}
    verified = run_python(code, "fuse", src, "-o", dst, "--device", "cpu", "--verify")
    assert verified["code"] == 0
    assert "onnxruntime" in verified["loaded"]


# -- the fallback -------------------------------------------------------------------------------
def test_fallback_when_onnx_is_already_imported():
    """With onnx imported first, everything comes from onnx itself."""
    result = run_python(
        f"""
        import json
        import onnx
        from fusenode.passes import onnxproto as p
        same = [getattr(p, n) is getattr(onnx, n) for n in {MESSAGES!r}]
        p.check_model(onnx.ModelProto(ir_version=8, opset_import=[onnx.OperatorSetIdProto(
            version=17)], graph=onnx.GraphProto(name="g")).SerializeToString())
        print(json.dumps({{"fast": p.WITHOUT_ONNX_PACKAGE, "same": same}}))
        """
    )
    assert result == {"fast": False, "same": [True] * len(MESSAGES)}
    # This test process imported onnx before fusenode.passes: the same holds here.
    assert not onnxproto.WITHOUT_ONNX_PACKAGE
    assert onnxproto.ModelProto is onnx.ModelProto


def test_fallback_when_the_fast_path_fails():
    """A fast path that cannot find onnx's files falls back to ``import onnx``, silently."""
    result = run_python(
        f"""
        import importlib.util, json, sys
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "onnx" else find_spec(name, *a)
        from fusenode.passes import onnxproto as p
        importlib.util.find_spec = find_spec
        import onnx
        same = [getattr(p, n) is getattr(onnx, n) for n in {MESSAGES!r}]
        print(json.dumps({{"fast": p.WITHOUT_ONNX_PACKAGE, "same": same,
                          "extension": hasattr(onnx, "onnx_cpp2py_export")}}))
        """
    )
    assert result == {"fast": False, "same": [True] * len(MESSAGES), "extension": True}


# -- LazyModel.check: from memory, the file check deciding --------------------------------------
def test_check_from_memory_keeps_the_file_checks_verdict(tmp_path, monkeypatch):
    """A valid model whose weights are placeholders passes the in-memory check alone; an
    invalid one, or one with another "location" entry, is decided by the file check, with its
    message."""
    calls = []
    file_check = LazyModel._check_file
    monkeypatch.setattr(
        LazyModel, "_check_file", lambda self, what: (calls.append(1), file_check(self, what))
    )
    model, _ = conv_bn(cin=16, cout=32)  # weights over the inline limit: placeholders
    onnx.save(model, tmp_path / "ok.onnx")
    with LazyModel.load(tmp_path / "ok.onnx") as lazy:
        assert any(lazy.store.ref_id(t) is not None for t in lazy.model.graph.initializer)
        lazy.check()
    assert calls == []

    helper.set_model_props(model, {"location": "elsewhere.bin"})
    onnx.save(model, tmp_path / "meta.onnx")
    with LazyModel.load(tmp_path / "meta.onnx") as lazy:
        lazy.check()
    assert calls == [1]

    bad = invalid_models()["unknown op"]
    bad.graph.initializer.extend(model.graph.initializer)
    onnx.save(bad, tmp_path / "bad.onnx")
    with LazyModel.load(tmp_path / "bad.onnx") as lazy:
        with pytest.raises(ModelFileError) as from_memory:
            lazy.check()
        with pytest.raises(ModelFileError) as from_file:
            file_check(lazy, None)
    assert calls == [1, 1]
    assert str(from_memory.value) == str(from_file.value)
    assert "NoSuchOp" in str(from_memory.value)


# -- helpers answer as onnx's own ---------------------------------------------------------------
def test_dtype_tables_match_onnx():
    for code in helper.get_all_tensor_dtypes():
        assert onnxproto.tensor_dtype_to_np_dtype(code) == helper.tensor_dtype_to_np_dtype(code)
        dtype = helper.tensor_dtype_to_np_dtype(code)
        assert onnxproto.np_dtype_to_tensor_dtype(dtype) == helper.np_dtype_to_tensor_dtype(dtype)
    with pytest.raises(KeyError):
        onnxproto.tensor_dtype_to_np_dtype(999)
    with pytest.raises(ValueError):
        onnxproto.np_dtype_to_tensor_dtype(np.dtype("datetime64[s]"))


def tensors() -> list[onnx.TensorProto]:
    """Tensors of every kind a model may hold inline: raw and typed fields, every dtype."""
    rng = np.random.default_rng(0)
    out = []
    for code in helper.get_all_tensor_dtypes():
        dtype = helper.tensor_dtype_to_np_dtype(code)
        if code == TensorProto.STRING:
            values = np.array(["a", "bc", "", "d"], dtype=object).reshape(2, 2)
        elif dtype.kind == "c":
            values = (rng.normal(size=(2, 3)) + 1j * rng.normal(size=(2, 3))).astype(dtype)
        elif dtype.kind in "biu":
            values = rng.integers(0, 2 if dtype.kind == "b" else 7, (2, 3)).astype(dtype)
        else:
            values = rng.normal(size=(2, 3)).astype(np.float32).astype(dtype)
        out.append(numpy_helper.from_array(values, f"raw{code}"))
        if code != TensorProto.STRING:
            out.append(helper.make_tensor(f"typed{code}", code, values.shape, values.flatten()))
    out.append(helper.make_tensor("scalar", TensorProto.FLOAT, [], [2.5]))
    out.append(helper.make_tensor("empty", TensorProto.INT64, [0, 3], []))
    return out


@pytest.mark.parametrize("t", tensors(), ids=lambda t: t.name)
def test_to_array_matches_numpy_helper(t):
    got, want = onnxproto.to_array(t), numpy_helper.to_array(t)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(
        got.view(np.uint8) if got.dtype.kind == "V" else got,
        want.view(np.uint8) if want.dtype.kind == "V" else want,
    )


@pytest.mark.parametrize(
    "t",
    [
        TensorProto(name="short", data_type=TensorProto.FLOAT, dims=[4], raw_data=bytes(12)),
        TensorProto(name="undefined", data_type=TensorProto.UNDEFINED, dims=[1]),
        TensorProto(
            name="segment",
            data_type=TensorProto.FLOAT,
            dims=[1],
            float_data=[1.0],
            segment=TensorProto.Segment(begin=0, end=1),
        ),
        TensorProto(name="bad dims", data_type=TensorProto.INT64, dims=[3], int64_data=[1, 2]),
    ],
    ids=lambda t: t.name,
)
def test_to_array_raises_what_numpy_helper_raises(t):
    with pytest.raises(Exception) as ours:
        onnxproto.to_array(t)
    with pytest.raises(Exception) as theirs:
        numpy_helper.to_array(t)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def test_attributes_match_onnx_helper():
    values = [
        1.5,
        3,
        "s",
        b"b",
        [1.0, 2.0],
        [1, 2],
        ["a", "b"],
        numpy_helper.from_array(np.ones(2)),
    ]
    for i, value in enumerate(values):
        attribute = helper.make_attribute(f"a{i}", value)
        assert onnxproto.get_attribute_value(attribute) == helper.get_attribute_value(attribute)
    empty = onnx.AttributeProto(name="u")
    assert onnxproto.get_attribute_value(empty) is helper.get_attribute_value(empty) is None
    ref = helper.make_attribute_ref("r", onnx.AttributeProto.FLOAT)
    with pytest.raises(ValueError):
        onnxproto.get_attribute_value(ref)
    for value in (1.0, 0.5, -2.0):
        assert (
            onnxproto.make_float_attribute("beta", value).SerializeToString()
            == helper.make_attribute("beta", value).SerializeToString()
        )


@pytest.mark.parametrize("shape", [[], [3, 4], [0], [1, 0, 2]])
def test_make_tensor_value_info_matches_onnx_helper(shape):
    ours = onnxproto.make_tensor_value_info("x", TensorProto.FLOAT16, shape)
    theirs = helper.make_tensor_value_info("x", TensorProto.FLOAT16, shape)
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert ours == theirs


def test_bfloat16_dtype_is_ml_dtypes():
    assert onnxproto.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16) == np.dtype(ml_dtypes.bfloat16)
    assert onnxproto.np_dtype_to_tensor_dtype(np.dtype(ml_dtypes.bfloat16)) == TensorProto.BFLOAT16
