"""`fusenode fuse` as users drive it: reports, verification, bad input, atomic output."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import helper

from fusenode.node.cli import main
from fusenode.passes.numerics import NumpyBackend, cuda_available
from tests.support.cli import Cli
from tests.support.onnx_models import assert_close, conv_bn, count_ops, gemm_bn, run

fusenode = Cli()


@pytest.fixture
def model_path(tmp_path):
    model, _ = conv_bn()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean_failure(proc, folder, before):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fusenode: error:"), proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing partial left


def test_human_report_and_verify(model_path, tmp_path):
    out = tmp_path / "fused.onnx"
    proc = fusenode("fuse", model_path, "-o", out, "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "fused 1 BatchNormalization" in proc.stdout
    assert "verified with onnxruntime" in proc.stdout and "max abs error" in proc.stdout
    assert count_ops(onnx.load(out), "BatchNormalization") == 0


def test_json_report(model_path, tmp_path):
    out = tmp_path / "fused.onnx"
    proc = fusenode("fuse", model_path, "-o", out, "--json", "--verify", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["n_fused"] == 1 and report["n_skipped"] == 0 and report["device"] == "cpu"
    assert report["fused"][0]["pattern"] == "Conv+BatchNormalization"
    assert report["verify"]["ok"] is True and report["verify"]["engine"] == "onnxruntime"
    assert report["verify"]["max_abs_error"] < 1e-4


def test_input_unchanged_and_output_deterministic(model_path, tmp_path):
    before = sha256(model_path)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main(["fuse", str(model_path), "-o", str(a)]) == 0
    assert main(["fuse", str(model_path), "-o", str(b)]) == 0
    assert sha256(model_path) == before
    assert a.read_bytes() == b.read_bytes()


def test_verification_failure_writes_nothing(model_path, tmp_path, monkeypatch, capsys):
    real = NumpyBackend.scale

    def wrong(self, weight, factor):  # a broken fold: 1 % off
        return real(self, weight, factor * 1.01)

    monkeypatch.setattr(NumpyBackend, "scale", wrong)
    out = tmp_path / "fused.onnx"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["fuse", str(model_path), "-o", str(out), "--verify", "--device", "cpu"]) == 3
    err = capsys.readouterr().err
    assert "verification failed" in err and "max abs error" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_external_data_model(tmp_path):
    """A model stored with external data is read and written with external data."""
    model, feeds = conv_bn(cin=16, cout=32)
    src = tmp_path / "ext.onnx"
    onnx.save(model, src, save_as_external_data=True, location="ext.weights", size_threshold=0)
    out = tmp_path / "out.onnx"
    assert main(["fuse", str(src), "-o", str(out), "--verify"]) == 0
    assert (tmp_path / "out.onnx.data").stat().st_size > 0
    fused = onnx.load(out, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in fused.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    assert_close(run(out, feeds), run(src, feeds), np.float32)


def test_refused_patterns_still_exit_zero(tmp_path):
    model, _ = gemm_bn()
    model.graph.output.append(helper.make_tensor_value_info("G", 1, ["m", "n"]))
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    proc = fusenode("fuse", src, "-o", out)
    assert proc.returncode == 0
    assert "skipped 1" in proc.stdout and "graph output" in proc.stdout


BAD_INPUTS = {
    "missing": None,
    "empty": b"",
    "text": b"this is not a model\n" * 10,
    "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_files(kind, tmp_path):
    src = tmp_path / f"{kind}.onnx"
    if BAD_INPUTS[kind] is not None:
        src.write_bytes(BAD_INPUTS[kind])
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_clean_failure(fusenode("fuse", src, "-o", tmp_path / "out.onnx"), tmp_path, before)


def test_truncated_model(model_path, tmp_path):
    data = model_path.read_bytes()
    for cut in (len(data) // 3, len(data) - 7):
        src = tmp_path / f"cut{cut}.onnx"
        src.write_bytes(data[:cut])
        before = sorted(p.name for p in tmp_path.iterdir())
        assert_clean_failure(fusenode("fuse", src, "-o", tmp_path / "out.onnx"), tmp_path, before)


def test_invalid_model(tmp_path):
    model, _ = conv_bn()
    model.graph.node.reverse()  # not topologically sorted
    src = tmp_path / "bad.onnx"
    onnx.save(model, src)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = fusenode("fuse", src, "-o", tmp_path / "out.onnx")
    assert_clean_failure(proc, tmp_path, before)
    assert "invalid ONNX model" in proc.stderr


def test_directory_as_input(tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_clean_failure(fusenode("fuse", tmp_path, "-o", tmp_path / "o.onnx"), tmp_path, before)


@pytest.mark.parametrize("target", ["missing-dir/out.onnx", "model.onnx/out.onnx", "model.onnx"])
def test_unwritable_output(model_path, tmp_path, target):
    before = sorted(p.name for p in tmp_path.iterdir())
    digest = sha256(model_path)
    proc = fusenode("fuse", model_path, "-o", tmp_path / target)
    assert_clean_failure(proc, tmp_path, before)
    assert sha256(model_path) == digest


def test_usage_errors(model_path):
    assert fusenode("fuse", model_path).returncode == 2  # -o missing
    proc = fusenode("fuse", model_path, "-o", "x.onnx", "--input-shape", "bogus")
    assert proc.returncode == 2 and "NAME=DxDxD" in proc.stderr


def test_device_cuda(model_path, tmp_path):
    proc = fusenode("fuse", model_path, "-o", tmp_path / "o.onnx", "--device", "cuda")
    if cuda_available():
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 1 and "no CUDA device" in proc.stderr
        assert not (tmp_path / "o.onnx").exists()


def test_symbolic_input_shape_override(tmp_path):
    model, _ = conv_bn()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    proc = fusenode("fuse", src, "-o", out, "--verify", "--json", "--input-shape", "X=2x4x9x7")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verify"]["outputs"][0]["shape"] == [2, 6, 9, 7]


def test_inline_model_over_the_protobuf_limit_is_written_with_external_data(tmp_path, monkeypatch):
    """Past 2 GB a model cannot be one protobuf: the output switches to external data
    (shown here with the limit lowered, so the test needs no 2 GB file)."""
    import fusenode.passes.modelfile

    monkeypatch.setattr(fusenode.passes.modelfile, "PROTOBUF_LIMIT", 1000)
    model, feeds = conv_bn(cin=16, cout=32)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    assert main(["fuse", str(src), "-o", str(out), "--verify"]) == 0
    assert (tmp_path / "o.onnx.data").exists()
    onnx.checker.check_model(str(out), full_check=True)
    assert_close(run(out, feeds), run(src, feeds), np.float32)
